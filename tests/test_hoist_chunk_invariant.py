"""passes/hoist_chunk_invariant.py: work that is the same for every chunk leaves the step program."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import rehyat_compile as rc
from rehyat_compile.cuda_graph_step import invariant_inputs
from rehyat_compile.passes.hoist_chunk_invariant import chunk_invariant_nodes, hoist_chunk_invariant
from rehyat_compile.zoo import make_wan_t2v

aten = torch.ops.aten


@pytest.fixture(scope="module")
def wan():
    model, args, kwargs = make_wan_t2v(frames=7)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    runner = rc.stream(hybrid, cuda_graphs=False)
    program = runner.program(*args, **kwargs)
    return hybrid, runner, program, args, kwargs


def _linear_inputs(gm):
    """Names of the placeholders each matmul-like node reads, through any other nodes."""
    reads = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            reads[node] = {node.name}
        else:
            reads[node] = set().union(*(reads[n] for n in node.all_input_nodes)) if node.all_input_nodes else set()
    return [reads[n] for n in gm.graph.nodes if n.target in (aten.linear.default, aten.mm.default, aten.addmm.default)]


def test_text_and_time_projections_leave_the_step(wan):
    _, _, program, _, _ = wan
    hoisted = hoist_chunk_invariant(program.module, invariant_inputs(program))
    chunked = {n.name for n, inv in zip(program.module.graph.find_nodes(op="placeholder"), invariant_inputs(program))
               if not inv}
    # in the step, every projection reads a chunked input (or a state); the invariant part holds the rest
    assert all(reads & (chunked | {n for n in reads if n.startswith("state_")}) for reads in _linear_inputs(hoisted.step))
    assert len(_linear_inputs(hoisted.invariant)) > 0 and hoisted.n_hoisted > 0
    # cross-attention K/V of every block and the time embedding are among the hoisted
    assert len(_linear_inputs(hoisted.invariant)) >= 2 * 2 + 1


def test_hoisting_again_finds_nothing_more(wan):
    _, _, program, _, _ = wan
    once = hoist_chunk_invariant(program.module, invariant_inputs(program))
    twice = hoist_chunk_invariant(once.step, invariant_inputs(program))
    assert twice.n_hoisted == 0


def test_hoisted_step_computes_the_step(wan):
    hybrid, runner, program, args, kwargs = wan
    hoisted = hoist_chunk_invariant(program.module, invariant_inputs(program))
    plan = runner.plan(*args, **kwargs)
    from rehyat_compile.stream import _chunk
    inputs = _chunk(plan.flat, program.input_dims, 0, 2)
    tables = _chunk(runner._tables(program, plan.flat), program.table_dims, 0, 2)
    states = [t for site in program.sites for t in site.initial(torch.device("cpu"))]
    with torch.no_grad():
        ref = program.module(*inputs, *tables, *states)
        got = hoisted.step(*inputs, *tables, *states, *hoisted.invariant(*inputs, *tables))
    assert len(ref) == len(got)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_streamed_with_hoisting_equals_converted(wan):
    hybrid, runner, _, args, kwargs = wan
    with torch.no_grad():
        torch.testing.assert_close(runner(*args, **kwargs)[0], hybrid(*args, **kwargs)[0], rtol=1e-4, atol=1e-4)


def test_chunked_inputs_states_and_written_tensors_are_not_invariant():
    def step(x_chunk, text, state):
        t = text @ text.T                 # invariant
        buf = text * 2                    # invariant until written below
        buf.add_(x_chunk.sum())           # written with chunk data: not invariant
        return t + x_chunk, buf, state + t.sum()

    gm = make_fx(step)(torch.randn(3, 3), torch.randn(3, 3), torch.randn(()))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    invariant, from_inputs = chunk_invariant_nodes(gm.graph, {placeholders[1]})
    assert placeholders[0] not in invariant and placeholders[2] not in invariant
    mm = next(n for n in gm.graph.nodes if n.target == aten.mm.default)
    mul = next(n for n in gm.graph.nodes if n.target == aten.mul.Tensor)
    assert mm in from_inputs and mul not in invariant
    hoisted = hoist_chunk_invariant(gm, [False, True])
    assert hoisted.names and all("mul" not in n for n in hoisted.names)
    x, text, state = torch.randn(3, 3), torch.randn(3, 3), torch.randn(())
    for a, b in zip(hoisted.step(x, text, state, *hoisted.invariant(x, text)), gm(x, text, state)):
        torch.testing.assert_close(a, b)


def test_parameter_only_work_stays_in_the_step():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x_chunk, text):
            return x_chunk @ self.w.t() + (text @ self.w).sum()

    gm = torch.export.export(Block(), (torch.randn(2, 4), torch.randn(3, 4))).module()
    hoisted = hoist_chunk_invariant(gm, [False, True])
    # the text projection leaves; the weight's transpose (parameters only) does not
    assert hoisted.n_hoisted == 1
    assert any(n.target in (aten.t.default, aten.permute.default, aten.transpose.int)
               for n in hoisted.step.graph.nodes)
