"""rehyat_compile/cuda_graph_step.py on the CPU: the graph runner's buffer handling on the reference
graphs (RerunGraphs: a capture runs nothing, a replay reruns into the captured outputs) computes the
eager stream; which step arguments a graph may hold in one static buffer (the same view of the same
memory), and that a graph's signature tells calls apart by it. tests/test_cuda_graph_step.py runs
the same on CUDA graphs, on a GPU."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import rehyat_compile as rc
from rehyat_compile.cuda_graph_step import GraphedStep, RerunGraphs, _signature, same_view_groups, weight_addresses
from rehyat_compile.zoo import make_wan_t2v


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=8), st.lists(st.booleans(), min_size=8, max_size=8))
def test_arguments_group_exactly_when_they_are_the_same_view(picks, other_view):
    base = torch.arange(24.0)
    views = [base[0:12], base[12:24], base[0:12].view(3, 4), torch.zeros(12)]
    args = []
    for i, pick in enumerate(picks):
        # the same pick twice is the same view only if made the same way: a fresh slice of the same range
        args.append(base[0:12] if pick == 0 and other_view[i] else views[pick])
    groups = same_view_groups(args + [3])
    assert groups[-1] == -1  # not a tensor
    for i, a in enumerate(args):
        first = groups[i]
        assert first <= i and args[first].data_ptr() == a.data_ptr() and args[first].shape == a.shape
        assert all(not (b.data_ptr() == a.data_ptr() and b.shape == a.shape and b.stride() == a.stride())
                   for b in args[:first])


def test_a_call_whose_arguments_alias_differently_gets_another_graph():
    t = torch.ones(4)
    assert _signature([t, t]) != _signature([t, t.clone()])
    assert _signature([t, t[:]]) == _signature([t, t])  # a new view object of the same memory: the same group


def test_wan_step_tables_are_slices_of_one_table_so_a_graph_holds_them_once():
    model, args, kwargs = make_wan_t2v(frames=7)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    runner = rc.stream(hybrid, cuda_graphs=False)
    _, _, arguments, _ = next(runner._chunk_calls(runner.plan(*args, **kwargs)))
    tensors = [a for a in arguments if isinstance(a, torch.Tensor)]
    groups = same_view_groups(arguments)
    distinct = len({g for g, a in zip(groups, arguments) if isinstance(a, torch.Tensor)})
    assert distinct < len(tensors)  # per-layer position tables: one buffer each group, not one per layer


@pytest.fixture(scope="module")
def wan():
    model, args, kwargs = make_wan_t2v(frames=9)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    return hybrid, args, kwargs


def _reference_graphed(hybrid, chunks_per_step=1):
    runner = rc.stream(hybrid, chunks_per_step=chunks_per_step)
    runner._steps.graphs = RerunGraphs()
    return runner


@pytest.mark.parametrize("chunks_per_step", [1, 2])
def test_graph_runner_buffers_compute_the_eager_stream_call_after_call(wan, chunks_per_step):
    hybrid, args, kwargs = wan
    graphed, eager = _reference_graphed(hybrid, chunks_per_step), rc.stream(hybrid, cuda_graphs=False)
    shorter = (args[0][:, :, :5],)  # a shorter video: the same graphs plus a short last chunk's
    with torch.no_grad():
        for call_args in (args, shorter, args):
            got, want = graphed(*call_args, **kwargs)[0], eager(*call_args, **kwargs)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    graphs = [g for g in graphed._steps._graphs.values() if g is not None]
    assert len(graphs) >= 2
    # the states are one set of buffers, written in place by every graph, and a call starts on them zeroed
    states = graphs[0].static[graphs[0].state_slice]
    assert all(all(a is b for a, b in zip(g.static[g.state_slice], states, strict=True)) for g in graphs)
    assert all(a is b for a, b in zip(next(iter(graphed._steps._state_buffers.values())), states, strict=True))
    # per-layer position tables share one static copy per view group
    for g in graphs:
        own = g.static[:g.state_slice.start]
        tensors = [t for t in own if isinstance(t, torch.Tensor)]
        assert len({id(t) for t in tensors}) < len(tensors)


def test_a_later_call_zeroes_the_states_it_starts_from(wan):
    hybrid, args, kwargs = wan
    graphed = _reference_graphed(hybrid)
    with torch.no_grad():
        graphed(*args, **kwargs)
        call = graphed._steps.call(torch.device("cpu"))
        program = graphed.program(*args, **kwargs)
        states = call.initial_states(program, torch.device("cpu"))
    buffers = next(iter(graphed._steps._state_buffers.values()))
    assert all(s is b for s, b in zip(states, buffers, strict=True))
    assert all(not s.any() for s in states)


def test_later_calls_write_their_hoisted_values_into_the_graphs_buffers(wan):
    """Call 1 keeps its hoisted values in the graph's buffers and captures the invariant program that
    writes into them; call 2 (new text and timestep, same shapes) replays it; call 3 (a shorter text) has
    no buffers of its shapes yet and makes its own; call 4 (other text of the first shape) replays the
    captured invariant graph on its inputs."""
    hybrid, args, kwargs = wan
    graphed, eager = _reference_graphed(hybrid), rc.stream(hybrid, cuda_graphs=False)
    text = kwargs["encoder_hidden_states"]
    calls = [kwargs, dict(kwargs, encoder_hidden_states=text.flip(1) * 0.5, timestep=kwargs["timestep"] + 100),
             dict(kwargs, encoder_hidden_states=text[:, : text.shape[1] // 2]),
             dict(kwargs, encoder_hidden_states=-text, timestep=kwargs["timestep"] + 7)]
    with torch.no_grad():
        for call_kwargs in calls:
            got, want = graphed(*args, **call_kwargs)[0], eager(*args, **call_kwargs)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    steps = graphed._steps
    assert len(steps._invariant_buffers) >= 2  # one set per text length
    (_, in_place_invariant), *_ = steps._in_place.values()
    n_into = len([n for n in in_place_invariant.graph.find_nodes(op="placeholder") if n.name.startswith("into_")])
    assert n_into == len(next(iter(steps._invariant_buffers.values())))
    with torch.no_grad():  # a call of the shapes seen before returns the kept buffers themselves
        program = graphed.program(*args, **kwargs)
        plan = graphed.plan(*args, **kwargs)
        _, _, arguments, _ = next(graphed._chunk_calls(plan))
        n_in = len(program.input_dims) + len(program.table_dims)
        values = steps.invariants(program, steps.hoisted(program), arguments[:len(program.input_dims)],
                                  arguments[len(program.input_dims):n_in])
    key = (id(program), _signature(arguments[:n_in]))
    kept = steps._invariant_buffers[key]
    assert all(v is k for v, k in zip(values, kept, strict=True))
    # written by one captured graph of the invariant program, whose "states" are those very buffers
    graph = steps._invariant_graphs[key]
    assert graph is not None and graph.outputs == []
    assert all(s is k for s, k in zip(graph.static[graph.state_slice], kept, strict=True))
    # static copies of what the invariant program reads only: not the chunk's latents or position tables
    assert 0 < graph.state_slice.start < n_in


def test_weight_addresses_name_every_parameter_and_buffer_once_and_see_a_replaced_one():
    model, _, _ = make_wan_t2v(frames=3)
    every = [t.data_ptr() for t in (*model.parameters(), *model.buffers())]
    addresses = weight_addresses(model)
    assert sorted(addresses) == sorted(every) and len(addresses) == len(every)
    block = model.blocks[0].attn1.to_q
    block.weight = torch.nn.Parameter(block.weight.detach() * 2)
    assert weight_addresses(model) != addresses


def test_new_weights_drop_the_kept_invariant_buffers(wan):
    hybrid, args, kwargs = wan
    graphed = _reference_graphed(hybrid)
    with torch.no_grad():
        graphed(*args, **kwargs)
        assert graphed._steps._invariant_buffers
        moved = hybrid.to(torch.float64).to(torch.float32)  # new parameter storage: new addresses
        graphed._steps.call(torch.device("cpu"))
    assert moved is hybrid and not graphed._steps._invariant_buffers and not graphed._steps._graphs
    assert not graphed._steps._invariant_graphs


class _WritesAndCountsWarmUps:
    """A program that writes ``2 * x`` into its one "state" and returns it (the invariant program's form)."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, into):
        self.seen.append(into)
        return (into.copy_(2 * x),)


@pytest.mark.parametrize("reads_states", [True, False])
def test_a_program_that_only_writes_its_states_warms_up_on_them_not_on_copies(reads_states):
    x, buffer = torch.arange(4.0), torch.zeros(4)
    program = _WritesAndCountsWarmUps()
    graph = GraphedStep(program, [x, buffer], n_outputs=0, state_slice=slice(1, 2), shared_buffers=[buffer],
                        graphs=RerunGraphs(), reads_states=reads_states)
    warm_up_target = program.seen[0]
    assert (warm_up_target is buffer) == (not reads_states)  # no transient second copy of the buffers
    # either way the capture leaves the buffer as it was warmed up, and a replay writes the program's result
    x.mul_(3)
    (out,) = graph([x, buffer])
    assert out is buffer and torch.equal(buffer, 2 * x)


@pytest.mark.parametrize("compile", [False, True])
def test_the_first_call_captures_the_invariant_program_the_second_replays(wan, monkeypatch, compile):
    """Made and captured in the first call, where the buffers it writes are kept, not on the second
    call's clock (compiled step graphs do not take the in-place step program: a compiled runner had made
    the pass's programs in its second call)."""
    hybrid, args, kwargs = wan
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)  # what is made, not Inductor, is checked
    graphed = rc.stream(hybrid, compile=compile)
    graphed._steps.graphs = RerunGraphs()
    with torch.no_grad():
        graphed(*args, **kwargs)
    steps = graphed._steps
    assert bool(steps._compiled) == compile and steps._invariant_buffers
    assert id(graphed.program(*args, **kwargs)) in steps._in_place
    assert set(steps._invariant_graphs) == set(steps._invariant_buffers)
    assert all(g is not None for g in steps._invariant_graphs.values())
