"""Distillation of phi_q, phi_k: the trainer, site batching, capture through a rewritten graph."""
import copy

import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.distill import (SiteSample, capture_sites, shard_sites, softmax_forced,
                                    train_feature_maps)

from tests.distill_data import site_problem, site_problems


def test_training_at_least_halves_every_site_error():
    specs, samples, maps = site_problems(["a", "b"])
    results = train_feature_maps(samples, specs, maps, steps=300, lr=3e-2, progress=False)
    for r in results.values():
        assert r.error_after <= 0.5 * r.error_before, r
        assert len(r.loss_curve) == 300 and r.loss_curve[-1] < r.loss_curve[0]


def test_batched_sites_train_like_separate_runs():
    specs, samples, maps = site_problems(["a", "b", "c"])
    alone = {}
    for name in specs:
        solo = copy.deepcopy(maps[name])
        alone[name] = (solo, train_feature_maps({name: samples[name]}, specs, {name: solo}, steps=5, lr=1e-2,
                                                 progress=False)[name])
    together = train_feature_maps(samples, specs, maps, steps=5, lr=1e-2, progress=False)
    for name, (solo, result) in alone.items():
        for a, b in zip([*solo[0].parameters(), *solo[1].parameters()],
                        [*maps[name][0].parameters(), *maps[name][1].parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert together[name].loss_curve == pytest.approx(result.loss_curve, rel=1e-4)


def test_sites_of_different_shapes_train_in_one_call():
    specs, samples, maps = site_problems(["a"])
    spec_b, samples_b, maps_b = site_problem("b", heads=3, frames=4, chunk_frames=2, overlap_frames=1, seed=5)
    specs["b"], samples["b"], maps["b"] = spec_b, samples_b, maps_b
    results = train_feature_maps(samples, specs, maps, steps=20, lr=1e-2, progress=False)
    assert all(r.error_after < r.error_before for r in results.values())


def test_zero_steps_leaves_weights_and_error():
    specs, samples, maps = site_problems(["a"])
    before = [p.clone() for p in maps["a"][0].parameters()]
    r = train_feature_maps(samples, specs, maps, steps=0, progress=False)["a"]
    assert r.error_after == pytest.approx(r.error_before)
    assert all(torch.equal(a, b) for a, b in zip(before, maps["a"][0].parameters()))


@pytest.mark.parametrize("kwargs, match", [(dict(steps=-1), "steps"), (dict(lr=0.0), "lr"),
                                           (dict(loss="l3"), "loss")])
def test_bad_training_arguments_are_named(kwargs, match):
    specs, samples, maps = site_problems(["a"])
    with pytest.raises(ValueError, match=match):
        train_feature_maps(samples, specs, maps, progress=False, **kwargs)


def test_shards_balance_cost_and_cover_every_site():
    owner = shard_sites({"a": 4.0, "b": 3.0, "c": 2.0, "d": 2.0, "e": 1.0}, 2)
    assert set(owner) == {"a", "b", "c", "d", "e"}
    load = [sum(c for n, c in {"a": 4.0, "b": 3.0, "c": 2.0, "d": 2.0, "e": 1.0}.items() if owner[n] == r)
            for r in range(2)]
    assert sorted(load) == [6.0, 6.0]
    with pytest.raises(ValueError, match="world_size"):
        shard_sites({"a": 1.0}, 0)


# --- capture through a rewritten graph (toy model in the rewrite's form) -----------------------

class ToyHybrid(torch.nn.Module):
    """Two attention layers written as the rewrite writes them: one hybrid-op call per site."""

    def __init__(self, dim=16, heads=2, tokens_per_frame=4, feature_dim=8):
        super().__init__()
        self.heads, self.tpf = heads, tokens_per_frame
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))
        self.phi = torch.nn.ModuleList(rc.FeatureMap(heads, dim // heads, feature_dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        for i, proj in enumerate(self.qkv):
            q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in proj(x).chunk(3, -1))
            y = torch.ops.rehyat.hybrid_attention.default(q, k, v, self.phi[2 * i](q), self.phi[2 * i + 1](k),
                                                          self.tpf, 1, 0, True, 0, 0, 0.25)
            x = x + y.transpose(1, 2).reshape(b, n, c)
        return x


def toy_graph():
    torch.manual_seed(0)
    model = ToyHybrid()
    gm = torch.export.export(model, (torch.randn(1, 20, 16),)).module()
    for i, node in enumerate(n for n in gm.graph.nodes if n.target is torch.ops.rehyat.hybrid_attention.default):
        node.meta["rehyat_site"] = f"layer{i}"
    return model, gm


def softmax_teacher(model, x):
    b, n, c = x.shape
    for proj in model.qkv:
        q, k, v = (t.reshape(b, n, model.heads, -1).transpose(1, 2) for t in proj(x).chunk(3, -1))
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2).reshape(b, n, c)
    return x


