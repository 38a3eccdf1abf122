"""passes/liveness.py: bytes alive while each node runs, counted per storage (views are free and keep
their base alive), inputs from the start to their last use, outputs to the end, weights never, a
node's workspace only while it runs; sizes may be sympy expressions in the frames."""
import operator

import sympy
import torch
from torch import fx

from rehyat_compile.passes.liveness import Liveness, activation_liveness, storage_key

from .test_canonicalize import runtime_values

FLOAT = 4


def traced(fn, *args):
    """(graph, {node: value}, nodes by name) of ``fn`` traced by fx and run once on ``args``."""
    gm = fx.symbolic_trace(fn)
    values = runtime_values(gm, *args)
    return gm.graph, values, {n.name: n for n in gm.graph.nodes}


def nbytes(t):
    return t.untyped_storage().nbytes()


def test_each_node_sees_its_inputs_its_output_and_what_is_needed_later():
    def fn(x):
        a = x + 1          # x (16) + a (16)
        b = a * 2          # x is dead after a: a + b
        c = b - a          # a, b, c all alive
        return c

    graph, values, nodes = traced(fn, torch.ones(4))
    result = activation_liveness(graph, values, nbytes, set())
    assert isinstance(result, Liveness)
    assert result.live == {"add": 32, "mul": 32, "sub": 48}
    assert result.candidates == [32, 48]


def test_views_cost_nothing_and_keep_their_base_alive_until_their_last_use():
    def fn(x):
        a = x + 1                  # 16
        v = a.view(2, 2)           # a view of a: no new bytes
        t = v.transpose(0, 1)      # another view
        c = t * 3                  # a is alive here through t: a + c
        return c

    graph, values, nodes = traced(fn, torch.ones(4))
    assert storage_key(values[nodes["view"]]) == storage_key(values[nodes["add"]])
    live = activation_liveness(graph, values, nbytes, set()).live
    assert live["view"] == live["transpose"] == 16  # only a: x died at add
    assert live["mul"] == 32


def test_chunk_outputs_are_views_of_one_storage():
    def fn(x):
        a = x * 2
        p, q = a.chunk(2)
        return p + q

    graph, values, nodes = traced(fn, torch.ones(8))
    live = activation_liveness(graph, values, nbytes, set()).live
    assert live["chunk"] == live["getitem"] == live["getitem_1"] == 8 * FLOAT
    assert live["add"] == 8 * FLOAT + 4 * FLOAT


def test_inputs_are_alive_from_the_start_until_their_last_use():
    def fn(x, y):
        a = x + 1      # x, y, a
        b = a + 1      # x is dead; y still to be read: y, a, b
        return b * y   # y, b, out

    graph, values, _ = traced(fn, torch.ones(4), torch.ones(4))
    live = activation_liveness(graph, values, nbytes, set()).live
    assert live == {"add": 48, "add_1": 48, "mul": 48}


def test_outputs_are_alive_until_the_end():
    def fn(x):
        early = x + 1         # returned: never freed
        late = x * 2          # x, early, late
        tmp = late + 1        # x dead; early, late, tmp
        return early, tmp - 1

    graph, values, _ = traced(fn, torch.ones(4))
    live = activation_liveness(graph, values, nbytes, set()).live
    assert live == {"add": 32, "mul": 48, "add_1": 48, "sub": 48}


def test_weights_are_never_counted():
    def fn(x, w):
        return (x @ w).relu()

    x, w = torch.ones(2, 3), torch.ones(3, 100)
    graph, values, nodes = traced(fn, x, w)
    with_weight = activation_liveness(graph, values, nbytes, set()).live
    without = activation_liveness(graph, values, nbytes, {nodes["w"]}).live
    assert with_weight["matmul"] - without["matmul"] == 300 * FLOAT
    assert without == {"matmul": (6 + 200) * FLOAT, "relu": 400 * FLOAT}


def test_workspace_counts_only_while_its_node_runs():
    def fn(x):
        return (x + 1) * 2

    graph, values, nodes = traced(fn, torch.ones(4))
    plain = activation_liveness(graph, values, nbytes, set()).live
    with_ws = activation_liveness(graph, values, nbytes, set(), {nodes["add"]: 1000}).live
    assert with_ws["add"] == plain["add"] + 1000 and with_ws["mul"] == plain["mul"]


def test_only_call_nodes_are_reported():
    def fn(x):
        return operator.add(x, 1)

    graph, values, _ = traced(fn, torch.ones(4))
    live = activation_liveness(graph, values, nbytes, set()).live
    assert list(live) == ["add"]


def test_sizes_may_be_sympy_expressions_in_the_frames():
    T = sympy.Symbol("T", integer=True, positive=True)

    def fn(x):
        a = x + 1
        b = a * 2
        return b + a

    graph, values, _ = traced(fn, torch.ones(4))
    result = activation_liveness(graph, values, lambda t: 4 * T * t.numel(), set())
    assert result.live == {"add": 32 * T, "mul": 32 * T, "add_1": 48 * T}
    assert result.candidates == [32 * T, 48 * T]
    assert all(isinstance(v, sympy.Expr) for v in result.live.values())
