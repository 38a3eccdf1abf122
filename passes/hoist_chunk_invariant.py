"""hoist_chunk_invariant: take the work that is the same for every chunk out of the step program.

A step program (:func:`~rehyat_compile.passes.thread_state.thread_state`) runs once per chunk. Some of
its inputs are the same for every chunk of a call: the model inputs passed whole (text embeddings,
the timestep) and the tables passed whole. Every node computed only from those inputs, parameters
and constants -- text/cross-attention keys and values, time embeddings and their modulation,
whole-video position tables -- gives the same value in every chunk. This pass finds them by graph
analysis alone (no per-model list) and splits the program in two:

    invariant(*inputs, *tables) -> hoisted values               # once per call
    step(*inputs, *tables, *states, *hoisted values) -> (*outputs, *new states)   # once per chunk

The hoisted values are the invariant tensors that chunk-dependent nodes (or outputs) read and that
depend on at least one input (parameter-only work, such as a weight transpose, stays: hoisting it
would only copy the weight). Ops that write into a tensor, random ops and calls of submodules are
never hoisted, and neither is any tensor an op writes into.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .thread_state import _graph_module


@dataclass
class HoistedStep:
    """The result: ``invariant`` and ``step`` as in the module docstring; ``names``: the hoisted nodes."""

    invariant: fx.GraphModule
    step: fx.GraphModule
    names: list[str]

    @property
    def n_hoisted(self) -> int:
        return len(self.names)


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _writes(node: fx.Node) -> bool:
    schema = _schema(node)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _pure(node: fx.Node) -> bool:
    """A call whose value depends only on its arguments and that changes nothing."""
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not _writes(node) and torch.Tag.nondeterministic_seeded not in target.tags
    return getattr(target, "__module__", None) in ("_operator", "operator")


def _alias_root(node: fx.Node) -> fx.Node:
    """Follow views (schema outputs aliasing their first argument) back to the viewed tensor."""
    while (s := _schema(node)) is not None and s.returns and s.returns[0].alias_info is not None \
            and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _written_roots(graph: fx.Graph) -> set[fx.Node]:
    """Tensors (through views) that an in-place or out= op of the graph writes into."""
    roots = set()
    for node in graph.nodes:
        schema = _schema(node)
        if schema is None or not _writes(node):
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
                roots.add(_alias_root(value))
        for name, value in node.kwargs.items():
            arg = next((a for a in schema.arguments if a.name == name), None)
            if arg is not None and arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
                roots.add(_alias_root(value))
    return roots


def chunk_invariant_nodes(graph: fx.Graph, invariant_inputs: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(invariant nodes, those of them that depend on an input): a node is invariant when it is an
    invariant placeholder, a parameter/constant, or a pure call on invariant nodes only."""
    written = _written_roots(graph)
    invariant: set[fx.Node] = set()
    from_inputs: set[fx.Node] = set()
    for node in graph.nodes:
        if node in written:
            continue
        if node.op == "placeholder":
            if node in invariant_inputs:
                invariant.add(node)
                from_inputs.add(node)
        elif node.op == "get_attr":
            invariant.add(node)
        elif _pure(node) and all(n in invariant for n in node.all_input_nodes):
            invariant.add(node)
            if any(n in from_inputs for n in node.all_input_nodes):
                from_inputs.add(node)
    return invariant, from_inputs


def hoisted_frontier(graph: fx.Graph, invariant: set[fx.Node], from_inputs: set[fx.Node]) -> list[fx.Node]:
    """Invariant tensors, computed from an input, that a chunk-dependent node or the output reads."""
    out = []
    for node in graph.nodes:
        if node.op == "placeholder" or node not in from_inputs or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if any(u not in invariant or u.op == "output" for u in node.users):
            out.append(node)
    return out


def _invariant_graph(graph: fx.Graph, placeholders: list[fx.Node], frontier: list[fx.Node]) -> fx.Graph:
    """placeholders -> tuple(frontier): the frontier's ancestors, copied."""
    needed: set[fx.Node] = set()
    stack = list(frontier)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in placeholders:
        env[node] = new.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node in needed and node.op != "placeholder":
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output(tuple(env[n] for n in frontier))
    return new


def _step_graph(graph: fx.Graph, frontier: list[fx.Node]) -> fx.Graph:
    """``graph`` with every frontier node read from a new placeholder after the existing ones."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        env[node] = new.node_copy(node)
    for i, node in enumerate(frontier):
        env[node] = new.placeholder(f"hoisted_{i}_{node.name}")
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node.op != "placeholder" and node not in env:
            env[node] = new.node_copy(node, lambda n: env[n])
    return new


def hoist_chunk_invariant(module: fx.GraphModule, invariant_inputs: list[bool]) -> HoistedStep:
    """Split ``module`` (a step program's GraphModule) by chunk invariance; ``invariant_inputs[i]``
    says whether placeholder i is the same for every chunk of a call. Placeholders past the list
    (the states) are chunk-dependent. ``invariant`` takes the placeholders the list covers."""
    if not isinstance(module, fx.GraphModule):
        raise TypeError(f"module must be a torch.fx.GraphModule, got {type(module).__name__}")
    graph = module.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(invariant_inputs) > len(placeholders):
        raise ValueError(f"invariant_inputs has {len(invariant_inputs)} entries for {len(placeholders)} placeholders")
    inputs = {p for p, inv in zip(placeholders, invariant_inputs) if inv}
    invariant, from_inputs = chunk_invariant_nodes(graph, inputs)
    frontier = hoisted_frontier(graph, invariant, from_inputs)
    # submodules are the step's own (the model's live ones), so a later .to() reaches both
    hoisted = _graph_module(module, _invariant_graph(graph, placeholders[:len(invariant_inputs)], frontier))
    step = _graph_module(module, _step_graph(graph, frontier))
    for gm in (hoisted, step):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return HoistedStep(hoisted, step, [n.name for n in frontier])


__all__ = ["HoistedStep", "chunk_invariant_nodes", "hoist_chunk_invariant", "hoisted_frontier"]
