"""The pass pipeline (passes/pipeline.py): the ordered passes, declines as data, the op's arguments
read only through HybridCall, and the stream check knowing every attention spelling the finder does."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

import rehyat_compile as rc
from rehyat_compile.attention_spellings import spelling_of
from rehyat_compile.declines import CODES, Decline, describe_size
from rehyat_compile.errors import ConversionError
from rehyat_compile.op import HYBRID_OP, HybridCall
from rehyat_compile.passes import pipeline
from rehyat_compile.zoo import MODELS

from test_find_attention import SPELLINGS, _attend

HEADS, D, C = 2, 8, 16
ROOT = Path(__file__).resolve().parents[1]


def _fused(name):
    def attend(q, k, v):
        return getattr(torch.ops.aten, name)(q, k, v)[0]
    return attend


# every spelling find_attention accepts -> how to write it (q, k, v: [B, H, N, D] -> [B, H, N, D])
ACCEPTED = {name: (lambda q, k, v, s=name: _attend(q, k, v, s)) for name, (_, extra) in SPELLINGS.items() if not extra}
ACCEPTED |= {
    "sdpa-flash-cpu": _fused("_scaled_dot_product_flash_attention_for_cpu"),
    "sdpa-efficient": lambda q, k, v: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0],
    "flex_attention": lambda q, k, v: flex_attention(q, k, v),  # found, declined, still attends over every frame
}


class Layer(nn.Module):
    """Residual self-attention over the tokens [B, N, C], written in ``spelling``."""

    def __init__(self, spelling):
        super().__init__()
        self.proj, self.spelling = nn.Linear(C, 3 * C), spelling

    def forward(self, tokens):
        b, n, _ = tokens.shape
        q, k, v = (t.reshape(b, n, HEADS, D).transpose(1, 2) for t in self.proj(tokens).chunk(3, -1))
        return tokens + ACCEPTED[self.spelling](q, k, v).transpose(1, 2).reshape(b, n, C)


class TwoLayers(nn.Module):
    """[B, C, T, H, W] -> frame-major tokens -> SDPA layer ("first") -> layer in ``spelling`` ("second")."""

    def __init__(self, spelling):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = Layer("sdpa"), Layer(spelling)

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = self.second(self.first(x.flatten(2).transpose(1, 2)))
        return tokens.transpose(1, 2).reshape(b, c, t, h, w)


def _video(frames=4):
    return torch.randn(1, C, frames, 2, 2, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spelling", sorted(ACCEPTED))
def test_stream_refuses_every_attention_spelling_left_unconverted_naming_its_node(spelling):
    x = _video()
    with torch.no_grad():
        hybrid = rc.transform(TwoLayers(spelling).eval(), (x,), layers=["first"], chunk_frames=2, overlap_frames=1)
    assert [s.name for s in hybrid.sites] == ["first"]
    kept = [n for n in hybrid.graph_module(x).graph.nodes
            if spelling_of(n) is not None and spelling_of(n).family not in ("hybrid",)]
    assert kept, "the unconverted layer's attention is still in the graph"
    with pytest.raises(ConversionError, match="chunk by chunk") as err:
        rc.stream(hybrid)(x)
    assert any(re.search(rf"\bnode {re.escape(n.name)}\b", str(err.value)) for n in kept), str(err.value)


def test_the_same_model_with_both_layers_converted_streams_like_its_parallel_form():
    """The negative of the refusal: with both layers converted the two-layer model streams and equals
    the parallel form, so the refusal above is about the unconverted layer alone."""
    x = _video(5)
    with torch.no_grad():
        hybrid = rc.transform(TwoLayers("matmul-mul").eval(), (x,), chunk_frames=2, overlap_frames=1)
        assert len(hybrid.sites) == 2
        torch.testing.assert_close(rc.stream(hybrid)(x), hybrid(x), rtol=1e-4, atol=1e-5)


def test_pipeline_names_every_stage_in_order():
    names = [p.name for p in pipeline.PIPELINE]
    assert names[:5] == ["canonicalize", "find", "classify", "layout", "rewrite"]
    assert set(names[5:]) == {"thread_state", "infer_input_frames", "thread_state_matched", "hoist_chunk_invariant",
                              "write_states_in_place", "force_softmax", "portable",
                              "legalize_split", "legalize_softmax", "legalize_softplus", "legalize_rms_norm",
                              "legalize_permute_rank", "legalize_reshape_rank"}
    assert pipeline.CONVERSION == pipeline.ANALYSIS + (pipeline.REWRITE,)


def test_analysis_passes_decide_sites_step_by_step():
    """find leaves sites undecided (no layout), classify declines cross-attention, layout places video."""
    model, args, kwargs = MODELS["wan2.1-t2v"]()
    ep, frame_axis = rc.export_video_model(model, args, kwargs)
    ctx = pipeline.PassContext(frame_axis, model)
    found = pipeline.run((pipeline.CANONICALIZE, pipeline.FIND), ep.module(), ctx)
    assert len(found.sites) == 4 and not any(s.rewritable for s in found.sites)
    classified = pipeline.run(pipeline.CLASSIFY, found, ctx)
    assert [s.code for s in classified.sites] == [None, "cross-attention", None, "cross-attention"]
    laid_out = pipeline.run(pipeline.LAYOUT, classified, ctx)
    assert [s.rewritable for s in laid_out.sites] == [True, False, True, False]
    assert [name for name, _ in laid_out.declines] == [s.name for s in laid_out.sites if not s.rewritable]
    assert found.graph is laid_out.graph  # analysis passes decide; they do not copy the graph


def test_declines_are_data_with_documented_codes_and_sizes_in_words():
    model, args, kwargs = MODELS["wan2.1-t2v"]()
    report = rc.inspect(model, args, kwargs)
    as_dict = report.to_dict()["sites"]
    assert {s["code"] for s in as_dict} == {None, "cross-attention"}
    cross = next(s for s in report.sites if s.code == "cross-attention")
    assert "tokens per frame × T frames" in cross.reason and not re.search(r"\bs\d+\b", cross.reason), cross.reason
    with pytest.raises(ValueError, match="Decline code"):
        Decline("made-up", "x")
    assert set(CODES) >= {"cross-attention", "linear-attention", "flex-attention", "cannot-export", "factorised",
                          "query-dependent-mask", "not-over-video"}


def test_describe_size_reads_affine_sizes_in_words():
    import sympy
    s, u = sympy.Symbol("s53", integer=True, positive=True), sympy.Symbol("u0", integer=True)
    assert describe_size(6 * s, s) == "6 tokens per frame × T frames"
    assert describe_size(8 * s + 10, s, patch=2) == "16 tokens per frame × T frames + 10"
    assert describe_size(7) == "7 tokens"
    assert describe_size(16 * s + u, s) == "16 tokens per frame × T frames + a data-dependent number"


def test_hybrid_call_round_trips_the_op_arguments_by_name():
    q = torch.randn(1, 2, 12, 4)
    call = HybridCall(q, q, q, q.abs(), q.abs(), 4, 2, 1, True, 0, 0, 0.5)
    assert HybridCall.from_args(call.to_args()) == call
    assert call.layout == dict(tokens_per_frame=4, chunk_frames=2, overlap_frames=1, causal=True, extra_before=0,
                               extra_after=0, scale=0.5)
    torch.testing.assert_close(HYBRID_OP(*call.to_args()), rc.hybrid_attention(*call.tensors, **call.layout))
    with pytest.raises(TypeError, match="missing"):
        HybridCall.from_args(call.to_args()[:6])


def test_no_code_reads_the_op_arguments_by_position_outside_the_view():
    """The op's layout arguments sit at positions 5..11: nothing indexes them (or slices them off)
    but HybridCall in rehyat_compile/op.py."""
    pattern = re.compile(r"\.args\[(5|6|7|8|9|10|11)\]|\.args\[5:|\.args\[:5\]|layout_args")
    offenders = []
    for folder in ("rehyat_compile", "passes", "backends"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "op.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
