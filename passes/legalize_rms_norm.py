"""RMS normalisation as a LayerNorm, for quantised HTP graphs.

Core aten writes RMSNorm as ``x * rsqrt(mean(x**2, -1) + eps)``, which reaches ONNX as ``Sqrt`` +
``Reciprocal``. Quantised (w8a16) on QNN's HTP the ``Reciprocal`` of a small mean square is far off
(measured on the tiny Wan2.1's step graph, HTP v79 simulator: the cross-attention key norm's
reciprocal 5.7 off outputs of 7.1, where ONNX Runtime's CPU run of the same QDQ model was close),
and every key downstream with it. HTP's LayerNorm is one op that stays accurate quantised, and
``LayerNorm([x, -x])[..., :n] = x / sqrt(mean(x**2) + eps)`` exactly (the concatenation has zero
mean and variance ``mean(x**2)``), so the pattern becomes that.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .emit import emit

aten = torch.ops.aten


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _rms_parts(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(x, eps) of ``mul(x, rsqrt(add(mean(pow(x, 2), [-1], keepdim), eps)))``, else None."""
    if not _is(node, aten.mul.Tensor):
        return None
    for x, scale in (node.args, node.args[::-1]):
        if not _is(scale, aten.rsqrt.default) or not _is(scale.args[0], aten.add.Scalar):
            continue
        mean, eps = scale.args[0].args
        if not _is(mean, aten.mean.dim) or not _is(mean.args[0], aten.pow.Tensor_Scalar):
            continue
        square = mean.args[0]
        rank = x.meta["val"].dim() if isinstance(x, fx.Node) else 0
        dims = [d % rank for d in mean.args[1]] if rank else None
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if square.args[0] is x and square.args[1] == 2 and dims == [rank - 1] and keepdim:
            return x, float(eps)
    return None


def rms_norm_as_layer_norm(graph: fx.Graph) -> int:
    """Rewrite every last-dim RMS normalisation as ``native_layer_norm(cat([x, -x]))[..., :n]``;
    returns how many. Dead nodes removed."""
    changed = 0
    for node in list(graph.nodes):
        parts = _rms_parts(node)
        if parts is None:
            continue
        x, eps = parts
        width = int(x.meta["val"].shape[-1])
        with graph.inserting_before(node):
            mirrored = emit(graph, aten.cat.default, ([x, emit(graph, aten.neg.default, (x,), node)], -1), node)
            normed = emit(graph, aten.native_layer_norm.default, (mirrored, [2 * width], None, None, eps), node)
            first = emit(graph, operator.getitem, (normed, 0), node)
            out = emit(graph, aten.slice.Tensor, (first, -1, 0, width), node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed += 1
    graph.eliminate_dead_code()
    return changed
