"""Replace each accepted attention site by one ``rehyat::hybrid_attention`` call (or, for the
teacher graph, by one canonical SDPA call), in place.

Per site the rewrite inserts:

* ``q, k, v`` in [B, H, N, D]: the site's own q/k/v (after RoPE, qk-norm: whatever fed the
  attention), [B*H, N, D] operands get a unit head axis, k is transposed back from q @ kT, and
  grouped-query k/v are repeated to the query heads;
* a key mask (bool keep/drop or additive, broadcast over queries) folded into one extra head-dim
  column: q' = [q, 1], k' = [k, bias/scale], v' = [v, 0], so softmax sees s + bias exactly; the
  output's extra column is dropped. (Masks on video keys only act inside the softmax window; the
  linear part has no mask -- exact for masks on extra tokens, the HunyuanVideo text padding case);
* ``fq = feature_maps[key].phi_q(q)``, ``fk = feature_maps[key].phi_k(k)`` (call_module);
* the hybrid op with the site's layout and scale; ``extra_after`` is computed in the graph when it
  depends on data (N - offset - T*M);
* the original output's layout restored, all its users redirected, the old nodes erased.

The new op node carries ``meta["rehyat_site"] = site.name`` and ``meta["val"]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from ..attention_spellings import spelling_of
from ..op import HYBRID_OP, HybridCall
from ..site import Site

MASK_BIAS = -1.0e4  # finite "minus infinity": exp underflows to 0 and fp16 cannot overflow (|bias/scale| < 65504)


@dataclass(frozen=True)
class ConversionOptions:
    """How sites are converted: chunk size and overlap in latent frames, causal or not, feature dim F."""

    chunk_frames: int
    overlap_frames: int
    causal: bool
    feature_dim: int


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] as is; [G, N, D] -> [G, 1, N, D]."""
    return x if x.dim() == 4 else x.unsqueeze(1)


def restore_rank(out: torch.Tensor, rank: int) -> torch.Tensor:
    return out if rank == 4 else out.squeeze(1)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query keys/values [B, Hkv, N, D] -> [B, heads, N, D] (each kv head serves heads/Hkv queries)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def key_bias(mask: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Additive per-key bias from a mask broadcast over queries; -1e4 where masked."""
    if kind == "keep":
        bias = torch.where(mask, 0.0, MASK_BIAS)
    elif kind == "drop":
        bias = torch.where(mask, MASK_BIAS, 0.0)
    else:
        bias = mask.clamp(min=MASK_BIAS)
    return bias.to(dtype)


def fold_key_mask(q, k, v, mask, kind: str, scale: float, score_rank: int = 4):
    """q' = [q, 1], k' = [k, bias/scale], v' = [v, 0]: scale * q'.k' = scale * q.k + bias.
    ``mask`` broadcasts against the site's scores (rank ``score_rank``: 4, or 3 for [B*H, N, N])."""
    bias = key_bias(mask, kind, q.dtype)
    while bias.dim() < score_rank:
        bias = bias.unsqueeze(0)
    if score_rank == 3:
        bias = bias.unsqueeze(1)
    b, h, n = q.shape[0], q.shape[1], k.shape[2]
    column = (bias / scale).expand(b, h, 1, n).transpose(-1, -2)
    q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
    k = torch.cat([k, column.to(k.dtype)], dim=-1)
    v = torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)
    return q, k, v


def drop_mask_column(out: torch.Tensor) -> torch.Tensor:
    return out[..., :-1]


def extra_after_in_graph(q: torch.Tensor, frames, dim: int, patch: int, extra_before: int,
                         tokens_per_frame: int) -> int:
    """N - offset - T*M for sequences whose extra token count depends on data; ``frames`` is the token
    frame count, or the frame input tensor (T = its size along ``dim`` // ``patch``)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.shape[dim] // patch
    return q.shape[2] - extra_before - tokens_per_frame * frames


def softmax_attention(q, k, v, scale: float):
    """The teacher's canonical form: plain softmax attention on [B, H, N, D]."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _fake_val(fn, *args, **kwargs):
    """Run ``fn`` on the FakeTensors in ``args`` (from ``meta["val"]``) to get the new node's ``val``."""
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    mode = detect_fake_mode([v for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)])
    if mode is None:
        return None
    try:
        with mode:
            return fn(*vals, **kwargs)
    except Exception:  # meta is advisory; a missing val never breaks the rewrite
        return None


