"""passes/rewrite_attention.py: each accepted site becomes exactly one ``rehyat::hybrid_attention``
node (tagged ``meta["rehyat_site"]``, fed by its ``feature_maps.<key>.phi_q/phi_k`` modules) and
its old softmax / SDPA nodes are gone; the teacher form (``options=None``) computes the original
function; grouped-query k/v are repeated and key masks folded into one extra head-dim column."""
from collections import Counter
from dataclasses import replace

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import fx, nn

from rehyat_compile.attention_spellings import spelling_of
from rehyat_compile.export import export_video_model
from rehyat_compile.op import HYBRID_OP, HybridCall, is_hybrid_node
from rehyat_compile.passes import pipeline
from rehyat_compile.passes.rewrite_attention import (ConversionOptions, drop_mask_column, fold_key_mask, repeat_kv,
                                                     restore_rank, rewrite_attention, softmax_attention)
from rehyat_compile.transform import PhiPair

C, HEADS, D, FEATURES, FRAMES, M = 8, 2, 8, 4, 3, 4


class Attention(nn.Module):
    """Tokens [B, N, C] -> one attention in the given variant -> [B, N, HEADS*D]."""

    def __init__(self, variant="sdpa", masked=0):
        super().__init__()
        self.variant, self.masked = variant, masked
        self.qkv = nn.Linear(C, 3 * HEADS * D)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        if self.variant == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.variant == "gqa":
            o = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        elif self.variant == "bmm":  # [B*H, N, D] operands
            q3, k3, v3 = (t.reshape(b * HEADS, n, D) for t in (q, k, v))
            p = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * D ** -0.5, -1)
            o = torch.bmm(p, v3).reshape(b, HEADS, n, D)
        elif self.variant == "keep-mask":  # bool key mask: the last ``masked`` keys are dropped
            keep = (torch.arange(n) < n - self.masked).reshape(1, 1, 1, n)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        elif self.variant == "masked-fill":
            scores = (q @ k.transpose(-1, -2)) * D ** -0.5
            scores = scores.masked_fill(torch.arange(n) >= n - self.masked, float("-inf"))
            o = scores.softmax(-1) @ v
        else:
            raise ValueError(self.variant)
        return o.transpose(1, 2).reshape(b, n, HEADS * D)


class Video(nn.Module):
    """[B, C, T, 2, 2] -> frame-major tokens (+ ``after`` text tokens) -> ``layers`` attentions."""

    def __init__(self, variant="sdpa", after=0, masked=0, layers=1):
        super().__init__()
        torch.manual_seed(0)
        self.config = (variant, after, masked, layers)
        self.blocks = nn.ModuleList(Attention(variant, masked) for _ in range(layers))
        self.text = nn.Parameter(torch.randn(1, after, C))
        self.proj = nn.Linear(HEADS * D, C)

    def forward(self, x):
        b = x.shape[0]
        h = torch.cat([x.flatten(2).transpose(1, 2), self.text.expand(b, -1, -1)], 1)
        for block in self.blocks:
            h = h + self.proj(block(h))
        return h


def video(frames=FRAMES, seed=0):
    return torch.randn(1, C, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


_EXPORTS: dict = {}


def analysed(model, x):
    """(GraphModule, FrameAxis, rewritable sites), the GraphModule holding the sites' feature maps.
    One export per model configuration and input shape; every call gets a fresh ``ep.module()``."""
    key = (model.config, tuple(x.shape))
    if key not in _EXPORTS:
        _EXPORTS[key] = export_video_model(model.eval(), (x,))
    ep, frame_axis = _EXPORTS[key]
    gm = ep.module()
    sites = pipeline.run(pipeline.ANALYSIS, gm, pipeline.PassContext(frame_axis, model)).sites
    assert sites and all(s.rewritable for s in sites), sites
    torch.manual_seed(1)
    gm.feature_maps = nn.ModuleDict({s.key: PhiPair(s.heads or 1, s.head_dim, FEATURES) for s in sites})
    return gm, frame_axis, sites


def rewritten(model, x, options):
    """(output before, GraphModule after, sites after, before targets) of the REWRITE pass."""
    gm, frame_axis, sites = analysed(model, x)
    with torch.no_grad():
        before = gm(x)
    targets = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    result = pipeline.run(pipeline.REWRITE, pipeline.PassResult(gm, sites), pipeline.PassContext(frame_axis, model,
                                                                                                 options))
    assert result.graph is gm
    return before, gm, result.sites, targets


def sizes(node):
    """meta["val"] shape as sympy expressions in the frame symbol, read without adding shape guards
    (comparing a SymInt with an int would specialise the shared export's frame axis)."""
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d) for d in node.meta["val"].shape)


