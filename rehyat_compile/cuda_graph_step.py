"""Running a step program fast: chunk-invariant work once per call, the step replayed as a CUDA graph.

:class:`StepRunner` is what :class:`~rehyat_compile.stream.StreamRunner` calls per chunk:

* the step program is split by :func:`~rehyat_compile.passes.hoist_chunk_invariant.hoist_chunk_invariant`;
  its invariant part (text/cross-attention K/V, time embeddings ...) runs on a call's first chunk and
  its values are handed to every chunk of that call;
* on CUDA (``cuda_graphs=True``, the default there) the chunk part is captured once per input
  signature (shapes, not strides: every video length shares them; and which arguments are the same
  view, :func:`same_view_groups`) -- the full chunk and the short last chunk each get their own graph,
  sharing one set of state and invariant buffers -- as a :class:`GraphedStep` with static input and
  state buffers, and replayed per chunk. Each layer of the captured program writes its new state into
  its state buffer (``passes/write_states_in_place.py``; a compiled program's graph copies them in at
  its end), so the state a replay returns is already where the next replay reads it (no copy between
  chunks), and a later call starts from those buffers zeroed; a call's invariants are copied into the
  shared buffers once, and the call's own copies freed before the replay (Wan2.1-1.3B's cross-attention
  K/V are 94 MB); a later call with inputs of the same shapes writes them into those buffers directly,
  through one captured graph of the invariant program (one launch where the program has ~780);
* elsewhere, or where a capture fails (logged once), the chunk part runs eagerly: the same function;
* ``compile=True`` runs the chunk part through ``torch.compile`` (Inductor fuses the element-wise work;
  the fused Triton step stays one node), inside the CUDA graph where there is one.

The graphs share one memory pool: nothing they allocate is read after the replay that made it (chunk
outputs are cloned, states live in the static buffers), so replays of different graphs cannot clobber
each other's results. Replacing the model's weights or buffers (``.to()``) is seen through a signature
of their addresses, which drops the graphs captured for the old ones.
"""
from __future__ import annotations

import logging
import os

import torch

from .passes.hoist_chunk_invariant import HoistedStep

logger = logging.getLogger(__name__)


def graphs_enabled(device: torch.device, requested: bool | None) -> bool:
    """CUDA graphs for this device: ``requested`` if given, else on for CUDA unless
    ``REHYAT_CUDA_GRAPHS=0``."""
    if requested is not None:
        return bool(requested) and device.type == "cuda"
    return device.type == "cuda" and os.environ.get("REHYAT_CUDA_GRAPHS", "1") not in ("", "0")


def invariant_inputs(program) -> list[bool]:
    """Per placeholder of the step program (inputs, then tables): passed whole to every chunk."""
    return [d is None for d in program.input_dims] + [d is None for d in program.table_dims]


def weight_addresses(model: torch.nn.Module) -> tuple:
    """The addresses of every parameter and buffer of ``model`` (shared ones once), in module order: what
    graphs captured on its weights depend on. A walk of the modules' own tables, which every call makes
    before its first launch: ``parameters()`` names every member on the way (Wan2.1-1.3B: ~1,070 of
    them, milliseconds of the host's time while the GPU waits)."""
    seen, addresses, stack = set(), [], [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    addresses.append(t.data_ptr())
        stack.extend(reversed([m for m in module._modules.values() if m is not None]))
    return tuple(addresses)


def view_key(a: torch.Tensor) -> tuple:
    """Which view of which memory ``a`` is: two tensors with one key read the same elements."""
    return (a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a.device)


def same_view_groups(args) -> tuple:
    """Per argument, the index of the first argument that is the very same view of the same memory
    (itself where none is; -1 for non-tensors). Step programs take one table per layer that are all
    slices of the same position table (Wan2.1: 4 per block): a graph keeps one static copy per group."""
    first: dict[tuple, int] = {}
    return tuple(first.setdefault(view_key(a), i) if isinstance(a, torch.Tensor) else -1 for i, a in enumerate(args))


def _signature(args) -> tuple:
    """What a captured graph is specialised to: shapes, dtypes and devices of tensors, other values, and
    which arguments are the same view (:func:`same_view_groups`: they share a static buffer). Not
    strides: arguments are copied into the graph's own buffers, whatever their layout (a chunk of a
    longer video is a view with other strides, and takes the same graph)."""
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("v", repr(a))
                 for a in args) + (same_view_groups(args),)


