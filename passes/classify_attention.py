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


def classify_attention(match: AttentionMatch, symbol: sympy.Symbol | None) -> tuple[str, str]:
    q = match.q.meta["val"]
    n_q, n_k = as_expr(q.shape[-2]), as_expr(key_length(match))
    if sympy.simplify(n_q - n_k) != 0:
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