def tokens(gm, extra=0):
    """M*T + extra: the sequence length as the graph sees it (T the input's symbolic frame count)."""
    x = next(iter(gm.graph.find_nodes(op="placeholder")))
    return M * x.meta["val"].shape[2].node.expr + extra


def attention_nodes(gm):
    """Nodes of any softmax / SDPA spelling still in the graph."""
    return [n for n in gm.graph.nodes if (s := spelling_of(n)) is not None and s.family != "hybrid"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


CAUSAL = ConversionOptions(chunk_frames=1, overlap_frames=0, causal=True, feature_dim=FEATURES)
ONE_CHUNK = ConversionOptions(chunk_frames=FRAMES, overlap_frames=1, causal=True, feature_dim=FEATURES)


# ---------------------------------------------------------------------------------------------
# the hybrid form
# ---------------------------------------------------------------------------------------------

def test_each_site_becomes_one_tagged_hybrid_node_and_its_attention_nodes_go():
    x = video()
    _, gm, sites, before = rewritten(Video("sdpa", layers=2), x, CAUSAL)
    assert before[torch.ops.aten.scaled_dot_product_attention.default] == 2
    assert attention_nodes(gm) == []
    hybrid = [n for n in gm.graph.nodes if is_hybrid_node(n)]
    assert [n.meta["rehyat_site"] for n in hybrid] == [s.name for s in sites] == ["blocks.0", "blocks.1"]
    for node in hybrid:
        assert node.target is HYBRID_OP
        assert sizes(node) == (1, HEADS, tokens(gm), D)
    with torch.no_grad():
        out = gm(x)
    assert out.shape == (1, FRAMES * M, C) and torch.isfinite(out).all()


def test_hybrid_node_reads_its_feature_maps_on_its_own_q_and_k():
    _, gm, [site], _ = rewritten(Video("sdpa"), video(), CAUSAL)
    [node] = [n for n in gm.graph.nodes if is_hybrid_node(n)]
    call = HybridCall.from_node(node)
    modules = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("feature_maps.")]
    assert [n.target for n in modules] == ["feature_maps.blocks_0.phi_q", "feature_maps.blocks_0.phi_k"]
    assert (call.fq, call.fk) == tuple(modules)
    assert call.fq.args == (call.q,) and call.fk.args == (call.k,)
    for features in modules:
        assert sizes(features) == (1, HEADS, tokens(gm), FEATURES)
    assert site.key == "blocks_0"


def test_hybrid_node_carries_the_site_layout_scale_and_the_options():
    _, gm, [site], _ = rewritten(Video("sdpa", after=3), video(), CAUSAL)
    [node] = [n for n in gm.graph.nodes if is_hybrid_node(n)]
    call = HybridCall.from_node(node)
    assert call.layout == {"tokens_per_frame": M, "chunk_frames": 1, "overlap_frames": 0, "causal": True,
                           "extra_before": 0, "extra_after": 3, "scale": pytest.approx(D ** -0.5)}
    assert (site.chunk_frames, site.overlap_frames, site.causal) == (1, 0, True)
    assert site.layout.extra_after == 3


def test_hybrid_with_one_chunk_over_every_frame_is_the_original_and_smaller_chunks_are_not():
    x = video()
    before, gm, _, _ = rewritten(Video("sdpa", after=3), x, ONE_CHUNK)
    with torch.no_grad():
        assert rel_err(gm(x), before) < 1e-5
    before, gm, _, _ = rewritten(Video("sdpa", after=3), x, CAUSAL)
    with torch.no_grad():
        assert rel_err(gm(x), before) > 1e-4


