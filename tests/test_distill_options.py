"""Stage-1 options: attention-weight distillation (Hedgehog / LoLCATs) and other feature maps."""
import torch

import rehyat_compile as rc
from rehyat_compile.attention import hybrid_attention_reference, make_layout
from rehyat_compile.distill import (attention_weight_kl, hybrid_log_weights, reinit_feature_maps,
                                    structured_attention_inputs, teacher_attention, train_feature_maps)
from tests.distill_data import site_problems
from tests.models import make_wan_t2v

LAYOUT = dict(tokens_per_frame=4, chunk_frames=2, overlap_frames=1)


def _inputs(seed=0):
    q, k, v = structured_attention_inputs(2, 2, 5, 4, 8, seed=seed)
    torch.manual_seed(seed)
    fq, fk = (rc.FeatureMap(2, 8, 16, init_bias=0.0)(t) for t in (q, k))
    return q, k, v, fq, fk


def test_hybrid_weights_times_v_reproduce_the_op_and_sum_to_one():
    q, k, v, fq, fk = _inputs()
    log_a, allowed = hybrid_log_weights(q, k, fq, fk, make_layout(**LAYOUT, causal=True, extra_before=0,
                                                                   extra_after=0))
    weights = log_a.exp() * allowed
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights @ v, hybrid_attention_reference(q, k, v, fq, fk, **LAYOUT), rtol=1e-4, atol=1e-5)
    assert not allowed[..., :8, 8:].any()  # causal: the first chunk (frames 0-1) reaches no later frame


def test_attention_weight_kl_is_zero_only_when_the_weights_match():
    q, k, v, fq, fk = _inputs()
    layout = make_layout(tokens_per_frame=4, chunk_frames=5, overlap_frames=0, causal=False)
    same = attention_weight_kl(q, k, fq, fk, layout)          # one chunk covering the video: exact softmax
    assert same.abs().max() < 1e-5
    other = attention_weight_kl(q, k, fq, fk, make_layout(**LAYOUT))
    assert (other > 1e-3).all()


def test_distilling_with_the_weight_loss_lowers_the_weight_kl_and_the_output_error():
    specs, samples, maps = site_problems(["a"], frames=6, chunk_frames=1)
    s = samples["a"][0]

    def kl():
        with torch.no_grad():
            return float(attention_weight_kl(s.q, s.k, maps["a"][0](s.q), maps["a"][1](s.k), specs["a"].layout).mean())
    results = train_feature_maps(samples, specs, maps, steps=40, lr=1e-2, loss="attention_weights", progress=False,
                                 calibrate=True)
    trained = kl()
    for_l1 = site_problems(["a"], frames=6, chunk_frames=1)
    train_feature_maps(for_l1[1], for_l1[0], for_l1[2], steps=0, progress=False)
    assert results["a"].error_after < results["a"].error_before
    q_map, k_map = for_l1[2]["a"]
    with torch.no_grad():
        untrained = float(attention_weight_kl(s.q, s.k, q_map(s.q), k_map(s.k), specs["a"].layout).mean())
    assert trained < untrained


def test_blended_loss_trains_like_l1():
    specs, samples, maps = site_problems(["a", "b"], frames=6, chunk_frames=1)
    results = train_feature_maps(samples, specs, maps, steps=30, lr=1e-2, loss="l1+attention_weights", progress=False)
    assert all(r.error_after < r.error_before for r in results.values())


def test_reinit_feature_maps_swaps_in_exponential_maps_that_distil():
    model, args, kwargs = make_wan_t2v(frames=4)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=1, overlap_frames=0)
    assert reinit_feature_maps(hybrid, positive="exp") == len(hybrid.sites)
    assert all(p.phi_q.positive == "exp" for p in hybrid.feature_maps.values())
    batches = [((args[0] * 0.5 + 0.5 * torch.randn_like(args[0]),), kwargs)]
    report = rc.distill(model, hybrid, batches, steps=20, lr=1e-2, progress=False, measure_model=False)
    assert all(r.error_after < r.error_before for r in report.per_layer.values())
    out = hybrid(*args, **kwargs)[0]
    assert torch.isfinite(out).all()