def _state_key(states) -> tuple:
    """States' shapes and dtypes: which graphs' static states a call's initial states can be."""
    return tuple((tuple(t.shape), t.dtype) for t in states)


class CudaGraphs:
    """How :class:`GraphedStep` warms up, captures and replays: with CUDA graphs (``torch.cuda.graph`` for
    the capture). Every warm-up and capture of a runner runs on one side stream of its own: cuBLAS keeps
    a workspace per stream it has run on, so a new stream per capture (the full chunk's, the last
    chunk's, the invariant program's, per length) would leave one more behind each time (with one,
    tests/test_cuda_graph_step.py's second call had allocated 34 MiB, more than its whole state)."""

    def __init__(self):
        self._side: dict[int, torch.cuda.Stream] = {}  # per device index

    def side_stream(self) -> "torch.cuda.Stream":
        device = torch.cuda.current_device()
        if device not in self._side:
            self._side[device] = torch.cuda.Stream()
        return self._side[device]

    def enabled(self, device: torch.device, requested: bool | None) -> bool:
        return graphs_enabled(device, requested)

    def warm_up(self, fn) -> None:
        side = self.side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn, pool, static: list):
        """(graph, what ``fn`` returned while captured): nothing runs, ``static`` keeps its contents."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self.side_stream()):
            outs = fn()
        return graph, outs

    def replay(self, graph, outputs: list) -> None:
        graph.replay()  # writes the captured outputs' memory

    def pool(self, graph):
        return graph.pool()


class RerunGraphs(CudaGraphs):
    """The reference semantics of :class:`CudaGraphs`, on any device: a capture records the function and
    leaves the static buffers as they were (a CUDA capture runs nothing), a replay reruns it and writes
    its results into the captured outputs. The tests run the graph runner's buffer handling with it on
    the CPU (tests/test_cuda_graph_step_reference.py)."""

    def enabled(self, device: torch.device, requested: bool | None) -> bool:
        return requested is not False

    def warm_up(self, fn) -> None:
        fn()

    def capture(self, fn, pool, static: list):
        saved = [(t, t.clone()) for t in static if isinstance(t, torch.Tensor)]
        outs = fn()
        for t, value in saved:
            t.copy_(value)
        return fn, outs

    def replay(self, graph, outputs: list) -> None:
        for out, new in zip(outputs, graph()):
            out.copy_(new)

    def pool(self, graph):
        return None


class GraphedStep:
    """``module(*args)`` captured as one CUDA graph: static copies of ``args`` (``state_slice``: the
    ones that are states, updated in place by each replay; after them the hoisted invariants) and
    static outputs, of which the first ``n_outputs`` are chunk outputs and the rest the new states, in
    ``state_slice`` order. ``shared_buffers``: use these as the static states and invariants (another
    graph's: the full and the last chunk's graphs share them, so the state passes from one to the
    other without a copy, and neither is held twice). ``graphs``: :class:`CudaGraphs` (or the
    reference :class:`RerunGraphs`). ``reads_states=False``: ``module`` only writes its "states" (the
    invariant program filling the kept buffers), so the warm-up runs on them, not on copies."""

    def __init__(self, module, args: list, *, n_outputs: int, state_slice: slice, pool=None, shared_buffers=None,
                 graphs: CudaGraphs | None = None, reads_states: bool = True):
        self.n_outputs = n_outputs
        self.state_slice = state_slice
        self.graphs = CudaGraphs() if graphs is None else graphs
        # args[state_slice.start:] -- the states, then the hoisted invariants -- go into shared_buffers
        # when given (another graph's), else into copies that become this graph's
        shared = slice(state_slice.start, len(args))
        if shared_buffers is not None:
            for buffer, arg in zip(shared_buffers, args[shared]):
                if buffer is not arg:
                    buffer.copy_(arg)
        # arguments that are the same view (one position table sliced per layer) share one static copy
        groups = same_view_groups(args[:shared.start])
        self.static = []
        for i, a in enumerate(args[:shared.start]):
            self.static.append(self.static[groups[i]] if 0 <= groups[i] < i else
                               a.clone() if isinstance(a, torch.Tensor) else a)
        self.static += list(shared_buffers) if shared_buffers is not None else \
            [a.clone() if isinstance(a, torch.Tensor) else a for a in args[shared]]
        states = range(len(args))[state_slice] if reads_states else range(0)

        def warm_up():
            # Triton compiles and autotunes, cuBLAS picks its algorithms: outside the capture; on copies of
            # the states, which a program that writes its states in place would otherwise advance (a
            # program that only writes them warms up on them: no transient second copy, 94 MiB of
            # invariants in Wan2.1-1.3B at G = 7)
            module(*[a.clone() if i in states else a for i, a in enumerate(self.static)])

        def body():
            outs = list(module(*self.static))
            for dst, src in zip(self.static[state_slice], outs[n_outputs:]):
                if src is not dst:  # a program from passes/write_states_in_place.py wrote it already
                    dst.copy_(src)
            return outs

        with torch.no_grad():
            self.graphs.warm_up(warm_up)
            self.graph, outs = self.graphs.capture(body, pool, self.static)
        self.outputs = outs[:n_outputs]

    def pool(self):
        return self.graphs.pool(self.graph)

    def load(self, args: list) -> None:
        """Copy ``args`` into the static buffers (skipping those that are them, and buffers loaded already:
        arguments of one view group share one, and the signature guarantees they are the same view)."""
        loaded = set()
        for dst, src in zip(self.static, args):
            if isinstance(dst, torch.Tensor) and id(dst) not in loaded:
                loaded.add(id(dst))
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)

    def replay(self) -> list:
        """Replay on what the static buffers hold; returns fresh chunk outputs followed by the (static)
        new states."""
        with torch.no_grad():
            self.graphs.replay(self.graph, self.outputs)
        return [o.clone() for o in self.outputs] + list(self.static[self.state_slice])

    def __call__(self, args: list) -> list:
        """:meth:`load`, then :meth:`replay`."""
        self.load(args)
        return self.replay()


def used_arguments(module, n: int) -> list[int]:
    """Indices of the first ``n`` placeholders of ``module`` that its graph reads."""
    placeholders = list(module.graph.find_nodes(op="placeholder"))[:n]
    return [i for i, node in enumerate(placeholders) if node.users]


class _OnArguments:
    """``module`` called on only the arguments it reads (``used`` of its first ``n``), then the rest."""

    def __init__(self, module, used: list[int], n: int):
        self.module, self.used, self.n = module, used, n

    def __call__(self, *args):
        full = [None] * self.n
        for i, a in zip(self.used, args):
            full[i] = a
        return self.module(*full, *args[len(self.used):])


class StepRunner:
    """Per-runner cache of hoisted programs and captured graphs; :meth:`call` starts one model call."""

    def __init__(self, model: torch.nn.Module, cuda_graphs: bool | None = None, compile: bool = False,
                 graphs: CudaGraphs | None = None):
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.graphs = CudaGraphs() if graphs is None else graphs  # RerunGraphs: the reference, on any device
        self.compile = compile
        self._hoisted: dict[int, HoistedStep] = {}
        self._compiled: dict[int, object] = {}
        self._in_place: dict[int, object] = {}
        self._graphs: dict[tuple, GraphedStep | None] = {}
        self._weights: tuple | None = None
        self._pool = None
        self._shared_buffers: dict[tuple, list] = {}  # states + invariants, by signature: shared between graphs
        self._state_buffers: dict[tuple, list] = {}  # the graphs' static states, by their shapes and dtypes
        self._invariant_buffers: dict[tuple, tuple] = {}  # the graphs' hoisted values, by program and input shapes
        self._invariant_graphs: dict[tuple, GraphedStep | None] = {}  # the programs that write them, captured
        self._state_keys: dict[int, tuple] = {}  # per step program: its states' shapes and dtypes

    def hoisted(self, program) -> HoistedStep:
        if id(program) not in self._hoisted:
            from .passes import pipeline  # the pass runs where every pass runs (passes/pipeline.py)
            result = pipeline.run(pipeline.HOIST_CHUNK_INVARIANT,
                                  pipeline.PassResult(program.module).with_artifact("step_program", program))
            self._hoisted[id(program)] = result.artifacts["hoisted_step"]
        return self._hoisted[id(program)]

    def step_fn(self, program, step: HoistedStep):
        """The chunk part to run: ``step.step``, or its torch.compile'd form (one static-shape compile per
        chunk length; the fused step stays one ``rehyat::hybrid_attention_step`` node)."""
        if not self.compile:
            return step.step
        if id(program) not in self._compiled:
            self._compiled[id(program)] = torch.compile(step.step, dynamic=False)
        return self._compiled[id(program)]

    def graph_fn(self, program, step: HoistedStep):
        """The chunk part a graph captures: :meth:`step_fn`, eagerly with every layer writing its new state
        into the graph's static state buffers as soon as it is made (passes/write_states_in_place.py:
        otherwise all layers' new states, 0.35 GiB for Wan2.1-1.3B, are alive at once before the graph
        copies them in). Compiled steps stay as Inductor plans them."""
        if self.compile:
            return self.step_fn(program, step)
        return self._in_place_programs(program, step)[0]

    def _in_place_programs(self, program, step: HoistedStep) -> tuple:
        """(step, invariant) as passes/write_states_in_place.py rewrites them, made once per program."""
        if id(program) not in self._in_place:
            from .passes import pipeline  # the pass runs where every pass runs (passes/pipeline.py)
            result = pipeline.run(pipeline.WRITE_STATES_IN_PLACE, pipeline.PassResult(step.step).with_artifact(
                "step_program", program).with_artifact("hoisted_step", step))
            self._in_place[id(program)] = (result.artifacts["in_place_step"], result.artifacts["in_place_invariant"])
        return self._in_place[id(program)]

    def invariants(self, program, step: HoistedStep, inputs: list, tables: list) -> tuple:
        """A call's hoisted values. Where a graph of an earlier call with inputs of these shapes keeps them
        in its buffers, they are written there as they are made (the invariant program of
        passes/write_states_in_place.py), not made beside the buffers and copied in."""
        key = (id(program), _signature([*inputs, *tables]))
        buffers = self._invariant_buffers.get(key)
        if buffers is None:
            return tuple(step.invariant(*inputs, *tables))
        graph, writes, taken = self._invariant_graph(program, step, inputs, tables, key, buffers)
        if graph is None:
            return tuple(writes(*inputs, *tables, *buffers))
        # one replay instead of the program's launches one by one (Wan2.1-1.3B: ~780, all on the host's
        # clock before the first step replay, while the GPU idles); its "states" are the kept buffers, and
        # it keeps static copies only of the arguments it reads (text, timestep: not the chunk's latents
        # and position tables)
        return tuple(graph([*taken, *buffers]))

    def _invariant_graph(self, program, step: HoistedStep, inputs: list, tables: list, key: tuple, buffers: tuple):
        """(the captured invariant program writing into ``buffers``, or None where capture failed; the
        program; the arguments of ``inputs + tables`` it reads), captured on first use."""
        writes = self._in_place_programs(program, step)[1]
        used = used_arguments(writes, len(inputs) + len(tables))
        taken = [[*inputs, *tables][i] for i in used]
        if key not in self._invariant_graphs:
            self._invariant_graphs[key] = self._capture(
                "the chunk-invariant program", lambda: GraphedStep(
                    _OnArguments(writes, used, len(inputs) + len(tables)), [*taken, *buffers], n_outputs=0,
                    state_slice=slice(len(taken), len(taken) + len(buffers)), pool=self._pool,
                    shared_buffers=buffers, graphs=self.graphs, reads_states=False))
        return self._invariant_graphs[key], writes, taken

    def _capture(self, what: str, make):
        """``make()`` (a :class:`GraphedStep`), or None where the capture fails: that program then runs eagerly."""
        try:
            return make()
        except Exception as err:
            logger.warning("rc.stream: %s could not be captured as a CUDA graph (%s: %s); running it eagerly",
                           what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None

    def keep_invariant_buffers(self, program, inputs: list, tables: list, buffers: tuple) -> None:
        """Remember where a graph keeps this program's hoisted values, for calls with inputs of these shapes,
        and capture now the program that writes them there (passes/write_states_in_place.py), while the
        first call warms up, not on the next call's clock: it had cost the second call the pass over
        the whole step program (a compiled runner's: strm+c 951 ms timed vs 279 ms profiled, Wan2.1-1.3B
        at 81 frames) and the capture (eager G = 7: 389 ms timed vs 359 ms profiled). Its warm-up writes
        this call's values into the buffers, which hold them already."""
        if all(isinstance(b, torch.Tensor) for b in buffers):
            key = (id(program), _signature([*inputs, *tables]))
            self._invariant_buffers.setdefault(key, buffers)
            self._invariant_graph(program, self.hoisted(program), inputs, tables, key, self._invariant_buffers[key])

    def state_key(self, program) -> tuple:
        """:func:`_state_key` of ``program``'s initial states, made once per program (on the meta device:
        shapes and dtypes only), not on every call's host clock."""
        if id(program) not in self._state_keys:
            self._state_keys[id(program)] = _state_key(
                [t for site in program.sites for t in site.initial(torch.device("meta"))])
        return self._state_keys[id(program)]

    def call(self, device: torch.device) -> "_Call":
        """The executor of one model call on ``device``."""
        use_graphs = self.graphs.enabled(device, self.cuda_graphs) and not torch.is_grad_enabled()
        if use_graphs:
            weights = weight_addresses(self.model)
            if weights != self._weights:  # new weights: graphs captured on the old addresses are stale
                self._graphs.clear()
                self._shared_buffers.clear()
                self._state_buffers.clear()
                self._invariant_buffers.clear()
                self._invariant_graphs.clear()
                self._pool = None
                self._weights = weights
        return _Call(self, use_graphs)

    def graphed(self, program, step: HoistedStep, args: list) -> GraphedStep | None:
        """The graph for ``program`` at these arguments' signature (captured on first use), None if
        capture failed."""
        key = (id(program), _signature(args))
        if key not in self._graphs:
            n_in = len(program.input_dims) + len(program.table_dims)
            n_states = len(args) - n_in - step.n_hoisted
            states = slice(n_in, n_in + n_states)
            # states + invariants, shared by every graph of the same signature: the full-chunk and the
            # last-chunk programs of a call run in that order, and each replay copies in what differs
            key_shared = _signature(args[n_in:])
            graph = self._capture("the step program", lambda: GraphedStep(
                self.graph_fn(program, step), args, n_outputs=program.n_outputs, state_slice=states, pool=self._pool,
                shared_buffers=self._shared_buffers.get(key_shared), graphs=self.graphs))
            if graph is not None:
                self._pool = graph.pool() if self._pool is None else self._pool
                self._shared_buffers.setdefault(key_shared, graph.static[n_in:])
                self._state_buffers.setdefault(_state_key(args[states]), graph.static[states])
            self._graphs[key] = graph
        return self._graphs[key]