def _call(graph: fx.Graph, fn, args, like: fx.Node, meta_fn=None) -> fx.Node:
    node = graph.call_function(fn, tuple(args))
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    val = _fake_val(meta_fn or fn, *args)
    if val is not None:
        node.meta["val"] = val
    return node


def _frame_input(gm: fx.GraphModule, frame_axis) -> fx.Node | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = getattr(frame_axis, "flat_index", None)
    return placeholders[index] if index is not None and index < len(placeholders) else None


def rewrite_site(gm: fx.GraphModule, site: Site, options: ConversionOptions | None, frame_axis=None) -> fx.Node:
    """Rewrite one accepted site; ``options=None`` makes the teacher form (softmax attention)."""
    graph, match, layout = gm.graph, site.match, site.layout
    anchor = match.output
    rank = match.q.meta["val"].dim()
    with graph.inserting_before(anchor):
        q = _call(graph, heads_first, [match.q], anchor)
        k_src = match.k
        if k_src is None:
            k_src = _call(graph, torch.transpose, [match.k_t, -1, -2], anchor)
        k = _call(graph, heads_first, [k_src], anchor)
        v = _call(graph, heads_first, [match.v], anchor)
        if site.kv_heads is not None and site.heads is not None and site.kv_heads != site.heads:
            k = _call(graph, repeat_kv, [k, site.heads], anchor)
            v = _call(graph, repeat_kv, [v, site.heads], anchor)
        q_in, k_in, v_in = q, k, v
        if match.mask is not None:
            folded = _call(graph, fold_key_mask, [q, k, v, match.mask, match.mask_kind, site.scale, rank], anchor)
            q_in, k_in, v_in = (_call(graph, _getitem, [folded, i], anchor) for i in range(3))
        if options is None:
            out = _call(graph, softmax_attention, [q_in, k_in, v_in, site.scale], anchor)
        else:
            fq = graph.call_module(f"feature_maps.{site.key}.phi_q", (q,))
            fk = graph.call_module(f"feature_maps.{site.key}.phi_k", (k,))
            for features, source in ((fq, q), (fk, k)):
                val = _fake_val(lambda x: x.new_empty(*x.shape[:-1], options.feature_dim), source)
                if val is not None:
                    features.meta["val"] = val
            extra_after = layout.extra_after
            if extra_after is None:
                frames = _frame_input(gm, frame_axis) if frame_axis.dynamic else layout.frames
                if frames is None:
                    raise ValueError(f"site {site.name}: data-dependent extra tokens need the frame input")
                extra_after = _call(graph, extra_after_in_graph,
                                    [q_in, frames, frame_axis.dim, frame_axis.patch, layout.extra_before,
                                     layout.tokens_per_frame], anchor)
            call = HybridCall(q_in, k_in, v_in, fq, fk, layout.tokens_per_frame, options.chunk_frames,
                              options.overlap_frames, options.causal, layout.extra_before, extra_after,
                              float(site.scale))
            out = _call(graph, HYBRID_OP, call.to_args(), anchor, meta_fn=lambda q_, *rest: torch.empty_like(q_))
        out.meta["rehyat_site"] = site.name
        result = out
        if match.mask is not None:
            result = _call(graph, drop_mask_column, [result], anchor)
        result = _call(graph, restore_rank, [result, rank], anchor)
    anchor.replace_all_uses_with(result)
    _erase_dead(graph, match.interior + [anchor])
    return out


def _getitem(x, i):
    return x[i]


def _erase_dead(graph: fx.Graph, nodes) -> None:
    """Erase the site's old nodes once nothing reads them (fused SDPA: its unused getitems first)."""
    pending = list(dict.fromkeys(nodes))
    for node in list(pending):
        spelling = spelling_of(node)
        if spelling is not None and spelling.family == "fused-sdpa":
            pending += [u for u in node.users if not u.users]
    changed = True
    while changed:
        changed = False
        for node in pending:
            if not getattr(node, "_erased", False) and not node.users:
                graph.erase_node(node)
                changed = True


def rewrite_attention(gm: fx.GraphModule, sites: list[Site], options: ConversionOptions | None,
                      frame_axis=None) -> fx.GraphModule:
    """Rewrite every site in ``sites`` (all must be rewritable: checked before anything changes) and
    recompile ``gm``. What only the old attention read (q @ kT, its scale and mask) is removed, so no
    quadratic work is left behind."""
    declined = [s for s in sites if not s.rewritable]
    if declined:
        raise ValueError(f"site {declined[0].name} is not rewritable: {declined[0].reason}")
    for site in sites:
        rewrite_site(gm, site, options, frame_axis)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