def test_softmax_forced_graph_is_the_teacher_and_records_its_activations():
    model, gm = toy_graph()
    x = torch.randn(1, 5 * 4, 16)
    samples, specs, outputs = capture_sites(gm, [((x,), {})])
    torch.testing.assert_close(outputs[0], softmax_teacher(model, x))
    assert sorted(samples) == ["layer0", "layer1"] and specs["layer1"].layout.tokens_per_frame == 4
    s = samples["layer1"][0]
    torch.testing.assert_close(s.target, torch.nn.functional.scaled_dot_product_attention(s.q, s.k, s.v, scale=0.25))
    # the second site sees the teacher's activations (softmax upstream), not the hybrid's
    h = x + torch.nn.functional.scaled_dot_product_attention(
        samples["layer0"][0].q, samples["layer0"][0].k, samples["layer0"][0].v, scale=0.25).transpose(1, 2).reshape(1, 20, 16)
    torch.testing.assert_close(s.q, model.qkv[1](h).chunk(3, -1)[0].reshape(1, 20, 2, 8).transpose(1, 2))


def test_softmax_forced_graph_drops_feature_maps_and_leaves_original_alone():
    model, gm = toy_graph()
    forced, _ = softmax_forced(gm, record=["layer1"])
    assert not any(n.target is torch.ops.rehyat.hybrid_attention.default for n in forced.graph.nodes)
    assert not any("phi" in str(n.target) for n in forced.graph.nodes)
    assert sum(n.target is torch.ops.rehyat.hybrid_attention.default for n in gm.graph.nodes) == 2
    samples, _, _ = capture_sites(gm, [((torch.randn(1, 20, 16),), {})], record=["layer1"])
    assert list(samples) == ["layer1"]


# --- end to end on a tiny diffusers Wan2.1 ---------------------------------------------------

def sharpened_wan(factor=2.0, frames=5):
    """Tiny Wan2.1 whose self-attention is far from uniform: q and k RMSNorm gains scaled (logits x factor^2)."""
    from tests.models import make_wan_t2v
    model, args, kwargs = make_wan_t2v(frames=frames)
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.norm_q.weight.mul_(factor)
            block.attn1.norm_k.weight.mul_(factor)
    return model, args, kwargs


def noisy_batches(args, kwargs, timesteps, seed):
    """Latents at several noise levels, as distillation data for a diffusion teacher."""
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(args[0].shape, generator=g),), {**kwargs, "timestep": torch.tensor([t])})
            for t in timesteps]


@pytest.mark.slow
def test_distill_tiny_wan_halves_every_site_error_and_moves_output_to_teacher():
    model, args, kwargs = sharpened_wan()
    hybrid = rc.transform(model, args, kwargs, chunk_frames=1, overlap_frames=0, feature_dim=32)
    train = noisy_batches(args, kwargs, range(100, 900, 50), seed=7)
    held_out = noisy_batches(args, kwargs, (350, 650), seed=8)
    report = rc.distill(model, hybrid, train, steps=200, lr=3e-2, progress=False, eval_batches=held_out)
    print(report)
    assert report.teacher_check_error < 1e-5
    assert sorted(report.per_layer) == ["blocks.0.attn1", "blocks.1.attn1"]
    for site in report.per_layer.values():
        assert site.error_after <= 0.5 * site.error_before, site.name
    assert report.model_error_after < 0.7 * report.model_error_before
    assert len(report.loss_curve) == 200 and report.loss_curve[-1] < report.loss_curve[0]


def test_distill_rejects_a_teacher_that_is_not_the_converted_model():
    model, args, kwargs = sharpened_wan(frames=3)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=1, overlap_frames=0, feature_dim=8)
    other, _, _ = sharpened_wan(factor=1.0, frames=3)
    with pytest.raises(ValueError, match="teacher must be the model hybrid was converted from"):
        rc.distill(other, hybrid, [(args, kwargs)], steps=1, progress=False)
    with pytest.raises(TypeError, match="batches"):
        rc.distill(model, hybrid, [args], steps=1, progress=False)
    with pytest.raises(TypeError, match="hybrid"):
        rc.distill(model, model, [(args, kwargs)], steps=1, progress=False)
