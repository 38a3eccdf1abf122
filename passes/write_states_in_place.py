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
Nor is one whose old value the program also returns elsewhere (a view of it as an output, or as another
state's new value), or whose new value is a view of another input or is written into by a later op:
those keep the copy at the end.
"""
from __future__ import annotations

import torch
from torch import fx

from .hoist_chunk_invariant import _alias_root, _written_roots
from .thread_state import _graph_module


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def _copy_of(module: fx.GraphModule) -> tuple[fx.Graph, fx.Node, list]:
    """(a deep copy of ``module``'s graph, its output node, the returned values as a list)."""
    if not isinstance(module, fx.GraphModule):
        raise TypeError(f"module must be a torch.fx.GraphModule, got {type(module).__name__}")
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    output = next(n for n in graph.nodes if n.op == "output")
    returned = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    return graph, output, returned


def _write_after(graph: fx.Graph, point: fx.Node, target: fx.Node, value: fx.Node, order: dict) -> None:
    """``target.copy_(value)`` right after ``point``; the readers of ``value`` after it, and the output,
    read ``target`` instead, so ``value`` dies at the copy."""
    with graph.inserting_after(point):
        copied = graph.call_function(torch.ops.aten.copy_.default, (target, value))
    for user in list(value.users):
        if user is not copied and (user.op == "output" or order.get(user, -1) > order[point]):
            user.replace_input_with(value, target)


def _finish(module: fx.GraphModule, graph: fx.Graph, output: fx.Node, returned: list) -> fx.GraphModule:
    output.args = (tuple(returned),)
    graph.lint()
    result = _graph_module(module, graph)
    result.recompile()
    return result


def _views_of(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Per node, the nodes that are it or views of it (through view ops, schema alias info)."""
    views: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        views.setdefault(_alias_root(node), []).append(node)
    return views


def _made_here(value, written: set) -> bool:
    """``value`` is a tensor the graph makes and never writes into later (itself or through a view): one
    whose value is final where it is made, so it may be copied out there."""
    return isinstance(value, fx.Node) and _alias_root(value).op != "placeholder" and _alias_root(value) not in written


def state_copy_point(state: fx.Node, new: fx.Node, order: dict[fx.Node, int], views: list[fx.Node],
                     returned: list, written: set = frozenset()) -> fx.Node | None:
    """The node after which ``state.copy_(new)`` may run: the later of ``new`` and the last node other
    than the output that reads ``state`` or a view of it (``views``: state and its views). None where no
    copy is needed (``new`` is ``state`` or a view of it), where ``new`` is not a node of the graph (a
    constant), is a view of another input or is written into by an op (``written``: the alias roots
    in-place ops write, ``hoist_chunk_invariant._written_roots``), and where the program returns ``state``
    or a view of it in another place (``returned``: the output values besides this state's own slot),
    whose old value an early overwrite would change."""
    if not _made_here(new, written):
        return None
    if any(isinstance(r, fx.Node) and r in views for r in returned):
        return None
    readers = [u for v in views for u in v.users if u.op != "output" and u not in views]
    return max([new, *readers], key=order.__getitem__)


def write_states_in_place(module: fx.GraphModule, state_slice: slice, n_outputs: int) -> fx.GraphModule:
    """A copy of ``module`` (placeholders ``state_slice`` are its states, outputs ``n_outputs:`` the new
    states in the same order) that writes every new state into its state placeholder as early as it may
    (module docstring); the returned new states are the placeholders."""
    graph, output, returned = _copy_of(module)
    states = list(graph.find_nodes(op="placeholder"))[state_slice]
    new_states = returned[n_outputs:]
    if len(new_states) != len(states):
        raise ValueError(f"state_slice names {len(states)} state inputs but the program returns {len(new_states)} "
                         f"new states after its {n_outputs} outputs")
    order, views, written = _position(graph), _views_of(graph), _written_roots(graph)
    for i, (state, new) in enumerate(zip(states, new_states)):
        others = returned[:n_outputs + i] + returned[n_outputs + i + 1:]
        point = state_copy_point(state, new, order, views.get(state, [state]), others, written)
        if point is not None:
            _write_after(graph, point, state, new, order)
            returned[n_outputs + i] = state
    return _finish(module, graph, output, returned)


def write_outputs_into(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``module`` with one more placeholder per output, after its own (``into_0`` ...), that
    writes every output into its placeholder as soon as the output is made, and returns the placeholders:
    the fresh values die at once instead of living until the program returns. For a program whose
    results a runner keeps in buffers it owns (the hoisted invariants of ``rc.stream``'s CUDA graphs:
    Wan2.1-1.3B's cross-attention K/V, 91 MiB, would otherwise sit beside the buffers that keep them).
    Outputs that are inputs, views of inputs, constants or written into later are copied at the end."""
    graph, output, returned = _copy_of(module)
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None):
        into = []
        for i in reversed(range(len(returned))):  # inserting after the same node: reversed keeps the order
            into.insert(0, graph.placeholder(f"into_{i}"))
    order, written = _position(graph), _written_roots(graph)
    for i, (target, value) in enumerate(zip(into, returned)):
        if _made_here(value, written):
            _write_after(graph, value, target, value, order)
        else:  # an input, a view of one, a constant or a tensor written into later: copied at the end
            with graph.inserting_before(output):
                graph.call_function(torch.ops.aten.copy_.default, (target, value))
        returned[i] = target
    return _finish(module, graph, output, returned)


__all__ = ["state_copy_point", "write_outputs_into", "write_states_in_place"]
