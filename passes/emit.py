"""Adding nodes to an exported aten graph with their ``meta`` right (not a pass: passes use it).

Later passes and the ONNX exporter read ``meta["val"]`` (shape, dtype), so a new node gets the fake
value its op computes on its inputs' fake values, plus the provenance (``nn_module_stack``, stack
trace) of the node it stands in for.
"""
from __future__ import annotations

from torch import fx
from torch.utils import _pytree

from .canonicalize import _copy_meta


def _fake(arg):
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


def emit(graph: fx.Graph, target, args: tuple, like: fx.Node, kwargs: dict | None = None) -> fx.Node:
    """``graph.call_function(target, args, kwargs)`` at the graph's current insertion point, its
    ``meta["val"]`` computed from the inputs' fake values and provenance copied from ``like``."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    val = target(*_pytree.tree_map(_fake, args), **_pytree.tree_map(_fake, kwargs))
    return _copy_meta(node, like, val)
