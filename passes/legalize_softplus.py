"""Softplus as the one ``Softplus`` op HTP runs quantised.

Core aten writes ``softplus(x, beta, threshold)`` as ``where(x*beta > threshold, x,
log1p(exp(x*beta)) / beta)``. Quantised (w8a16) on QNN's HTP that returned zeros: HTP's quantised
``Log`` does (measured, onnxruntime-qnn 2.7.0, HTP v79 simulator: a lone ``Log`` on [0.5, 12] was off
by 3.2, more than its largest output, while fp16 was within 1.3e-3), and ``exp(x*beta)`` has an
unbounded range to calibrate. ONNX's ``Softplus`` is one QNN op (a lone one: w8a16 within 0.012 of
outputs up to 8.9). The rewrite puts ``aten.softplus(x, beta, threshold)`` back, which the ONNX
exporter writes as ``Softplus``; the same function, exactly.
"""
from __future__ import annotations

import torch
from torch import fx

from .emit import emit

aten = torch.ops.aten


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _softplus_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, float | None] | None:
    """(x, t = x*beta, beta or None) of a decomposed softplus ``where`` node, else None."""
    if not _is(node, aten.where.self) or len(node.args) != 3:
        return None
    cond, x, soft = node.args
    if not _is(cond, aten.gt.Scalar):
        return None
    t = cond.args[0]
    beta = None
    if _is(soft, aten.div.Tensor) and isinstance(soft.args[1], (int, float)):
        beta, soft = float(soft.args[1]), soft.args[0]
    if not (_is(soft, aten.log1p.default) and _is(soft.args[0], aten.exp.default) and soft.args[0].args[0] is t):
        return None
    if beta is None and t is x:
        return x, t, None
    if beta is not None and _is(t, aten.mul.Tensor) and t.args[0] is x and t.args[1] == beta:
        return x, t, beta
    return None


def softplus_as_one_op(graph: fx.Graph) -> int:
    """Rewrite every decomposed softplus as one ``aten.softplus`` node; returns how many. Dead
    nodes removed."""
    changed = 0
    for node in list(graph.nodes):
        parts = _softplus_parts(node)
        if parts is None:
            continue
        x, t, beta = parts
        threshold = node.args[0].args[1]
        with graph.inserting_before(node):
            out = emit(graph, aten.softplus.default, (x, 1.0 if beta is None else beta, threshold), node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed += 1
    graph.eliminate_dead_code()
    return changed