class _Call:
    """One model call: the hoisted values per program (computed on its first chunk), then each chunk."""

    def __init__(self, runner: StepRunner, use_graphs: bool):
        self.runner = runner
        self.use_graphs = use_graphs
        self._invariants: dict[int, tuple] = {}

    def initial_states(self, program, device: torch.device) -> list:
        """The states before a call's first chunk (S = 0, z = 0, an empty overlap cache). Where a graph
        already holds static states of these shapes, they are zeroed in place and returned: the first
        replay reads them where they are, and the state is never held twice (Wan2.1-1.3B's is 354 MiB)."""
        if self.use_graphs:
            buffers = self.runner._state_buffers.get(self.runner.state_key(program))
            if buffers is not None and all(b.device == device for b in buffers):
                for buffer in buffers:
                    buffer.zero_()
                return list(buffers)
        return [t for site in program.sites for t in site.initial(device)]

    def __call__(self, program, inputs: list, tables: list, states: list) -> list:
        """(*chunk outputs, *new states) of one chunk, as ``program.module(*inputs, *tables, *states)``."""
        step = self.runner.hoisted(program)
        first = id(program) not in self._invariants
        if first:
            # eager calls (gradients on, no graphs) make their own: the graphs' buffers are no autograd leaves
            self._invariants[id(program)] = self.runner.invariants(program, step, inputs, tables) if self.use_graphs \
                else tuple(step.invariant(*inputs, *tables))
        args = [*inputs, *tables, *states, *self._invariants[id(program)]]
        if self.use_graphs:
            graph = self.runner.graphed(program, step, args)
            if graph is not None:
                graph.load(args)
                # the invariants now live in the graph's buffers: later chunks pass those (no copy), and
                # the ones computed for this call are freed before the replay, not after it
                self._invariants[id(program)] = tuple(graph.static[len(args) - step.n_hoisted:])
                if first:
                    self.runner.keep_invariant_buffers(program, inputs, tables, self._invariants[id(program)])
                del args
                return graph.replay()
        return list(self.runner.step_fn(program, step)(*args))


__all__ = ["CudaGraphs", "GraphedStep", "RerunGraphs", "StepRunner", "graphs_enabled", "invariant_inputs", "same_view_groups",
           "used_arguments", "view_key", "weight_addresses"]