def test_rewritten_graph_takes_other_frame_counts():
    x = video()
    _, gm, _, _ = rewritten(Video("sdpa"), x, CAUSAL)
    with torch.no_grad():
        assert gm(video(5)).shape == (1, 5 * M, C)


# ---------------------------------------------------------------------------------------------
# the teacher form
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, after, masked", [("sdpa", 0, 0), ("bmm", 0, 0), ("gqa", 0, 0),
                                                    ("keep-mask", 3, 2), ("masked-fill", 3, 2)])
def test_teacher_form_is_numerically_the_original_with_one_tagged_softmax_node(variant, after, masked):
    x = video()
    model = Video(variant, after=after, masked=masked)
    with torch.no_grad():
        reference = model.eval()(x)
    before, gm, [site], _ = rewritten(model, x, None)
    torch.testing.assert_close(before, reference)
    assert attention_nodes(gm) == [] and not any(is_hybrid_node(n) for n in gm.graph.nodes)
    [node] = [n for n in gm.graph.nodes if "rehyat_site" in n.meta]
    assert node.target is softmax_attention and node.meta["rehyat_site"] == site.name
    assert site.chunk_frames is None and site.causal is None
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gm(video(5, seed=1)), model(video(5, seed=1)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# operands: [B*H, N, D], grouped-query heads, key masks
# ---------------------------------------------------------------------------------------------

def _one(gm, target):
    [node] = gm.graph.find_nodes(op="call_function", target=target)
    return node


def test_three_dim_operands_get_a_unit_head_axis_and_the_output_its_rank_back():
    x = video()
    before, gm, [site], targets = rewritten(Video("bmm"), x, ONE_CHUNK)
    assert targets[torch.ops.aten.softmax.int] == 1 and site.heads is None
    call = HybridCall.from_node(next(n for n in gm.graph.nodes if is_hybrid_node(n)))
    assert sizes(call.q) == (HEADS, 1, tokens(gm), D)
    restore = _one(gm, restore_rank)
    assert restore.args[1] == 3 and sizes(restore) == (HEADS, tokens(gm), D)
    with torch.no_grad():
        assert rel_err(gm(x), before) < 1e-5


def test_grouped_query_keys_and_values_are_repeated_to_the_query_heads():
    x = video()
    before, gm, [site], _ = rewritten(Video("gqa"), x, ONE_CHUNK)
    assert (site.heads, site.kv_heads) == (HEADS, 1)
    repeats = gm.graph.find_nodes(op="call_function", target=repeat_kv)
    assert len(repeats) == 2 and all(n.args[1] == HEADS for n in repeats)
    call = HybridCall.from_node(next(n for n in gm.graph.nodes if is_hybrid_node(n)))
    assert (call.k, call.v) == tuple(repeats)
    assert sizes(call.k) == sizes(call.v) == (1, HEADS, tokens(gm), D)
    with torch.no_grad():
        assert rel_err(gm(x), before) < 1e-5


def test_sites_without_grouped_heads_get_no_repeat():
    _, gm, _, _ = rewritten(Video("sdpa"), video(), CAUSAL)
    assert not gm.graph.find_nodes(op="call_function", target=repeat_kv)


@pytest.mark.parametrize("variant", ["keep-mask", "masked-fill"])
def test_key_mask_is_folded_into_one_extra_head_dim_column(variant):
    x = video()
    before, gm, [site], _ = rewritten(Video(variant, after=3, masked=2), x, ONE_CHUNK)
    fold = _one(gm, fold_key_mask)
    assert fold.args[4] == site.match.mask_kind and fold.args[5] == pytest.approx(site.scale)
    parts = [u for u in fold.users]
    assert len(parts) == 3
    call = HybridCall.from_node(next(n for n in gm.graph.nodes if is_hybrid_node(n)))
    assert (call.q, call.k, call.v) == tuple(parts)
    assert fold.args[:2] == (call.fq.args[0], call.fk.args[0])  # the features are of the unmasked q, k
    assert drop_mask_column in {u.target for u in next(n for n in gm.graph.nodes if is_hybrid_node(n)).users}
    with torch.no_grad():
        out = Interpreted(gm).run(x)
    assert [tuple(t.shape[-1:]) for t in out.qkv] == [(D + 1,)] * 3 and out.hybrid.shape[-1] == D + 1
    assert out.dropped.shape == (1, HEADS, FRAMES * M + 3, D)
    with torch.no_grad():
        assert rel_err(gm(x), before) < 1e-5  # masked extra tokens: exact at one chunk


@pytest.mark.parametrize("variant", ["keep-mask", "masked-fill"])
def test_masked_extra_keys_do_not_reach_the_video_tokens_at_any_chunking(variant):
    x = video()
    _, gm, _, _ = rewritten(Video(variant, after=3, masked=2), x, CAUSAL)
    with torch.no_grad():
        out = gm(x)
        gm.text[:, 1:] += 10.0  # the two masked text tokens
        changed = gm(x)
    torch.testing.assert_close(changed[:, :FRAMES * M], out[:, :FRAMES * M], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, FRAMES * M:], out[:, FRAMES * M:])


