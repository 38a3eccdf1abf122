"""Permutes within the rank Qualcomm's HTP takes.

QNN's HTP backend refuses every tensor of rank above :data:`HTP_MAX_RANK` (measured with
onnxruntime-qnn 2.7.0 on the HTP simulator, v79: Reshape, Transpose, Mul, Gelu, ReduceSum of rank 5
ran on HTP, the same ops at rank 6 were all left for the CPU). Permutes are where high ranks come
from: unfold's windows ``[B,H,nC,M,D,Tc+To]`` in the hybrid op's decomposition, the 8-D
``(f, h, w, pt, ph, pw, c)`` unpatchify of video DiTs. Each rewrite is exact:

* a permute of a permute is one permute, and an identity permute is dropped;
* a permute of rank above the limit is ``reshape -> permute -> reshape`` on the coalesced shape:
  size-1 dims dropped and input dims that stay neighbours in the output merged, e.g.
  ``[1,5,4,4,1,2,2,4].permute(0,7,1,4,2,5,3,6)`` is a rank-5 transpose of ``[20,4,2,2,4]``.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from .emit import emit

aten = torch.ops.aten
HTP_MAX_RANK = 5
PERMUTE = aten.permute.default


def coalesce_permutation(shape, perm) -> tuple[list[int], list[int]]:
    """(shape, perm) of the smallest-rank permute equal to ``x.permute(perm)`` for ``x`` of
    ``shape`` up to reshapes before and after: size-1 dims dropped, runs of input dims that stay
    adjacent and in order in the output merged into one dim."""
    kept = [d for d in range(len(shape)) if shape[d] != 1]
    position = {d: i for i, d in enumerate(kept)}
    order = [position[d] for d in perm if shape[d] != 1]   # kept input positions in output order
    groups: list[list[int]] = []
    for p in order:
        if groups and p == groups[-1][-1] + 1:
            groups[-1].append(p)
        else:
            groups.append([p])
    by_input = sorted(range(len(groups)), key=lambda g: groups[g][0])
    merged_shape = [math.prod(shape[kept[p]] for p in groups[g]) for g in by_input]
    merged_perm = [by_input.index(g) for g in range(len(groups))]
    return merged_shape, merged_perm


def _dims(node: fx.Node) -> list[int]:
    rank = node.args[0].meta["val"].dim()
    return [d % rank for d in node.args[1]]


def compose_permutes(graph: fx.Graph) -> int:
    """``permute(permute(x, a), b)`` -> ``permute(x, [a[i] for i in b])``; identity permutes
    dropped. Returns how many nodes changed."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not PERMUTE:
            continue
        source, dims = node.args[0], _dims(node)
        if isinstance(source, fx.Node) and source.op == "call_function" and source.target is PERMUTE:
            inner = _dims(source)
            dims = [inner[d] for d in dims]
            node.args = (source.args[0], dims)
            changed += 1
        if dims == list(range(len(dims))):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed += 1
    graph.eliminate_dead_code()
    return changed


def lower_permute_rank(graph: fx.Graph, max_rank: int = HTP_MAX_RANK) -> int:
    """Every permute of rank above ``max_rank`` as reshape -> coalesced permute -> reshape (no
    permute when the coalesced one is the identity). Returns how many permutes were rewritten; a
    permute that stays above ``max_rank`` after coalescing is left for the rank check to name."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not PERMUTE:
            continue
        source = node.args[0]
        shape = [int(s) for s in source.meta["val"].shape]
        if len(shape) <= max_rank:
            continue
        merged_shape, merged_perm = coalesce_permutation(shape, _dims(node))
        if len(merged_shape) > max_rank:
            continue
        with graph.inserting_before(node):
            moved = emit(graph, aten.reshape.default, (source, merged_shape), node)
            if merged_perm != list(range(len(merged_perm))):
                moved = emit(graph, PERMUTE, (moved, merged_perm), node)
            back = emit(graph, aten.reshape.default, (moved, [int(s) for s in node.meta["val"].shape]), node)
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        changed += 1
    return changed
