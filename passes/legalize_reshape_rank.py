"""Reshapes within the rank Qualcomm's HTP takes, and the check that names what is left.

A chain of reshape-like ops (``view``, ``reshape``, ``_unsafe_view``, ``squeeze``, ``unsqueeze``,
and the value-preserving ``clone`` / ``alias`` between them) is one reshape from the chain's
start to its end, so the high-rank shapes in its middle (the rank-6 ``[1,2,1,2,16,16]`` of the
hybrid op's unfold-as-stack, the rank-7 and rank-8 steps of Wan's unpatchify once
``legalize_permute_rank`` has coalesced the transposes) never exist as tensors. Exact: reshapes
only re-index contiguous values. :func:`high_rank_nodes` lists what still has a tensor of rank above
:data:`~rehyat_compile.passes.legalize_permute_rank.HTP_MAX_RANK` (the backend reports them by name).
"""
from __future__ import annotations

import torch
from torch import fx

from .canonicalize import _copy_meta
from .legalize_permute_rank import HTP_MAX_RANK

aten = torch.ops.aten
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
            aten.squeeze.dims, aten.squeeze.dim, aten.squeeze.default}
SAME_VALUES = {aten.clone.default, aten.alias.default}


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: fx.Node) -> list[int]:
    return [int(s) for s in node.meta["val"].shape]


def _chain_start(node: fx.Node) -> fx.Node:
    """The first tensor before ``node``'s chain of reshape-like and value-preserving ops."""
    source = node.args[0]
    while _is(source, RESHAPES | SAME_VALUES):
        source = source.args[0]
    return source


def fold_reshape_chains(graph: fx.Graph) -> int:
    """Each reshape-like node whose input comes from a reshape-like chain becomes one
    ``aten.reshape`` of the chain's start (a reshape to the same shape is dropped). Returns how many
    nodes changed; dead chain members are removed."""
    changed = 0
    for node in list(graph.nodes):
        if not _is(node, RESHAPES):
            continue
        start = _chain_start(node)
        if start is node.args[0] and node.target is aten.reshape.default:
            if _shape(start) == _shape(node):
                node.replace_all_uses_with(start)
                graph.erase_node(node)
                changed += 1
            continue
        if _shape(start) == _shape(node):
            node.replace_all_uses_with(start)
        else:
            with graph.inserting_before(node):
                new = graph.call_function(aten.reshape.default, (start, _shape(node)))
            _copy_meta(new, node)
            node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed += 1
    graph.eliminate_dead_code()
    return changed


def high_rank_nodes(graph: fx.Graph, max_rank: int = HTP_MAX_RANK) -> list[tuple[str, str, tuple[int, ...]]]:
    """(node name, op, shape) of every node whose output is a tensor of rank above ``max_rank``."""
    found = []
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op in ("call_function", "placeholder") and isinstance(val, torch.Tensor) and val.dim() > max_rank:
            found.append((node.name, str(node.target), tuple(int(s) for s in val.shape)))
    return found
