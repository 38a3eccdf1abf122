"""Classify a found attention: self / joint over video tokens, cross-attention, or not video.

Shapes are read from ``meta["val"]``; with a symbolic frame axis a sequence length is a sympy
expression in the frame symbol ``s``. Returns ``(kind, reason)``: kind in {"self", "cross"} (joint
is decided by :mod:`infer_video_layout`, once the extra tokens are counted); reason is "" when the
site may be converted, else why it is declined.
"""
from __future__ import annotations

import sympy
import torch

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


def classify_attention(match: AttentionMatch, symbol: sympy.Symbol | None) -> tuple[str, str]:
    q = match.q.meta["val"]
    n_q, n_k = as_expr(q.shape[-2]), as_expr(key_length(match))
    difference = sympy.simplify(n_q - n_k)
    if difference != 0 and (difference.is_number or not _same_source(match)):
        return "cross", f"cross-attention: {n_q} queries attend to {n_k} keys of another sequence (left as is)"
    if match.is_causal:
        return "self", "already causal (is_causal=True): a causal mask over all tokens is not the hybrid pattern"
    if symbol is not None and symbol not in n_q.free_symbols:
        batch = [as_expr(d) for d in q.shape[:-2]]
        if any(symbol in d.free_symbols for d in batch):
            return "self", (f"factorised spatial-only attention: the sequence ({n_q} tokens) has no time axis, "
                            f"frames sit in the batch")
        return "self", f"not over video tokens: sequence length {n_q} does not grow with the frames"
    return "self", ""
