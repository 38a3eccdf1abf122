"""write_states_in_place: a step program that writes each new state into its state input, layer by layer.

A step program (:func:`~rehyat_compile.passes.thread_state.thread_state`, after
:func:`~rehyat_compile.passes.hoist_chunk_invariant.hoist_chunk_invariant`) returns
``(*outputs, *new states)``; the new states are fresh tensors, all alive until the program returns.
A runner that keeps the states in fixed buffers (``rc.stream`` on CUDA graphs,
``rehyat_compile/cuda_graph_step.py``) then copies them in at the end, so during a step every layer's
state is held twice: for Wan2.1-1.3B the overlap caches alone are 0.34 GiB of the 0.35 GiB state.

This pass moves each copy to the earliest point where it is safe: right after the later of the new
state's producer and the last reader of the old state (the layer's own step op: a layer's state is
read by that layer only). There ``state.copy_(new)`` overwrites the old value no one reads any more,
later readers of the new state and the output read the state input instead, and the fresh tensor dies
at once (fx frees a value after its last use). The program then has the same outputs, and mutates its
state inputs to hold them: only a runner that owns those buffers may call it.

A state the program returns unchanged, or as a view of itself, is left as it is: there is nothing to copy.
"""
from __future__ import annotations

import torch
from torch import fx

from .hoist_chunk_invariant import _alias_root
from .thread_state import _graph_module


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def state_copy_point(state: fx.Node, new: fx.Node, order: dict[fx.Node, int]) -> fx.Node | None:
    """The node after which ``state.copy_(new)`` may run: the later of ``new`` and the last node other
    than the output that reads ``state``; None where no copy is needed (``new`` is ``state`` or a view of
    it) or where ``new`` is not a node of the graph (a constant)."""
    if not isinstance(new, fx.Node) or _alias_root(new) is state:
        return None
    readers = [u for u in state.users if u.op != "output"]
    return max([new, *readers], key=order.__getitem__)


def write_states_in_place(module: fx.GraphModule, state_slice: slice, n_outputs: int) -> fx.GraphModule:
    """A copy of ``module`` (placeholders ``state_slice`` are its states, outputs ``n_outputs:`` the new
    states in the same order) that writes every new state into its state placeholder as early as it may
    (module docstring); the returned new states are the placeholders."""
    if not isinstance(module, fx.GraphModule):
        raise TypeError(f"module must be a torch.fx.GraphModule, got {type(module).__name__}")
    graph = _copied(module)
    placeholders = list(graph.find_nodes(op="placeholder"))
    states = placeholders[state_slice]
    output = next(n for n in graph.nodes if n.op == "output")
    returned = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    new_states = returned[n_outputs:]
    if len(new_states) != len(states):
        raise ValueError(f"state_slice names {len(states)} state inputs but the program returns {len(new_states)} "
                         f"new states after its {n_outputs} outputs")
    order = _position(graph)
    for i, (state, new) in enumerate(zip(states, new_states)):
        point = state_copy_point(state, new, order)
        if point is None:
            continue
        with graph.inserting_after(point):
            copied = graph.call_function(torch.ops.aten.copy_.default, (state, new))
        # readers of the new value after the copy, and the output, read the state input instead
        for user in list(new.users):
            if user is not copied and (user.op == "output" or order.get(user, -1) > order[point]):
                user.replace_input_with(new, state)
        returned[n_outputs + i] = state
    output.args = (tuple(returned),)
    graph.lint()
    result = _graph_module(module, graph)
    result.recompile()
    return result


def _copied(module: fx.GraphModule) -> fx.Graph:
    """A deep copy of ``module``'s graph (the original stays usable as it is)."""
    graph = fx.Graph()
    out = graph.graph_copy(module.graph, {})
    graph.output(out)
    return graph


__all__ = ["state_copy_point", "write_states_in_place"]
