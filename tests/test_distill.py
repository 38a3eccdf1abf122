"""Distillation of phi_q, phi_k: the trainer, site batching, capture through a rewritten graph."""
import copy

import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.distill import (capture_sites, shard_sites, site_errors, softmax_forced,
                                    train_feature_maps)

from tests.distill_data import site_problem, site_problems, toy_setup


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

def exported_toy():
    """The toy hybrid through torch.export (pytree calling convention, feature maps inlined)."""
    teacher, hybrid, _ = toy_setup()
    gm = torch.export.export(hybrid, (torch.randn(1, hybrid.tokens, hybrid.dim),)).module()
    for i, node in enumerate(n for n in gm.graph.nodes if n.target is torch.ops.rehyat.hybrid_attention.default):
        node.meta["rehyat_site"] = f"layer{i}"
    return teacher, hybrid, gm


def test_softmax_forced_graph_is_the_teacher_and_records_its_activations():
    teacher, model, gm = exported_toy()
    x = torch.randn(1, 5 * 4, 16)
    samples, specs, outputs = capture_sites(gm, [((x,), {})])
    torch.testing.assert_close(outputs[0], teacher(x))
    assert sorted(samples) == ["layer0", "layer1"] and specs["layer1"].layout.tokens_per_frame == 4
    s = samples["layer1"][0]
    torch.testing.assert_close(s.target, torch.nn.functional.scaled_dot_product_attention(s.q, s.k, s.v, scale=0.25))
    # the second site sees the teacher's activations (softmax upstream), not the hybrid's
    h = x + torch.nn.functional.scaled_dot_product_attention(
        samples["layer0"][0].q, samples["layer0"][0].k, samples["layer0"][0].v, scale=0.25).transpose(1, 2).reshape(1, 20, 16)
    torch.testing.assert_close(s.q, model.heads_first(model.qkv[1](h)[..., :16]))


def test_softmax_forced_graph_drops_feature_maps_and_leaves_original_alone():
    _, _, gm = exported_toy()
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
    """On the distillation batches (what stage 1 minimises); held-out batches must improve too."""
    model, args, kwargs = sharpened_wan()
    hybrid = rc.transform(model, args, kwargs, chunk_frames=1, overlap_frames=0, feature_dim=64)
    train = noisy_batches(args, kwargs, (100, 366, 632), seed=7)
    held_out = noisy_batches(args, kwargs, (350, 650), seed=8)
    held_before = site_errors(hybrid, held_out)
    report = rc.distill(model, hybrid, train, steps=250, lr=3e-2, progress=False)
    print(report)
    held_after = site_errors(hybrid, held_out)
    assert all(held_after[n] < held_before[n] for n in held_before), (held_before, held_after)
    assert report.teacher_check_error < 1e-5
    assert sorted(report.per_layer) == ["blocks.0.attn1", "blocks.1.attn1"]
    for site in report.per_layer.values():
        assert site.error_after <= 0.5 * site.error_before, site.name
    assert report.model_error_after < 0.7 * report.model_error_before
    assert len(report.loss_curve) == 250 and report.loss_curve[-1] < report.loss_curve[0]


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


def test_stage2_finetuning_reaches_phi_and_model_weights():
    """The docs/finetune.md loop: one AdamW step on the model's own objective moves both groups."""
    model, args, kwargs = sharpened_wan(frames=3)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=1, overlap_frames=0, feature_dim=8)
    phi = list(hybrid.feature_maps.parameters())
    phi_ids = {id(p) for p in phi}
    base = [p for p in hybrid.original.parameters() if id(p) not in phi_ids]
    opt = torch.optim.AdamW([{"params": phi, "lr": 1e-3}, {"params": base, "lr": 1e-4}])
    x0 = args[0]
    noise = torch.randn_like(x0)
    xt = 0.5 * x0 + 0.5 * noise
    pred = hybrid(xt, **kwargs)[0]
    loss = torch.nn.functional.mse_loss(pred, noise - x0)
    loss.backward()
    assert all(p.grad is not None for p in phi)
    assert hybrid.original.blocks[0].attn1.to_q.weight.grad is not None
    before_phi, before_q = phi[0].detach().clone(), hybrid.original.blocks[0].attn1.to_q.weight.detach().clone()
    opt.step()
    assert not torch.equal(phi[0], before_phi)
    assert not torch.equal(hybrid.original.blocks[0].attn1.to_q.weight, before_q)


def test_distill_report_on_the_toy_hybrid():
    teacher, hybrid, batches = toy_setup()
    report = rc.distill(teacher, hybrid, batches, steps=30, lr=1e-2, progress=False, eval_batches=batches[:1],
                        offload="cpu")
    assert report.teacher_check_error < 1e-6
    assert all(r.error_after < r.error_before for r in report.per_layer.values())
    assert report.model_error_after < report.model_error_before
    text = str(report)
    assert "layer0" in text and "whole model output vs teacher" in text
    assert report.errors("before")["layer1"] == report.per_layer["layer1"].error_before


def test_half_precision_activations_train_in_fp32_like_fp32_activations():
    specs, samples, maps = site_problems(["a"])
    maps16 = {"a": copy.deepcopy(maps["a"])}
    samples16 = {"a": [type(s)(*(t.bfloat16() for t in (s.q, s.k, s.v, s.target))) for s in samples["a"]]}
    r32 = train_feature_maps(samples, specs, maps, steps=20, lr=1e-2, progress=False)["a"]
    r16 = train_feature_maps(samples16, specs, maps16, steps=20, lr=1e-2, progress=False)["a"]
    assert r16.error_after < 0.9 * r16.error_before
    assert r16.error_after == pytest.approx(r32.error_after, rel=0.05)
