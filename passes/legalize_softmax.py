"""Softmax without infinities, for quantised HTP graphs.

PyTorch's SDPA decomposition writes attention as ``_softmax(scores + where(mask, 0, -inf))``
followed by the "safe softmax" guard ``where(all(scores == -inf), 0, softmax)``. Both put ``-inf``
into activations, and a w8a16 (QDQ) model calibrates a range for every activation: a range reaching
``-inf`` gives a NaN scale (measured: onnxruntime.quantization 1.32 on the tiny Wan2.1). Rewrites:

* the guard is dropped (``where(...)`` -> the softmax it guards). Equal unless a row's every score
  is ``-inf``: the hybrid op's windows always hold the query's own frame, so none is;
* an additive boolean mask becomes a multiplicative one,
  ``e = exp(s - max(s)) * mask; e / sum(e)``: equal to the masked softmax for any row with a valid
  key, as long as the valid scores are within ~80 of the row's max (fp32 ``exp`` does not underflow).
"""
from __future__ import annotations

import math

import torch
from torch import fx

from .emit import emit

aten = torch.ops.aten
SOFTMAX = aten._softmax.default


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _constant(arg) -> float | None:
    """The value of a python number or a ``scalar_tensor`` / ``full`` / ``full_like`` node, else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if _is(arg, aten.scalar_tensor.default) or _is(arg, aten.full.default) or _is(arg, aten.full_like.default):
        return float(arg.args[1] if arg.target is not aten.scalar_tensor.default else arg.args[0])
    return None


def _guarded_softmax(node: fx.Node) -> fx.Node | None:
    """The softmax of a safe-softmax guard ``where(not(any(not(eq(x, -inf)))), 0, softmax(x))``."""
    if not _is(node, aten.where.self) or len(node.args) != 3:
        return None
    cond, zero, soft = node.args
    if not (_is(soft, SOFTMAX) and _constant(zero) == 0.0 and _is(cond, aten.logical_not.default)):
        return None
    any_valid = cond.args[0]
    if not _is(any_valid, aten.any.dim) or not _is(any_valid.args[0], aten.logical_not.default):
        return None
    eq = any_valid.args[0].args[0]
    if _is(eq, aten.eq.Scalar) and eq.args[0] is soft.args[0] and eq.args[1] == -math.inf:
        return soft
    return None


def drop_softmax_guards(graph: fx.Graph) -> int:
    """Replace every safe-softmax guard by its softmax; returns how many. Dead nodes removed."""
    changed = 0
    for node in list(graph.nodes):
        soft = _guarded_softmax(node)
        if soft is not None:
            node.replace_all_uses_with(soft)
            graph.erase_node(node)
            changed += 1
    graph.eliminate_dead_code()
    return changed


def _additive_mask(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(scores, bool mask) of ``_softmax(scores + where(mask, 0, -inf))``, else None."""
    total = node.args[0]
    if not _is(total, aten.add.Tensor):
        return None
    for scores, bias in (total.args, total.args[::-1]):
        if (_is(bias, aten.where.self) and _constant(bias.args[1]) == 0.0 and _constant(bias.args[2]) == -math.inf
                and isinstance(scores, fx.Node)):
            return scores, bias.args[0]
    return None


def multiplicative_masks(graph: fx.Graph) -> int:
    """Every softmax of scores plus a ``{0, -inf}`` mask as ``exp(s - max s) * mask / sum``;
    returns how many."""
    changed = 0
    for node in list(graph.nodes):
        if not _is(node, SOFTMAX):
            continue
        found = _additive_mask(node)
        if found is None:
            continue
        scores, mask = found
        dim = node.args[1]
        with graph.inserting_before(node):
            peak = emit(graph, aten.amax.default, (scores, [dim], True), node)
            e = emit(graph, aten.exp.default, (emit(graph, aten.sub.Tensor, (scores, peak), node),), node)
            weight = emit(graph, aten._to_copy.default, (mask,), node, {"dtype": scores.meta["val"].dtype})
            kept = emit(graph, aten.mul.Tensor, (e, weight), node)
            total = emit(graph, aten.sum.dim_IntList, (kept, [dim], True), node)
            out = emit(graph, aten.div.Tensor, (kept, total), node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed += 1
    graph.eliminate_dead_code()
    return changed
