"""Classify a found attention: self / joint over video tokens, cross-attention, or not video.

Shapes are read from ``meta["val"]``; with a symbolic frame axis a sequence length is a sympy
expression in the frame symbol ``s``. :func:`classify_attention` returns ``(kind, decline)``: kind
in {"self", "cross"} (joint is decided by :mod:`infer_video_layout`, once the extra tokens are
counted); decline is None when the site may be converted. :func:`classify_site` is the pipeline's
"classify" pass on one site: the kind, then what the hybrid op cannot take (symbolic or unequal
head dims, uneven grouped heads, masks that vary per query).
"""
from __future__ import annotations

from dataclasses import replace

import sympy
import torch

from ..declines import Decline, describe_size
from ..site import Site
from .find_attention import AttentionMatch


def as_expr(x) -> sympy.Expr:
    """A shape entry (int or SymInt) as a sympy expression."""
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return sympy.Integer(int(x))


def key_length(match: AttentionMatch):
    """Nk from k ([.., Nk, D]) or k_t ([.., D, Nk])."""
    if match.k is not None:
        return match.k.meta["val"].shape[-2]
    return match.k_t.meta["val"].shape[-1]


def _same_source(match: AttentionMatch, limit: int = 40) -> bool:
    """True when q and k are computed from one token tensor a few ops up (both from x by to_q/to_k).

    Used only when the two lengths differ by data-dependent symbols that sympy cannot compare (each
    data-dependent slice gets a fresh symbol, Framepack): a shared >= 3-D activation above both means
    self-attention over one sequence."""
    def above(node):
        seen, queue = {node}, [node]
        while queue and len(seen) < limit:
            for parent in queue.pop(0).all_input_nodes:
                if parent not in seen:
                    seen.add(parent)
                    queue.append(parent)
        return {n for n in seen if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                and n.meta["val"].dim() >= 3}

    k = match.k if match.k is not None else match.k_t
    return bool(above(match.q) & above(k))


def classify_attention(match: AttentionMatch, symbol: sympy.Symbol | None,
                       patch: int = 1) -> tuple[str, Decline | None]:
    q = match.q.meta["val"]
    n_q, n_k = as_expr(q.shape[-2]), as_expr(key_length(match))

    def words(size):
        return describe_size(size, symbol, patch)

    difference = sympy.simplify(n_q - n_k)
    if difference != 0 and (difference.is_number or not _same_source(match)):
        return "cross", Decline("cross-attention", f"cross-attention: {words(n_q)} of queries attend to "
                                f"{words(n_k)} of keys of another sequence (left as is)")
    if match.is_causal:
        return "self", Decline("already-causal", "already causal (is_causal=True): a causal mask over all tokens "
                               "is not the hybrid pattern")
    if symbol is not None and symbol not in n_q.free_symbols:
        batch = [as_expr(d) for d in q.shape[:-2]]
        if any(symbol in d.free_symbols for d in batch):
            return "self", Decline("factorised", f"factorised spatial-only attention: the sequence ({words(n_q)}) "
                                   "has no time axis, frames sit in the batch")
        return "self", Decline("not-over-video", f"not over video tokens: sequence length {words(n_q)} does not "
                               "grow with the frames")
    return "self", None


def _int_or_none(x):
    expr = as_expr(x)
    return int(expr) if expr.is_Integer else None


def classify_site(site: Site, symbol, patch: int = 1) -> Site:
    """The site with its kind, or declined with the reason the hybrid op cannot take it."""
    match = site.match
    kind, decline = classify_attention(match, symbol, patch)
    site = replace(site, kind=kind, decline=decline)
    if decline is not None:
        return site
    if site.head_dim is None:
        return site.declined("head-dims", "head dim is not a fixed number")
    vval = match.v.meta["val"]
    if _int_or_none(vval.shape[-1]) != site.head_dim:
        value_dim = _int_or_none(vval.shape[-1])
        words = value_dim if value_dim is not None else f"({describe_size(vval.shape[-1], symbol, patch, 'channels')})"
        return site.declined("head-dims", f"value head dim {words} differs from q/k head dim {site.head_dim}")
    if site.kv_heads is not None and site.heads is not None and site.heads % site.kv_heads:
        return site.declined("grouped-heads", f"{site.heads} query heads are not a multiple of {site.kv_heads} "
                             "key/value heads")
    if match.mask is not None:
        mask = match.mask.meta.get("val")
        if not isinstance(mask, torch.Tensor) or (mask.dim() >= 2 and _int_or_none(mask.shape[-2]) != 1):
            return site.declined("query-dependent-mask", "query-dependent attention mask: only key masks (broadcast "
                                 "over queries) can be kept, the hybrid op has no general mask")
    return site
