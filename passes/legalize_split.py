"""Splits as static slices: ``aten.split_with_sizes`` / ``aten.split`` followed by ``getitem`` become
one ``aten.slice`` per piece.

Why: ONNX export writes a split whose pieces are read by ``getitem`` as ``SplitToSequence`` +
``SequenceAt``, and QNN's HTP backend takes no sequence ops (measured: onnxruntime-qnn 2.7.0, HTP v79,
every such node was left for the CPU). A slice is the same values, exactly.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .canonicalize import _copy_meta

aten = torch.ops.aten
SPLITS = (aten.split_with_sizes.default, aten.split.Tensor)


def _piece_bounds(node: fx.Node) -> tuple[int, list[tuple[int, int]]]:
    """(dim, [(start, stop) per piece]) of a split node; sizes from its input's static shape."""
    source = node.args[0].meta["val"]
    sizes = node.args[1]
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % source.dim()
    length = int(source.shape[dim])
    if node.target is aten.split.Tensor:  # one size: equal pieces, the last may be shorter
        sizes = [min(int(sizes), length - start) for start in range(0, length, int(sizes))]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + int(size)))
        start += int(size)
    return dim, bounds


def split_as_slices(graph: fx.Graph) -> int:
    """Rewrite every split whose users are all ``getitem`` into slices; returns how many splits
    changed. Dead splits are removed."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SPLITS:
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            continue
        dim, bounds = _piece_bounds(node)
        for user in list(node.users):
            start, stop = bounds[user.args[1]]
            with graph.inserting_before(user):
                piece = graph.call_function(aten.slice.Tensor, (node.args[0], dim, start, stop, 1))
            _copy_meta(piece, user)
            user.replace_all_uses_with(piece)
            graph.erase_node(user)
        graph.erase_node(node)
        changed += 1
    return changed
