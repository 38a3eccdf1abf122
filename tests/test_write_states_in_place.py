"""passes/write_states_in_place.py: the step program writes each new state into its state input right
after the layer that made it, and still computes the same function."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import fx

import rehyat_compile as rc
from rehyat_compile.passes.write_states_in_place import write_states_in_place
from rehyat_compile.zoo import make_wan_t2v

aten = torch.ops.aten


@pytest.fixture(scope="module")
def wan_step():
    model, args, kwargs = make_wan_t2v(frames=7)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    runner = rc.stream(hybrid, cuda_graphs=False)
    program = runner.program(*args, **kwargs)
    step = runner._steps.hoisted(program)
    plan = runner.plan(*args, **kwargs)
    _, _, arguments, _ = next(runner._chunk_calls(plan))
    step_args = [*arguments, *step.invariant(*arguments[:len(program.input_dims) + len(program.table_dims)])]
    n_in = len(program.input_dims) + len(program.table_dims)
    states = slice(n_in, n_in + 6 * len(program.sites))
    return program, step, step_args, states


def _copies(gm):
    return [n for n in gm.graph.nodes if n.target is aten.copy_.default and n.args[0].op == "placeholder"]


def test_the_in_place_step_computes_the_step_and_leaves_the_new_states_in_its_inputs(wan_step):
    program, step, args, states = wan_step
    in_place = write_states_in_place(step.step, states, program.n_outputs)
    with torch.no_grad():
        want = step.step(*args)
        mine = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        got = in_place(*mine)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # the returned new states ARE the state inputs, now holding them
    assert all(g is m for g, m in zip(got[program.n_outputs:], mine[states], strict=True))
    assert len(_copies(in_place)) == 6 * len(program.sites)  # S, z, overlap K/V/phi_k, validity: all made anew


def test_each_layer_writes_its_state_before_the_next_layer_runs(wan_step):
    program, step, _, states = wan_step
    in_place = write_states_in_place(step.step, states, program.n_outputs)
    order = {n: i for i, n in enumerate(in_place.graph.nodes)}
    placeholders = list(in_place.graph.find_nodes(op="placeholder"))[states]
    copy_of = {n.args[0]: n for n in _copies(in_place)}
    ops = [n for n in in_place.graph.nodes if any(p in n.all_input_nodes for p in placeholders)
           and n.target is not aten.copy_.default and n.op != "output"]
    assert len(ops) == len(program.sites) >= 2  # one step op per layer reads that layer's states
    for layer, op in enumerate(ops[:-1]):
        written = [copy_of[p] for p in op.all_input_nodes if p in copy_of]
        assert written and all(order[op] < order[c] < order[ops[layer + 1]] for c in written)
    # the original program is untouched: it still returns fresh tensors
    assert not _copies(step.step)


def _toy_program(n_states: int, reads_after: list[int], passthrough: set[int]):
    """step(x, *states) -> (y, *new states): new_i = state_i * (i + 2) + x, except pass-through states
    (returned as they are, or as a view of themselves); ``reads_after[i]``: the old state_i is read
    again (into y) after new state j = reads_after[i] is made, so its copy must wait for that."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    states = [graph.placeholder(f"state_{i}") for i in range(n_states)]
    y, news = x, []
    for j in range(n_states):
        if j in passthrough:
            news.append(states[j] if j % 2 else graph.call_function(aten.view.default, (states[j], [-1])))
        else:
            scaled = graph.call_function(aten.mul.Tensor, (states[j], float(j + 2)))
            news.append(graph.call_function(aten.add.Tensor, (scaled, x)))
        for i in range(n_states):
            if reads_after[i] == j:
                y = graph.call_function(aten.add.Tensor, (y, graph.call_function(aten.sum.default, (states[i],))))
    graph.output((y, *news))
    return fx.GraphModule(torch.nn.Module(), graph)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(0, n - 1), min_size=n, max_size=n), st.sets(st.integers(0, n - 1)))))
def test_copies_wait_for_the_old_states_last_reader(case):
    n, reads_after, passthrough = case
    program = _toy_program(n, reads_after, passthrough)
    in_place = write_states_in_place(program, slice(1, 1 + n), 1)
    x = torch.randn(4)
    states = [torch.randn(4) for _ in range(n)]
    want = program(x, *[s.clone() for s in states])
    mine = [s.clone() for s in states]
    got = in_place(x, *mine)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=0, atol=0)
    assert len(_copies(in_place)) == n - len(passthrough)
    for i in set(range(n)) - passthrough:
        assert got[1 + i] is mine[i]


def test_a_state_count_that_does_not_match_the_outputs_is_refused():
    program = _toy_program(2, [0, 1], set())
    with pytest.raises(ValueError, match="state_slice names 3 state inputs but the program returns 2"):
        write_states_in_place(program, slice(0, 3), 1)
    with pytest.raises(TypeError, match="module must be a torch.fx.GraphModule"):
        write_states_in_place(lambda x: x, slice(0, 1), 0)


