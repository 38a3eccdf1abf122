"""Why an attention site is left as it is: ``Decline(code, detail)``, with an enumerated set of codes.

Every pass that declines a site returns one of these as data (never only prose): reports, the
README's model table (``scripts/supported_models.py``) and ``inspect(...).to_dict()`` read the
``code``; the ``detail`` is the sentence a user reads. Sizes in details are written in words and
numbers by :func:`describe_size` ("6 tokens per frame × T frames + 10"), never as raw shape symbols.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

# code -> what it means (the documented set; docs/architecture.md lists it too)
CODES: dict[str, str] = {
    "cross-attention": "keys come from another sequence (text, image); left as is",
    "linear-attention": "the module is already a linear attention: nothing quadratic to convert",
    "flex-attention": "flex_attention: its score_mod / block_mask cannot be expressed in the hybrid op",
    "cannot-export": "the model could not be captured as a graph",
    "already-causal": "is_causal=True over all tokens is not the hybrid pattern",
    "factorised": "spatial-only attention: frames sit in the batch, the sequence has no time axis",
    "not-over-video": "the sequence does not grow with the frames (text refiner, image tokens ...)",
    "query-dependent-mask": "the mask varies per query; only key masks (broadcast over queries) are kept",
    "not-frame-major": "video tokens are not frame-major, so chunks of the token axis would not be frames",
    "layout-unknown": "where the video sits in the token axis could not be derived from the graph",
    "attention-dropout": "attention dropout in training mode (only p=0 / eval converts)",
    "head-dims": "head dims are symbolic, or the value head dim differs from the q/k head dim",
    "grouped-heads": "query heads are not a multiple of the key/value heads",
    "not-attention": "a softmax that is not softmax(q @ kT) @ v over the key axis",
    "unsupported-rank": "q/k/v are not [B, H, N, D] or [B*H, N, D], or do not share batch/head dims",
}


@dataclass(frozen=True)
class Decline:
    """A site left unconverted: ``code`` (a key of :data:`CODES`) and ``detail`` (for the user)."""

    code: str
    detail: str

    def __post_init__(self):
        if self.code not in CODES:
            raise ValueError(f"Decline code must be one of {sorted(CODES)}, got {self.code!r}")

    def __str__(self) -> str:
        return self.detail

    def to_dict(self) -> dict:
        return {"code": self.code, "detail": self.detail}


T_WORDS = sympy.Symbol("T", integer=True, positive=True)


def describe_size(size, frame_symbols=(), patch: int = 1, unit: str = "tokens") -> str:
    """A size (int, SymInt or sympy expression in the export's input-frame symbol) in words.

    ``frame_symbols``: the export symbols counting input frames; token frames T = symbol / patch.
    Affine sizes read "M tokens per frame × T frames + E"; other frame symbols become T; any other
    symbol (a data-dependent count) reads "a data-dependent number"."""
    expr = size.node.expr if hasattr(size, "node") else sympy.sympify(size)
    if frame_symbols is None:
        frame_symbols = ()
    elif isinstance(frame_symbols, sympy.Symbol):
        frame_symbols = (frame_symbols,)
    expr = sympy.expand(expr.subs({s: patch * T_WORDS for s in frame_symbols if s is not None}))
    if expr.is_Integer:
        return f"{int(expr)} {unit}"
    others = expr.free_symbols - {T_WORDS}
    known = expr.subs({s: 0 for s in others})
    data = " + a data-dependent number" if others else ""
    try:
        poly = sympy.Poly(known, T_WORDS) if known.free_symbols else None
    except sympy.PolynomialError:  # floor(T/2) and the like: written out in T
        return f"{sympy.sstr(known)} {unit} (T frames){data}"
    if poly is None:
        base = f"{int(known)} {unit}" if known != 0 else ""
        return (base + data).lstrip(" +") if base else f"a data-dependent number of {unit}"
    coeffs = dict(zip((m[0] for m in poly.monoms()), poly.coeffs()))
    if set(coeffs) <= {0, 1} and coeffs.get(1, 0) > 0:
        words = f"{coeffs[1]} {unit} per frame × T frames"
        if coeffs.get(0, 0):
            words += f" {'+' if coeffs[0] > 0 else '-'} {abs(coeffs[0])}"
        return words + data
    terms = " + ".join(f"{c}·T^{d}" if d > 1 else (f"{c}·T" if d == 1 else str(c))
                       for d, c in sorted(coeffs.items(), reverse=True))
    return f"{terms} {unit} (T frames){data}"


def describe_shape(shape, frame_symbols=(), patch: int = 1) -> str:
    """A (symbolic) shape with every frame-dependent dim in words: ``[1, 2, (4 per frame × T frames), 8]``."""
    dims = []
    for d in shape:
        if isinstance(d, int) or (hasattr(d, "node") and d.node.expr.is_Integer):
            dims.append(str(int(d)))
        else:
            dims.append("(" + describe_size(d, frame_symbols, patch, unit="").replace("  ", " ").strip() + ")")
    return "[" + ", ".join(dims) + "]"


__all__ = ["CODES", "Decline", "describe_shape", "describe_size"]
