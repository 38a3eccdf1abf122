"""rehyat_compile/dynamo_capture.py: models torch.export cannot take whole convert through Dynamo capture.

The official-style model (tests/dynamo_models.py: ``.tolist()`` grid sizes in forward and RoPE, an
``.item()`` on a shape tensor, [B, L, H, D] q/k/v with transposes around SDPA) converts exactly at
Tc >= T and differs at Tc=2, To=1; HunyuanVideo-1.5 is captured and its sites declined with the
construct named; the FlexAttention models are declined with "flex-attention"; a model without
attention and one Dynamo cannot capture give clear errors.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import rehyat_compile as rc
from rehyat_compile import kernels
from rehyat_compile.dynamo_capture import (instance_prefixes, named_sites, site_module, split_local_path)
from rehyat_compile.errors import ConversionError
from rehyat_compile.site import Site
from rehyat_compile.zoo import MODELS

from dynamo_models import DynamoRefuses, NoAttention, make_official_style


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- pure functions ------------------------------------------------------------------------

@pytest.mark.parametrize("path,expected", [
    ("L['self'].blocks[0].attn", ("self", "blocks.0.attn")),
    ("L['self'].__dict__['_modules']['context_embedder'].token_refiner.refiner_blocks.0.attn",
     ("self", "context_embedder.token_refiner.refiner_blocks.0.attn")),
    ("L['s']._modules['qkv']._parameters['weight']", ("s", "qkv.weight")),
    ("L['x']", ("x", "")),
    ("G['torch'].ones", ("", "G['torch'].ones")),
    ("L['self'].blocks[0](x)", ("", "L['self'].blocks[0](x)")),
])
def test_split_local_path_reads_dynamo_sources(path, expected):
    assert split_local_path(path) == expected


def test_sites_of_a_shared_graph_are_named_per_module_instance():
    """One captured graph serves every layer of a class: the parameters it is called with say which."""
    w0, w1 = torch.zeros(2), torch.zeros(2)
    paths = {id(w0): "blocks.0.attn.o.weight", id(w1): "blocks.1.attn.o.weight"}
    sources = {3: ("self", "o.weight")}
    assert instance_prefixes(sources, [None, None, None, w1], paths) == {"self": "blocks.1.attn"}
    assert instance_prefixes(sources, [None, None, None, torch.zeros(2)], paths) == {}
    sites = [Site("@self", "@self", "self", "sdpa"), Site("@self:1", "@self", "self", "sdpa"),
             Site("@self.inner", "@self.inner", "self", "sdpa")]
    named = named_sites(sites, {"self": "blocks.1.attn"}, "self", 4)
    assert [s.name for s in named] == ["blocks.1.attn", "blocks.1.attn:1", "blocks.1.attn.inner"]
    assert {s.graph for s in named} == {4} and named[0].key == "blocks_1_attn"
    assert site_module("@self", {}, "self", 2) == "<graph 2>"  # no parameter tells the instance


# ---- (a) the official-style model --------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    model, args, kwargs = make_official_style(4)
    with torch.no_grad():
        reference = model(*args, **kwargs)
    return model, args, kwargs, reference


@pytest.fixture(scope="module")
def chunked(official):
    """The official-style model converted with Tc=2, To=1 (shared by tests that do not change it)."""
    model, args, kwargs, _ = official
    return rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)


def test_official_style_model_cannot_export_and_is_captured_through_dynamo(official):
    model, args, kwargs, _ = official
    report = rc.inspect(model, args, kwargs)
    assert report.capture == "dynamo" and report.graphs > 1 and report.captures == 1
    converted = {s.name: s for s in report.rewritable}
    assert sorted(converted) == ["blocks.0.self_attn", "blocks.1.self_attn"]
    assert all(s.video == (0, 4, 16) and s.graph is not None for s in converted.values())
    cross = [s for s in report.sites if not s.rewritable]
    assert sorted(s.name for s in cross) == ["blocks.0.cross_attn", "blocks.1.cross_attn"]
    assert {s.code for s in cross} == {"cross-attention"}
    breaks = " ".join(report.breaks)
    assert "item()" in breaks and "grid_sizes.tolist()" in breaks  # the constructs, with their code lines
    text = str(report)
    assert "graph breaks:" in text and "graph" in text.splitlines()[2]
    as_dict = report.to_dict()
    assert as_dict["capture"] == "dynamo" and as_dict["breaks"] and "graph" in as_dict["sites"][0]


def test_official_style_exact_at_one_chunk_and_differs_with_chunking(official):
    model, args, kwargs, reference = official
    whole = rc.transform(model, args, kwargs, chunk_frames=4, overlap_frames=1)
    assert whole.capture == "dynamo" and [s.name for s in whole.sites] == ["blocks.0.self_attn", "blocks.1.self_attn"]
    assert set(whole.feature_maps) == {"blocks_0_self_attn", "blocks_1_self_attn"}  # one φ pair per layer
    with torch.no_grad():
        out = whole(*args, **kwargs)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    chunked = whole.with_options(chunk_frames=2, overlap_frames=1)
    with torch.no_grad():
        out = chunked(*args, **kwargs)
    assert torch.isfinite(out).all() and _rel(out, reference) > 1e-3
    # the captured graphs run the project's op: one hybrid node per converted site and instance
    programs = [p for p, _ in chunked._dynamo.programs.values() if p is not None]
    ops = [n.meta["rehyat_site"] for p in programs for n in p.graph.nodes
           if n.target == torch.ops.rehyat.hybrid_attention.default]
    assert sorted(ops) == ["blocks.0.self_attn", "blocks.1.self_attn"]


def test_official_style_trains_feature_maps_through_captured_graphs(official, chunked):
    model, args, kwargs, _ = official
    hybrid = chunked
    hybrid(*args, **kwargs).square().mean().backward()
    grads = [p.grad for p in hybrid.feature_maps.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert model.blocks[0].self_attn.q.weight.grad is not None
    model.zero_grad()
    hybrid.zero_grad()


def test_another_frame_count_recaptures_within_the_bound(official):
    model, args, kwargs, _ = official
    hybrid = rc.transform(model, args, kwargs, chunk_frames=8, max_captures=2)
    _, args6, _ = make_official_style(6)
    with torch.no_grad():
        out6, ref6 = hybrid(args6[0], *args[1:]), model(args6[0], *args[1:])
    torch.testing.assert_close(out6, ref6, rtol=1e-5, atol=1e-5)
    assert hybrid.captures == 2
    _, args5, _ = make_official_style(5)
    with pytest.raises(ConversionError, match="max_captures=2"):
        hybrid(args5[0], *args[1:])


def test_video_shape_lays_out_captured_graphs_and_follows_the_call_frame_count(official):
    model, args, kwargs, _ = official
    _, args6, _ = make_official_style(6)
    report = rc.inspect(model, (args6[0], *args[1:]), kwargs, video_shape=(4, 4, 4))
    assert [s.video for s in report.rewritable] == [(0, 6, 16)] * 2  # h, w from video_shape, frames from the call
    assert report.frame_axis.video_shape == (6, 4, 4)


def test_layers_selects_one_instance_of_a_shared_graph(official):
    model, args, kwargs, reference = official
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, layers=["blocks.1.self_attn"])
    assert [s.name for s in hybrid.sites] == ["blocks.1.self_attn"]
    with torch.no_grad():
        out = hybrid(*args, **kwargs)
    assert _rel(out, reference) > 1e-4 and list(hybrid.feature_maps) == ["blocks_1_self_attn"]


def test_stream_and_cost_of_a_captured_model_are_refused_naming_the_graph_breaks(official, chunked):
    model, args, kwargs, _ = official
    hybrid = chunked
    with pytest.raises(ConversionError, match=r"Graph breaks: .*tolist") as refused:
        rc.stream(hybrid)(*args, **kwargs)
    assert refused.value.code == "cannot-export" and "streaming" in str(refused.value)
    with pytest.raises(ConversionError, match=r"rc.cost.*Graph breaks: .*item\(\)"):
        rc.cost(hybrid, args, kwargs)


def test_a_call_that_runs_without_its_converted_graphs_is_an_error_not_the_original_output(official):
    model, args, kwargs, _ = official
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2)
    with torch.no_grad():
        hybrid(*args, **kwargs)
        for key in hybrid._dynamo.programs:  # as if Dynamo had run these frames as eager python
            hybrid._dynamo.programs[key] = (None, ())
        with pytest.raises(ConversionError, match="0 of the 2 converted sites"):
            hybrid(*args, **kwargs)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_max_captures_must_be_a_positive_int(official, bad):
    with pytest.raises(ValueError, match="max_captures must be an int >= 1"):
        rc.transform(official[0], max_captures=bad)


def test_copies_and_checkpoints_of_a_captured_model_capture_again(official, chunked, tmp_path):
    model, args, kwargs, _ = official
    hybrid = chunked
    with torch.no_grad():
        out = hybrid(*args, **kwargs)
        copied = copy.deepcopy(hybrid)
        assert copied.capture == "dynamo" and torch.equal(copied(*args, **kwargs), out)
        rc.save_hybrid(hybrid, tmp_path / "hybrid.safetensors")
        loaded = rc.load_hybrid(model, tmp_path / "hybrid.safetensors", args, kwargs)
        assert loaded.capture == "dynamo" and torch.equal(loaded(*args, **kwargs), out)


def test_joint_attention_of_a_captured_model_converts_globally_and_refuses_causal_chunks():
    """8 text tokens after 4 x 16 video tokens: 72 tokens also split evenly into 4 "frames" of 18, so only
    the dataflow across captured graphs (which inputs hold the video, VideoTensors) gives the layout."""
    model, args, kwargs = make_official_style(4, joint=True, layers=1, text=8)
    with torch.no_grad():
        reference = model(*args, **kwargs)
        whole = rc.transform(model, args, kwargs, chunk_frames=4, causal=False)
        (site,) = whole.sites
        assert site.kind == "joint" and site.video == (0, 4, 16) and site.extra_after == 8  # text after the video
        torch.testing.assert_close(whole(*args, **kwargs), reference, rtol=1e-5, atol=1e-5)
        assert _rel(whole.with_options(chunk_frames=2)(*args, **kwargs), reference) > 1e-4
        causal = rc.transform(model, args, kwargs, chunk_frames=2, causal=True)
        with pytest.raises(ConversionError, match=r"causal=False.*Graph breaks: .*tolist"):
            causal(*args, **kwargs)  # each chunk needs its own copy of the text: a step program of one graph


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.integers(2, 4), chunk=st.integers(1, 5), data=st.data())
def test_official_style_one_chunk_is_exact_and_fewer_frames_per_chunk_differ(official, frames, chunk, data):
    model = official[0]
    overlap = data.draw(st.integers(0, chunk), label="overlap")
    _, args, kwargs = make_official_style(frames, seed=frames)
    with torch.no_grad():
        reference = model(*args, **kwargs)
        out = rc.transform(model, chunk_frames=chunk, overlap_frames=overlap)(*args, **kwargs)
    assert torch.isfinite(out).all()
    if chunk >= frames:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out, reference) > 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_official_style_runs_the_fused_kernel_on_cuda(monkeypatch):
    """bf16 on CUDA: every converted site of the captured graphs runs the fused Triton kernel, and agrees
    with the same conversion in fp32 on the CPU (same φ)."""
    model, args, kwargs = make_official_style(4)
    cpu = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    with torch.no_grad():
        expected = cpu(*args, **kwargs)
    gpu_model = make_official_style(4)[0]
    gpu_model.load_state_dict(model.state_dict())
    gpu_model = gpu_model.to("cuda", torch.bfloat16)
    gpu_args = (args[0].to("cuda", torch.bfloat16), args[1].cuda(), args[2].to("cuda", torch.bfloat16))
    gpu_model.freqs = gpu_model.freqs.cuda()
    reasons = []
    unavailable = kernels.fused_kernel_unavailable
    monkeypatch.setattr(kernels, "fused_kernel_unavailable", lambda *t: reasons.append(unavailable(*t)) or reasons[-1])
    hybrid = rc.transform(gpu_model, gpu_args, kwargs, chunk_frames=2, overlap_frames=1)
    hybrid.feature_maps.load_state_dict({k: v.to("cuda", torch.bfloat16)
                                         for k, v in cpu.feature_maps.state_dict().items()})
    with torch.no_grad():
        out = hybrid(*gpu_args, **kwargs)
    assert out.is_cuda and torch.isfinite(out).all()
    assert len(reasons) >= 2 and set(reasons) == {None}  # both self-attention layers, fused kernel each time
    assert _rel(out.float().cpu(), expected) < 3e-2


# ---- (b) diffusers HunyuanVideo-1.5 ------------------------------------------------------

def test_hunyuan_video_1_5_is_captured_and_declined_naming_the_blocking_constructs():
    model, args, kwargs = MODELS["hunyuan-video-1.5"]()
    with pytest.raises(ConversionError, match="no attention site can be converted") as refused:
        rc.transform(model, args, kwargs)
    assert refused.value.code == "query-dependent-mask"
    report = refused.value.report  # what rc.inspect reports
    assert report.capture == "dynamo"
    assert any("if is_t2v" in b for b in report.breaks)  # the python branch on tensor values
    names = sorted(s.name for s in report.sites)
    assert names == ["context_embedder.token_refiner.refiner_blocks.0.attn", "transformer_blocks.0.attn",
                     "transformer_blocks.1.attn"]
    assert {s.code for s in report.sites} == {"query-dependent-mask"}  # mask_i & mask_j: not a key mask


# ---- (c) FlexAttention models ------------------------------------------------------------

@pytest.mark.parametrize("name", ["anyflow-far", "kandinsky6-sr"])
def test_flex_attention_models_export_without_grad_and_are_declined(name):
    model, args, kwargs = MODELS[name]()
    report = rc.inspect(model, args, kwargs)
    assert report.capture == "export" and "torch.no_grad" in report.frame_axis.reason
    flex = [s for s in report.sites if s.form == "flex_attention"]
    assert flex and {s.code for s in flex} == {"flex-attention"} and not report.rewritable
    with pytest.raises(ConversionError, match="flex_attention"):
        rc.transform(model, args, kwargs)


# ---- (d) clear errors --------------------------------------------------------------------

def test_model_without_attention_gives_a_clear_error():
    x = torch.randn(1, 4, 3, 4, 4)
    report = rc.inspect(NoAttention(), (x,))
    assert report.capture == "dynamo" and report.sites == [] and "no softmax attention found" in str(report)
    with pytest.raises(ConversionError, match="no attention site can be converted"):
        rc.transform(NoAttention(), (x,))


def test_model_dynamo_cannot_capture_gives_a_clear_error():
    x = torch.randn(1, 4, 3, 4, 4)
    for call in (rc.inspect, rc.transform):
        with pytest.raises(ConversionError, match="torch.export failed .*refuses to be traced.* Dynamo") as err:
            call(DynamoRefuses(), (x,))
        assert err.value.code == "cannot-export"
