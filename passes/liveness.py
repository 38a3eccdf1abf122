"""Liveness walk over an FX graph: how many activation bytes are alive while each node runs.

Works on storages, not tensors, so views (reshape, permute, slices, ``chunk`` outputs) cost nothing
and keep their base alive until their own last use. Inputs of the graph are alive from the start
until their last use, its outputs until the end. Weights (parameters, buffers, constants) are
excluded: they are reported separately and do not depend on the video length. Sizes are whatever
``nbytes`` returns, so they can be sympy expressions in the number of frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Graph, Node
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves


def storage_key(t: torch.Tensor) -> StorageWeakRef:
    """Identity of the storage under ``t`` (shared by all views of one allocation)."""
    return StorageWeakRef(t.untyped_storage())


def _storages(value) -> dict[StorageWeakRef, torch.Tensor]:
    return {storage_key(t): t for t in tree_leaves(value) if isinstance(t, torch.Tensor)}


@dataclass(frozen=True)
class Liveness:
    """``live[name]``: bytes alive while node ``name`` runs (its inputs, its outputs, everything
    still needed later, plus its own transient workspace). ``candidates``: the distinct values."""

    live: dict[str, Any]
    candidates: list[Any]


def activation_liveness(graph: Graph, values: dict[Node, Any], nbytes: Callable[[torch.Tensor], Any],
                        weights: set[Node], workspace: dict[Node, Any] | None = None) -> Liveness:
    """Walk ``graph`` in order with the runtime (fake) ``values`` of every node.

    nbytes(t): size of the storage under tensor t; weights: placeholder/get_attr nodes whose storages
    are never counted; workspace[node]: extra bytes the node needs only while it runs.
    """
    workspace = workspace or {}
    nodes = list(graph.nodes)
    excluded = {key for n in weights for key in _storages(values.get(n))}
    last_use: dict[StorageWeakRef, int] = {}
    node_storages: list[dict[StorageWeakRef, torch.Tensor]] = []
    for i, node in enumerate(nodes):
        own = _storages(values.get(node)) if node.op != "output" else {}
        node_storages.append(own)
        used = list(own)
        for arg in node.all_input_nodes:
            used.extend(_storages(values.get(arg)))
        for key in used:
            last_use[key] = len(nodes) if node.op == "output" else max(last_use.get(key, -1), i)

    alive: dict[StorageWeakRef, Any] = {}
    total: Any = 0  # running sum of alive.values(), kept incrementally: sizes are sympy
    live: dict[str, Any] = {}
    for i, node in enumerate(nodes):
        for key, t in node_storages[i].items():
            if key not in excluded and key not in alive:
                alive[key] = nbytes(t)
                total += alive[key]
        if node.op in ("call_function", "call_method", "call_module"):
            live[node.name] = total + workspace.get(node, 0)
        for key in [k for k in alive if last_use.get(k, -1) <= i]:
            total -= alive.pop(key)
    return Liveness(live, list(dict.fromkeys(live.values())))