class Interpreted(fx.Interpreter):
    """Runs a rewritten graph, keeping the hybrid node's q/k/v, its output and the dropped column."""

    def run_node(self, n):
        value = super().run_node(n)
        if is_hybrid_node(n):
            self.qkv = [self.env[a] for a in HybridCall.from_node(n).tensors[:3]]
            self.hybrid = value
        elif n.target is drop_mask_column:
            self.dropped = value
        return value

    def run(self, *args):
        super().run(*args)
        return self


def test_masked_site_hybrid_node_and_operands_carry_meta_val():
    _, gm, _, _ = rewritten(Video("keep-mask", after=3, masked=2), video(), ONE_CHUNK)
    node = next(n for n in gm.graph.nodes if is_hybrid_node(n))
    for t in (node, *HybridCall.from_node(node).tensors[:3]):
        assert sizes(t) == (1, HEADS, tokens(gm, 3), D + 1)


@pytest.mark.parametrize("variant, after, masked", [
    ("sdpa", 0, 0), ("gqa", 0, 0), ("keep-mask", 3, 2),
    ("bmm", 0, 0),
    ("masked-fill", 3, 2),
])
def test_no_node_of_the_old_attention_is_left_in_the_graph(variant, after, masked):
    _, gm, _, _ = rewritten(Video(variant, after=after, masked=masked), video(), CAUSAL)
    dead = [n.name for n in gm.graph.nodes if n.op == "call_function" and not n.users]
    assert dead == []
    n = tokens(gm, after)
    quadratic = [node.name for node in gm.graph.nodes if isinstance(node.meta.get("val"), torch.Tensor)
                 and sizes(node)[-2:] == (n, n)]
    assert quadratic == []


# ---------------------------------------------------------------------------------------------
# what the pass refuses
# ---------------------------------------------------------------------------------------------

def test_declined_site_is_refused_and_the_graph_is_left_as_it_was():
    gm, frame_axis, [site] = analysed(Video("sdpa"), video())
    code = gm.code
    with pytest.raises(ValueError, match="not rewritable: decided elsewhere"):
        rewrite_attention(gm, [site.declined("cross-attention", "decided elsewhere")], CAUSAL, frame_axis)
    assert gm.code == code and len(attention_nodes(gm)) == 1


def test_a_declined_site_anywhere_in_the_list_leaves_the_graph_unchanged():
    gm, frame_axis, sites = analysed(Video("sdpa", layers=2), video())
    code = gm.code
    with pytest.raises(ValueError, match="not rewritable"):
        rewrite_attention(gm, [sites[0], sites[1].declined("cross-attention", "no")], CAUSAL, frame_axis)
    assert gm.code == code and len(attention_nodes(gm)) == 2


def test_site_without_a_layout_is_refused():
    gm, frame_axis, [site] = analysed(Video("sdpa"), video())
    with pytest.raises(ValueError, match="not rewritable"):
        rewrite_attention(gm, [replace(site, layout=None)], CAUSAL, frame_axis)