def test_the_pipeline_pass_finds_the_states_after_the_inputs_and_before_the_hoisted_values(wan_step):
    from rehyat_compile.passes import pipeline
    program, step, args, states = wan_step
    result = pipeline.run(pipeline.WRITE_STATES_IN_PLACE, pipeline.PassResult(step.step).with_artifact(
        "step_program", program).with_artifact("hoisted_step", step))
    in_place = result.artifacts["in_place_step"]
    placeholders = list(in_place.graph.find_nodes(op="placeholder"))
    assert {c.args[0] for c in _copies(in_place)} == set(placeholders[states])


def test_a_state_whose_old_value_is_returned_elsewhere_is_not_overwritten_early():
    """new_0 is a view of state_1's OLD value, and the output reads state_1 through a view too: writing
    state_1 in place would change both; new_1 = state_1 * 2 is copied only at the end (by the runner)."""
    graph = fx.Graph()
    x, s0, s1 = graph.placeholder("x"), graph.placeholder("state_0"), graph.placeholder("state_1")
    old_view = graph.call_function(aten.view.default, (s1, [-1]))
    new1 = graph.call_function(aten.mul.Tensor, (s1, 2.0))
    y = graph.call_function(aten.add.Tensor, (x, x))
    graph.output((y, old_view, new1))
    program = fx.GraphModule(torch.nn.Module(), graph)
    in_place = write_states_in_place(program, slice(1, 3), 1)
    assert not _copies(in_place)  # state_0's new value is another input's view; state_1's old value is returned
    states = [torch.randn(4), torch.randn(4)]
    want = program(torch.ones(4), *[s.clone() for s in states])
    got = in_place(torch.ones(4), *[s.clone() for s in states])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_readers_through_a_view_delay_the_copy():
    graph = fx.Graph()
    x, s0 = graph.placeholder("x"), graph.placeholder("state_0")
    new0 = graph.call_function(aten.add.Tensor, (s0, x))
    late_read = graph.call_function(aten.sum.default, (graph.call_function(aten.view.default, (s0, [-1])),))
    graph.output((late_read, new0))
    program = fx.GraphModule(torch.nn.Module(), graph)
    in_place = write_states_in_place(program, slice(1, 2), 1)
    order = {n: i for i, n in enumerate(in_place.graph.nodes)}
    (copy,) = _copies(in_place)
    sums = [n for n in in_place.graph.nodes if n.target is aten.sum.default]
    assert order[copy] > order[sums[0]]
    s = torch.randn(4)
    torch.testing.assert_close(in_place(torch.ones(4), s.clone())[0], program(torch.ones(4), s.clone())[0])


def test_outputs_are_written_into_given_buffers_as_soon_as_they_are_made():
    from rehyat_compile.passes.write_states_in_place import write_outputs_into
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(aten.mul.Tensor, (x, 2.0))
    b = graph.call_function(aten.add.Tensor, (a, 1.0))  # reads a after a is made: reads the buffer instead
    c = graph.call_function(aten.sin.default, (b,))
    graph.output((a, c, x))  # x: an input, copied at the end
    program = fx.GraphModule(torch.nn.Module(), graph)
    rewritten = write_outputs_into(program)
    names = [n.name for n in rewritten.graph.find_nodes(op="placeholder")]
    assert names == ["x", "into_0", "into_1", "into_2"]
    order = {n: i for i, n in enumerate(rewritten.graph.nodes)}
    copies = [n for n in rewritten.graph.nodes if n.target is aten.copy_.default]
    adds = [n for n in rewritten.graph.nodes if n.target is aten.add.Tensor]
    assert order[copies[0]] < order[adds[0]]  # a is written before b is computed
    x_value = torch.randn(5)
    buffers = [torch.empty(5) for _ in range(3)]
    got = rewritten(x_value, *buffers)
    for g, w, buf in zip(got, program(x_value), buffers, strict=True):
        assert g is buf
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_value_written_into_after_it_is_made_is_copied_only_at_the_end():
    """new_0 = state_0 + x, then new_0 += 1 in place: a copy right after the add would miss the += 1."""
    from rehyat_compile.passes.write_states_in_place import write_outputs_into
    graph = fx.Graph()
    x, s0 = graph.placeholder("x"), graph.placeholder("state_0")
    new0 = graph.call_function(aten.add.Tensor, (s0, x))
    graph.call_function(aten.add_.Tensor, (graph.call_function(aten.view.default, (new0, [-1])), 1.0))
    graph.output((x, new0))
    program = fx.GraphModule(torch.nn.Module(), graph)
    state = torch.randn(4)
    want = program(torch.ones(4), state.clone())
    in_place = write_states_in_place(program, slice(1, 2), 1)
    assert not _copies(in_place)
    got = in_place(torch.ones(4), state.clone())
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    into = write_outputs_into(program)
    order = {n: i for i, n in enumerate(into.graph.nodes)}
    copies = [n for n in into.graph.nodes if n.target is aten.copy_.default]
    writes = [n for n in into.graph.nodes if n.target is aten.add_.Tensor]
    assert all(order[c] > order[writes[0]] for c in copies)
    buffers = [torch.empty(4), torch.empty(4)]
    for g, w in zip(into(torch.ones(4), state.clone(), *buffers), want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
