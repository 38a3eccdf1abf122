"""The one table of how softmax attention is spelled in exported graphs.

``find_attention`` (what to match), the cost model (which nodes are attention kernels) and the
stream check (what mixes every key into every query, so cannot run chunk by chunk) all read this
table; a spelling added here is known to all three.

Each :class:`Spelling` names an op target, the family it belongs to and where its keys are:

* ``sdpa``: ``aten.scaled_dot_product_attention`` (the decomposable composite);
* ``fused-sdpa``: the fused CPU flash, CUDA flash / efficient / cuDNN kernels (output 0 is the
  attention result; their mask, dropout, causal and scale arguments are read by schema name);
* ``softmax``: ``_softmax``, ``softmax.int``, ``_safe_softmax`` (the anchor of the manual
  ``softmax(q @ kT) @ v`` pattern; the mixed axis is the softmax dim);
* ``flex``: the ``flex_attention`` higher-order op (declined: score_mod / block_mask);
* ``hybrid``: ``rehyat::hybrid_attention`` itself (converted; mixes only within the window).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .op import HYBRID_OP

aten = torch.ops.aten


@dataclass(frozen=True)
class Spelling:
    """One way attention appears in a graph: ``form`` is the name reports use."""

    target: object
    form: str
    family: str  # "sdpa" | "fused-sdpa" | "softmax" | "flex" | "hybrid"


def _fused(name: str, form: str):
    op = getattr(aten, name, None)
    return None if op is None else Spelling(op.default, form, "fused-sdpa")


_SPELLINGS = [
    Spelling(aten.scaled_dot_product_attention.default, "sdpa", "sdpa"),
    _fused("_scaled_dot_product_flash_attention_for_cpu", "sdpa-flash-cpu"),
    _fused("_scaled_dot_product_flash_attention", "sdpa-flash"),
    _fused("_scaled_dot_product_efficient_attention", "sdpa-efficient"),
    _fused("_scaled_dot_product_cudnn_attention", "sdpa-cudnn"),
    Spelling(aten._softmax.default, "softmax", "softmax"),
    Spelling(aten.softmax.int, "softmax", "softmax"),
    Spelling(aten._safe_softmax.default, "safe-softmax", "softmax"),
    Spelling(torch.ops.higher_order.flex_attention, "flex_attention", "flex"),
    Spelling(HYBRID_OP, "hybrid", "hybrid"),
]
SPELLINGS: dict = {s.target: s for s in _SPELLINGS if s is not None}

SDPA_FAMILIES = ("sdpa", "fused-sdpa")
# Families whose output is one attention kernel (the cost model counts them as fused kernels).
KERNEL_FAMILIES = ("sdpa", "fused-sdpa", "flex", "hybrid")


def spelling_of(node) -> Spelling | None:
    """The table entry of ``node``'s target, or None (not an attention op)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return SPELLINGS.get(node.target)


def targets(*families: str) -> set:
    """The op targets of the given families (all when none given)."""
    return {t for t, s in SPELLINGS.items() if not families or s.family in families}


def bound_arguments(node: fx.Node) -> dict:
    """``{argument name: value}`` of an aten op node, defaults filled in from its schema."""
    schema = node.target._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


@dataclass(frozen=True)
class SdpaCall:
    """An SDPA-family node's arguments, by meaning (whatever the variant's argument order)."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: object
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    output: fx.Node | None  # the node whose value is the attention result (getitem 0 of fused kernels)

    @classmethod
    def from_node(cls, node: fx.Node) -> "SdpaCall":
        spelling = spelling_of(node)
        if spelling is None or spelling.family not in SDPA_FAMILIES:
            raise TypeError(f"node {node.name} ({node.target}) is not scaled-dot-product attention")
        a = bound_arguments(node)
        mask = a.get("attn_mask", a.get("attn_bias"))
        if spelling.family == "sdpa":
            output = node
        else:
            output = next((u for u in node.users if u.target == operator.getitem and u.args[1] == 0), None)
        return cls(a["query"], a["key"], a["value"], mask, a.get("dropout_p") or 0.0, bool(a.get("is_causal")),
                   a.get("scale"), bool(a.get("enable_gqa", False)), output)


def mixed_axis(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(tensor node, dim) whose every entry reaches every query of an attention node: the keys of
    SDPA-family and flex nodes, the softmax dim of a softmax; None for other nodes and for the hybrid
    op (which mixes only within its window and carries the rest as state)."""
    spelling = spelling_of(node)
    if spelling is None or spelling.family == "hybrid":
        return None
    if spelling.family in SDPA_FAMILIES:
        return SdpaCall.from_node(node).k, -2
    if spelling.family == "flex":
        return node.args[1], -2  # flex_attention(query, key, value, score_mod, block_mask, ...)
    dim = bound_arguments(node)["dim"]
    return node, dim


__all__ = ["KERNEL_FAMILIES", "SDPA_FAMILIES", "SPELLINGS", "SdpaCall", "Spelling", "bound_arguments",
           "mixed_axis", "spelling_of", "targets"]
