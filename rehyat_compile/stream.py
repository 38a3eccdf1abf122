"""``rc.stream``: run a converted (causal) video DiT chunk by chunk with a fixed-size state.

Inside one denoising step the whole DiT runs on chunk t (every layer), each converted layer reading
and updating its own state, then on chunk t+1 (docs/hybrid_attention.md, "Inside a diffusion step"). The chunk
program comes from :func:`rehyat_compile.passes.thread_state.thread_state`; this module feeds it.

    runner = rc.stream(hybrid)
    y = runner(*args, **kwargs)                      # == hybrid(*args, **kwargs) (causal form)
    for y_chunk in runner.iter_chunks(*args, **kwargs): ...
    runner.state_nbytes(*args, **kwargs)             # carried bytes, independent of the frame count
    module, example = runner.step_module(*args, **kwargs)
    torch.export.export(module, example)             # states as explicit inputs and outputs

``step_module`` is what ``rc.build(..., streaming=True)`` compiles: ``module(*chunk_inputs, *tables,
*states)`` returns ``(*chunk_outputs, *new_states)``; ``example`` is the first full chunk's inputs,
its tables and the initial states. :meth:`StreamRunner.signature` names every one of them.

Exports with a symbolic frame axis give one step program for every chunk. Fixed-shape exports
(Cosmos, LTX-Video with ``video_shape``) and fixed-size extra video inputs (WanVACE's control video)
are traced again on chunk-length inputs, one program per chunk length (the full chunk and a shorter
last one), by :func:`~rehyat_compile.passes.thread_state.thread_state_matched`. Which inputs are
chunked, and along which dim, comes from the whole-video graph's dataflow
(:func:`~rehyat_compile.passes.infer_input_frames.infer_input_frames`: what flows into the token axis
of the converted sites); an input whose role the graph does not give makes ``stream`` refuse, naming
it. Python ints are baked into such graphs: one that could count frames (``num_frames``,
``seq_len``) is traced both kept and scaled to the chunk, and the one way whose chunk graph matches
the whole video's is its role. For LTX-Video, ``video_shape`` fixes the frame count: transform per
length.

Position tables (RoPE, learned frame embeddings) are computed for the whole video and sliced per
chunk; a call of the same shapes and constants as the last (:func:`table_key`: the next denoising
step) reuses them. For a CUDA model they are kept in page-locked host memory and each step moves its
slice (:func:`table_home`), so device memory does not grow with the video length;
``table_device="cpu"`` also computes them there.
"""
from __future__ import annotations

import itertools

import torch
from torch import fx
from torch.export._tree_utils import reorder_kwargs
from torch.utils import _pytree as pytree

from .errors import ConversionError, ShapeError
from .export import temporal_patch
from .cuda_graph_step import StepRunner, used_arguments, view_key
from .op import HybridCall, is_hybrid_node
from .passes import pipeline
from .passes.thread_state import STATE_FIELDS, FrameDim, StepProgram


class _TablesOn(fx.Interpreter):
    """Evaluates a table module on another device: parameters and factory ops are moved there and
    the inputs are zero-memory stand-ins of the right shape (tables read only their shapes)."""

    def __init__(self, module, device):
        super().__init__(module)
        self.device = device

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            return torch.zeros((), dtype=value.dtype, device=self.device).expand(value.shape)
        return value

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return value.to(self.device) if isinstance(value, torch.Tensor) else value

    def call_function(self, target, args, kwargs):
        if "device" in kwargs:
            kwargs = {**kwargs, "device": self.device}
        return super().call_function(target, args, kwargs)


class StreamRunner(torch.nn.Module):
    """Runs a causal :class:`~rehyat_compile.HybridModel` chunk by chunk; see the module docstring.

    An ``nn.Module`` holding the hybrid (so ``.to()``, ``.parameters()``, ``.eval()`` reach the model's
    weights), whose unknown attributes (``config``, ``dtype``, ``device``, ``cache_context`` ...) pass
    through to it and to the original model: a drop-in ``pipe.transformer`` that streams."""

    def __init__(self, hybrid, *, table_device=None, cuda_graphs=None, compile=False, chunks_per_step=1):
        if not hasattr(hybrid, "graph_module") or not hasattr(hybrid, "original"):
            raise TypeError(f"stream needs the model returned by rc.transform (a HybridModel), got "
                            f"{type(hybrid).__name__}")
        plan = getattr(hybrid, "plan", None)
        if plan is None:
            raise TypeError(f"stream needs the model returned by rc.transform (a HybridModel), got "
                            f"{type(hybrid).__name__}")
        if not plan.options.causal:
            raise ConversionError(
                "stream needs a causal conversion: this model was transformed with causal=False, so each chunk's "
                "linear attention reads later frames and the video cannot run chunk by chunk; "
                "use rc.transform(..., causal=True)")
        super().__init__()
        self.hybrid = hybrid
        self.table_device = None if table_device is None else torch.device(table_device)
        if isinstance(chunks_per_step, bool) or not isinstance(chunks_per_step, int) or chunks_per_step < 1:
            raise ValueError(f"chunks_per_step must be an int >= 1 (chunks run by one step program), got {chunks_per_step!r}")
        self.chunks_per_step = chunks_per_step
        self._programs: dict[int, StepProgram] = {}
        self._roles: dict[int, tuple] = {}  # fixed-shape graphs: how each flat input is chunked
        self._steps = StepRunner(hybrid, cuda_graphs, compile)  # hoisting, CUDA graphs, compile: cuda_graph_step.py
        self._kept_tables: dict[int, tuple] = {}  # per step program: (table_key, the last call's tables)

    def __getattr__(self, name):
        return _pass_through(self, name)

    # -- the step programs for one call -------------------------------------------------------
    def plan(self, *args, **kwargs) -> "_Plan":
        """How this call runs: the flat inputs, the frame count, and a step program per chunk length."""
        gm = self.hybrid.graph_module(*args, **kwargs)
        frame_axis = self.hybrid.plan.frame_axis
        patch = frame_axis.patch if frame_axis is not None else temporal_patch(self.hybrid.original)
        if frame_axis is None or frame_axis.dynamic:
            if id(gm) not in self._programs:
                result = pipeline.run(pipeline.THREAD_STATE, pipeline.PassResult(gm), pipeline.PassContext(frame_axis, temporal_patch=patch))
                self._programs[id(gm)] = result.artifacts["step_program"]
            program = self._programs[id(gm)]
            flat = _flat(program.in_spec, args, kwargs)
            if not _static_frame_inputs(flat, program.input_dims, frame_axis):
                return _Plan(flat, _frames(flat, program.input_dims), program.chunk_frames, lambda length: program)
        return self._static_plan(gm, frame_axis, patch, args, kwargs)

    def _static_plan(self, full_gm, frame_axis, patch: int, args, kwargs) -> "_Plan":
        """Fixed-shape exports (or inputs exported with a fixed frame count): which inputs carry the
        frame axis comes from the graph's dataflow (:mod:`~rehyat_compile.passes.infer_input_frames`);
        the converted model is traced again on chunk-length inputs and :func:`thread_state_matched`
        compares the two graphs."""
        pytree_info = getattr(full_gm.graph._codegen, "pytree_info", None)
        in_spec = pytree_info.in_spec if pytree_info is not None else None
        flat = _flat(in_spec, args, kwargs)
        calls = [HybridCall.from_node(n) for n in full_gm.graph.nodes if is_hybrid_node(n)]
        if not calls:
            raise ConversionError("stream needs a converted model: the graph has no rehyat::hybrid_attention node")
        if id(full_gm) not in self._roles:
            self._roles[id(full_gm)] = self._input_roles(full_gm, frame_axis, patch, flat, in_spec, calls)
        dims, _ = self._roles[id(full_gm)]
        frames = _frames(flat, dims)
        video_shape = self.hybrid.plan.video_shape

        def program(length: int) -> StepProgram:
            key = (id(full_gm), length)
            if key not in self._programs:
                self._programs[key] = self._matched_program(full_gm, frame_axis, flat, dims, in_spec, frames, length,
                                                            video_shape)
            return self._programs[key]

        return _Plan(flat, frames, calls[0].chunk_frames, program)

    def _matched_program(self, full_gm, frame_axis, flat, dims, in_spec, frames, length, video_shape) -> StepProgram:
        """The step program of a chunk of ``length`` token frames: a trace of the converted model on
        the chunk's inputs, matched against the whole-video graph."""
        chunk_flat = _chunk(flat, dims, 0, length)
        chunk_args, chunk_kwargs = _unflatten_call(chunk_flat, in_spec)
        chunk_video = None if video_shape is None else (length, *video_shape[1:])
        try:
            chunk_gm = self.hybrid.graph_module_for(chunk_args, chunk_kwargs, video_shape=chunk_video)
        except ConversionError as exc:
            raise ConversionError(f"stream: the model does not run on a chunk of {length} frames"
                                  f"{_fixed_length_hint(self._roles.get(id(full_gm)), frames)}: {exc}") from exc
        settings = dict(full_graph=full_gm, chunk_inputs=chunk_flat, full_inputs=flat, chunk_frames=length,
                        frames=frames, input_dims=dims)
        context = pipeline.PassContext(frame_axis, settings=settings)
        return pipeline.run(pipeline.THREAD_STATE_MATCHED, pipeline.PassResult(chunk_gm), context).artifacts["step_program"]

    def _input_roles(self, full_gm, frame_axis, patch, flat, in_spec, calls) -> tuple[list, tuple]:
        """How each flat input is chunked: tensors from the dataflow (refusing inputs whose role the
        graph does not give), then python ints, which fixed-shape graphs bake in: an int that could
        count frames (a multiple of the frame count) is tried both ways in chunk traces."""
        frames, sizes = _call_frames(frame_axis, self.hybrid.plan.video_shape, patch, flat)
        context = pipeline.PassContext(frame_axis, settings={"frames": frames, "sizes": sizes})
        roles = pipeline.run(pipeline.INFER_INPUT_FRAMES, pipeline.PassResult(full_gm), context).artifacts["input_frames"]
        if len(roles.dims) != len(flat):
            raise ConversionError(f"stream: the graph takes {len(roles.dims)} inputs, the call gives {len(flat)}")
        if roles.unknown:
            raise ConversionError(_unknown_roles_message(roles.unknown))
        dims = list(roles.dims)
        if not any(isinstance(d, FrameDim) for d in dims):
            raise ConversionError("stream: no input of the model reaches the converted sites' frames")
        frames = _frames(flat, dims)
        self._roles[id(full_gm)] = (dims, roles.constants)  # read by the error of a failed chunk trace
        per_frame = {d.per_frame for d in dims if isinstance(d, FrameDim)} | {c.tokens_per_frame for c in calls}
        counts = {i: _count_candidates(x, frames, per_frame) for i, x in enumerate(flat) if _is_count(x)}
        counts = {i: c for i, c in counts.items() if c}
        if counts:  # python ints the graph baked in: decided by chunk traces
            length = min(calls[0].chunk_frames, frames)
            dims = self._resolve_counts(full_gm, frame_axis, flat, dims, in_spec, counts, length,
                                        roles, frames)
        return dims, roles.constants

    def _resolve_counts(self, full_gm, frame_axis, flat, dims, in_spec, counts, length, roles, frames) -> list:
        """Ints that could count frames (``num_frames``, ``seq_len``): each way (kept, or scaled to the
        chunk) is traced at one chunk; the role is the one way that traces and matches the whole-video
        graph (kept when both give the same chunk graph). Otherwise stream refuses, naming the int."""
        if len(counts) > 3:
            raise ConversionError(f"stream: {len(counts)} int inputs could count frames ("
                                  + ", ".join(roles.names[i] for i in counts) + "); their roles cannot be derived")
        video_shape = self.hybrid.plan.video_shape
        indices = sorted(counts)
        outcomes, failures = [], []
        for choice in itertools.product(*[[None] + counts[i] for i in indices]):
            trial = list(dims)
            for i, role in zip(indices, choice):
                trial[i] = role
            try:
                program = self._matched_program(full_gm, frame_axis, flat, trial, in_spec, frames, length, video_shape)
            except (ConversionError, ShapeError) as exc:
                failures.append(f"{'kept' if all(c is None for c in choice) else choice}: "
                                f"{str(exc).splitlines()[0][:160]}")
                continue
            outcomes.append((choice, trial, program))
        if not outcomes:
            names = ", ".join(f"{roles.names[i]}={flat[i]}" for i in indices)
            raise ConversionError(f"stream: no role of the int inputs {names} (kept, or counted per frame) gives a "
                                  "chunk graph that matches the whole video's, so the model is not streamed ("
                                  + "; ".join(failures) + ")")
        kept = [(trial, program) for choice, trial, program in outcomes if all(c is None for c in choice)]
        if len({program.module.code for *_, program in outcomes}) == 1 and kept:
            return self._keep(full_gm, length, *kept[0])  # the ints do not change the chunk graph
        if len(outcomes) > 1:
            names = ", ".join(f"{roles.names[i]}={flat[i]}" for i in indices)
            raise ConversionError(f"stream cannot tell the role of the int inputs {names}: kept and counted per "
                                  "frame both trace a chunk, to different graphs; the model is not streamed")
        return self._keep(full_gm, length, *outcomes[0][1:])

    def _keep(self, full_gm, length: int, dims: list, program: StepProgram) -> list:
        """The chosen roles; their trial's step program serves chunks of ``length`` (not traced again)."""
        self._programs[(id(full_gm), length)] = program
        return dims

    def program(self, *args, **kwargs) -> StepProgram:
        """The :class:`StepProgram` of this call's first chunk (every chunk's, unless the export is static)."""
        plan = self.plan(*args, **kwargs)
        return plan.program(min(plan.chunk_frames, plan.frames))

    def _tables(self, program: StepProgram, flat: list) -> tuple:
        if self.table_device is None:
            return tuple(program.table_module(*flat))
        return tuple(_TablesOn(program.table_module, self.table_device).run(*flat))

    def _call_tables(self, program: StepProgram, flat: list, device: torch.device) -> tuple:
        """The whole video's tables for one call, from the last call's where :func:`table_key` says they
        are the same (a denoising loop asks for the same tables at every step). Kept where
        :func:`table_home` says: in host memory for a CUDA model, so the device holds one step's slices
        of them, not the whole video's (Wan2.1-1.3B at 641 frames: 2 fp32 tables of 251,160 tokens x 128, 245 MiB), and device memory does not
        grow with the video's length. Tables that carry gradients (a learned frame embedding, trained
        through the stream) are made fresh on every call, and stay where they were made; a call with
        an input :func:`table_key` cannot key makes its own too."""
        key = table_key(program, flat)
        kept = self._kept_tables.get(id(program))
        if key is not None and kept is not None and kept[0] == key:
            return kept[1]
        tables = self._tables(program, flat)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tables):
            self._kept_tables.pop(id(program), None)
            return tables
        home = table_home(device, self.table_device)
        tables = tuple(move_views(tables, lambda t: _to_home(t, home)))
        if key is None:
            self._kept_tables.pop(id(program), None)
        else:
            self._kept_tables[id(program)] = (key, tables)
        return tables

    # -- running ----------------------------------------------------------------------------------
    def _chunk_calls(self, plan: "_Plan", chunks_per_step: int | None = None):
        """Yields (program, chunk frames, the step program's arguments, its outputs) per step, states
        fed through; steps as :func:`step_spans` cuts them for ``chunks_per_step`` (the runner's by
        default)."""
        device = _device(plan.flat)
        tables: dict[int, tuple] = {}
        states = None
        step = self._steps.call(device)
        per_step = self.chunks_per_step if chunks_per_step is None else chunks_per_step
        for start, stop in step_spans(plan.frames, plan.chunk_frames, per_step):
            program = plan.program(stop - start)
            if stop - start > plan.chunk_frames:
                _check_several_chunks(program, self.chunks_per_step)
            if id(program) not in tables:
                tables[id(program)] = self._call_tables(program, plan.flat, device)
            if states is None:
                states = step.initial_states(program, device)  # the graphs' own buffers, zeroed, where there are
            inputs = _chunk(plan.flat, program.input_dims, start, stop)
            chunk_tables = _chunk(tables[id(program)], program.table_dims, start, stop, device)
            arguments = [*inputs, *chunk_tables, *states]
            outs = step(program, inputs, chunk_tables, states)  # == program.module(*arguments)
            states = list(outs[program.n_outputs:])
            yield program, stop - start, arguments, outs

    def _run_chunks(self, plan: "_Plan"):
        """Yields (program, flat outputs) per chunk."""
        for program, _, _, outs in self._chunk_calls(plan):
            yield program, list(outs[:program.n_outputs])

    def step_inputs(self, *args, **kwargs) -> list[tuple[int, tuple]]:
        """(chunk frames, the step module's tensor inputs) for every chunk of this call, in order,
        each chunk's states those the chunk before it returned: what a step graph sees in use (the
        calibration data of quantised builds)."""
        with torch.no_grad():
            return [(length, tuple(a.detach().clone() for a in arguments if isinstance(a, torch.Tensor)))
                    for _, length, arguments, _ in self._chunk_calls(self.plan(*args, **kwargs), 1)]

    def iter_chunks(self, *args, **kwargs):
        """One output per step (:func:`step_spans`: a chunk, or up to ``chunks_per_step`` of them), each
        in the model's output structure restricted to that step's frames."""
        for program, outs in self._run_chunks(self.plan(*args, **kwargs)):
            yield pytree.tree_unflatten(outs, program.out_spec) if program.out_spec is not None else outs

    def forward(self, *args, **kwargs):
        """The converted model's output, computed chunk by chunk."""
        return self.run(self.plan(*args, **kwargs))

    def run(self, plan: "_Plan"):
        """Run a call's :meth:`plan`: every chunk in order, outputs joined along their frame dims."""
        chunks, program = [], None
        for program, outs in self._run_chunks(plan):
            chunks.append(outs)
        return join_chunks(chunks, program.output_dims, program.out_spec)

    def state_nbytes(self, *args, **kwargs) -> int:
        """Bytes of the state carried between chunks (every converted layer); independent of frames."""
        program = self.program(*args, **kwargs)
        return sum(site_state_nbytes(site) for site in program.sites)

    # -- export ------------------------------------------------------------------------------------
    def step_module(self, *args, **kwargs) -> tuple["StepModule", tuple]:
        """(:class:`StepModule`, example: the first full chunk's tensor inputs, its tables and the
        initial state) -- what ``rc.build(module, example[:-len(module.state_names)], streaming=True)``
        compiles. With a fixed-shape export the module serves chunks of exactly ``chunk_frames``."""
        plan = self.plan(*args, **kwargs)
        return self._step_module_at(plan, 0, min(plan.chunk_frames, plan.frames))

    def last_step_module(self, *args, **kwargs) -> tuple["StepModule", tuple] | None:
        """The same for the short last chunk of this call's video, None when the chunks divide it."""
        plan = self.plan(*args, **kwargs)
        rest = plan.frames % plan.chunk_frames
        if not rest or plan.frames < plan.chunk_frames:
            return None
        return self._step_module_at(plan, plan.frames - rest, plan.frames)

    def _step_module_at(self, plan: "_Plan", start: int, stop: int) -> tuple["StepModule", tuple]:
        program = plan.program(stop - start)
        device = _device(plan.flat)
        inputs = _chunk(plan.flat, program.input_dims, start, stop)
        tables = _chunk(self._tables(program, plan.flat), program.table_dims, start, stop, device)
        states = [t for site in program.sites for t in site.initial(device)]
        _propagate_meta(program.module, tuple(inputs + tables + states))
        module = StepModule(program, inputs)
        # Own storage for every example tensor: slices of the whole video would carry its storage.
        example = tuple(x for x in inputs if isinstance(x, torch.Tensor)) + tuple(tables) + tuple(states)
        return module, tuple(t.clone() for t in example)

    def stream_spec(self, *args, **kwargs) -> tuple[dict, list[torch.Tensor]]:
        """(JSON-serialisable chunking of this call, the whole video's tables): what a streaming
        artifact needs to run the video chunk by chunk for the user (``rc.load(...).stream``).
        Tables are computed for this call's frame count."""
        plan = self.plan(*args, **kwargs)
        program = plan.program(min(plan.chunk_frames, plan.frames))
        tables = [t.detach().contiguous().cpu() for t in self._tables(program, plan.flat)]
        spec = {"frames": plan.frames, "chunk_frames": plan.chunk_frames,
                "input_dims": [dim_to_json(d) for d in program.input_dims],
                "table_dims": [dim_to_json(d) for d in program.table_dims],
                "output_dims": [dim_to_json(d) for d in program.output_dims],
                "in_spec": None if program.in_spec is None else pytree.treespec_dumps(program.in_spec),
                "out_spec": None if program.out_spec is None else pytree.treespec_dumps(program.out_spec)}
        return spec, tables

    def signature(self, *args, **kwargs) -> dict:
        """Names of the step module's inputs and outputs, grouped (for manifests)."""
        program = self.program(*args, **kwargs)
        placeholders = [n.name for n in program.module.graph.find_nodes(op="placeholder")]
        n_in, n_tab = len(program.input_dims), len(program.table_dims)
        states = [f"{site.name}.{f}" for site in program.sites for f in STATE_FIELDS]
        return {"inputs": placeholders[:n_in], "tables": placeholders[n_in:n_in + n_tab],
                "states_in": states, "outputs": [f"output_{i}" for i in range(program.n_outputs)],
                "states_out": states, "chunk_frames": program.chunk_frames}


def step_spans(frames: int, chunk_frames: int, chunks_per_step: int) -> list[tuple[int, int]]:
    """The (start, stop) frames of each step program call over a video of ``frames`` frames.

    G = ``chunks_per_step`` = 1 is chunk by chunk: every whole chunk a step, a short last chunk
    (``frames % chunk_frames`` frames) a step of its own. With G > 1, steps of G whole chunks while
    more than that remains, then one last step of everything left: up to G whole chunks, the short
    chunk among them (a step runs its chunks in the chunk-parallel form, which takes a short last
    chunk as the converted model does). A call runs ceil(frames / (G * chunk_frames)) steps, the
    fewest that steps of at most G chunks allow, and memory stays bounded by G, not by the video. A
    runner serving many lengths captures the G-chunk graph once and one last-step graph per distinct
    remainder (at most G * chunk_frames - 1 of them)."""
    if frames <= 0:
        return []
    step = chunks_per_step * chunk_frames   # G = 1: the last step is the short chunk, or a whole one
    full = max(0, -(-frames // step) - 1)   # every step but the last is a full one
    spans = [(i * step, (i + 1) * step) for i in range(full)]
    return spans + [(full * step, frames)]


def _check_several_chunks(program: StepProgram, chunks_per_step: int) -> None:
    """Several chunks per step need sites without extra tokens: each chunk carries its own copy of them."""
    joint = [site.name for site in program.sites if site.extra_before != 0 or site.extra_after != 0]
    if joint:
        raise ConversionError(
            f"stream(chunks_per_step={chunks_per_step}): site {joint[0]} attends to extra (non-video) tokens, and "
            "each chunk carries its own copy of them, so one step cannot run several chunks; use chunks_per_step=1")


def _pass_through(runner: torch.nn.Module, name: str):
    """``runner.<name>``: its own submodules and parameters first, then the hybrid's attribute (which
    falls back to the original model's)."""
    try:
        return torch.nn.Module.__getattr__(runner, name)
    except AttributeError:
        hybrid = runner.__dict__.get("_modules", {}).get("hybrid")
        if hybrid is None:
            raise
        return getattr(hybrid, name)


class StepModule(torch.nn.Module):
    """The step program as an ``nn.Module`` for export and ``rc.build(..., streaming=True)``:
    ``forward(*chunk_tensors, *tables, *state) -> (*chunk_outputs, *next_state)``; with the state
    left out it starts from the initial (empty) one, as the first chunk does. The model's non-tensor
    inputs (``return_dict`` ...) are fixed to the values given here. ``state_names``: one per state
    tensor, ``"<site>.<HybridState field>"``; ``chunk_frames``: token frames per chunk."""

    def __init__(self, program: StepProgram, chunk_inputs: list):
        super().__init__()
        self.step = program.module
        self.sites = program.sites
        self.chunk_frames = program.chunk_frames
        self.state_names = tuple(f"{site.name}.{f}" for site in program.sites for f in STATE_FIELDS)
        self._constants = {i: x for i, x in enumerate(chunk_inputs) if not isinstance(x, torch.Tensor)}
        self._n_inputs = len(chunk_inputs) - len(self._constants) + len(program.table_dims)

    def forward(self, *tensors):
        inputs, state = list(tensors[:self._n_inputs]), list(tensors[self._n_inputs:])
        if not state:
            device = next((t.device for t in inputs), torch.device("cpu"))
            state = [t for site in self.sites for t in site.initial(device)]
        for i in sorted(self._constants):
            inputs.insert(i, self._constants[i])
        return tuple(self.step(*inputs, *state))


class FrameCount:
    """An int input that counts frames: ``per_frame * frames + extra`` (LTX-Video's ``num_frames``,
    a token count ``seq_len``, a joint length ``max_seqlen`` = video tokens + text); a chunk gets
    ``per_frame * chunk frames + extra``."""

    def __init__(self, per_frame: int, extra: int = 0):
        self.per_frame, self.extra = per_frame, extra

    def take(self, value, start: int, stop: int) -> int:
        return self.per_frame * (stop - start) + self.extra

    def __eq__(self, other):
        return isinstance(other, FrameCount) and (self.per_frame, self.extra) == (other.per_frame, other.extra)

    def __hash__(self):
        return hash((self.per_frame, self.extra))

    def __repr__(self):
        return f"FrameCount(per_frame={self.per_frame}, extra={self.extra})"


class _Plan:
    """One call: flat inputs, token frames, the sites' chunk size, and ``program(length)``: the step
    program for a chunk of that many frames."""

    def __init__(self, flat: list, frames: int, chunk_frames: int, program):
        self.flat, self.frames, self.chunk_frames, self.program = flat, frames, chunk_frames, program


def join_chunks(chunks: list[list], output_dims: list, out_spec):
    """The whole video's output from each chunk's flat outputs: frame-dependent outputs joined along
    their frame dim, their extra (non-video) entries and the other outputs from the last chunk, which
    has seen every frame through the state."""
    last, flat = chunks[-1], []
    for i, fd in enumerate(output_dims):
        if fd is None:
            flat.append(last[i])
            continue
        size = last[i].shape[fd.dim]
        head = [last[i].narrow(fd.dim, 0, fd.extra)] if fd.extra else []
        tail = [last[i].narrow(fd.dim, size - fd.extra_after, fd.extra_after)] if fd.extra_after else []
        body = [c[i].narrow(fd.dim, fd.extra, c[i].shape[fd.dim] - fd.extra - fd.extra_after) for c in chunks]
        flat.append(torch.cat(head + body + tail, fd.dim))
    return pytree.tree_unflatten(flat, out_spec) if out_spec is not None else flat


def dim_to_json(fd):
    """A FrameDim / FrameCount / None as JSON (for manifests)."""
    if fd is None:
        return None
    if isinstance(fd, FrameCount):
        return {"count": fd.per_frame, "extra": fd.extra}
    return {"dim": fd.dim, "per_frame": fd.per_frame, "extra": fd.extra, "extra_after": fd.extra_after}


def dim_from_json(value):
    if value is None:
        return None
    if "count" in value:
        return FrameCount(value["count"], value.get("extra", 0))
    return FrameDim(value["dim"], value["per_frame"], value["extra"], value.get("extra_after", 0))


def _flat(in_spec, args, kwargs) -> list:
    """The model's inputs flattened in the export's order."""
    if in_spec is None:
        return list(args)
    kwargs = reorder_kwargs(dict(kwargs), in_spec) if kwargs else {}
    return pytree.tree_leaves((tuple(args), kwargs))


def _device(flat: list) -> torch.device:
    """Where the call's tensors live (the states are made there)."""
    return next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))


def _frames(flat: list, dims: list) -> int:
    """Token frames of the call, from the first chunked tensor input."""
    for x, fd in zip(flat, dims):
        if isinstance(x, torch.Tensor) and isinstance(fd, FrameDim):
            body = x.shape[fd.dim] - fd.extra - fd.extra_after
            if body <= 0 or body % fd.per_frame:
                raise ShapeError(f"an input of shape {tuple(x.shape)} has {x.shape[fd.dim]} entries in its frame "
                                 f"dim {fd.dim}, not {fd.per_frame} * frames + {fd.extra + fd.extra_after}")
            return body // fd.per_frame
    raise ConversionError("no input of the model has a frame-dependent dim to chunk")


def _value_key(x) -> tuple | None:
    """What a table module reads of one flat input: a tensor's shape, dtype and device (tables are made
    from shapes and constants alone, passes/thread_state.py), a Python scalar's value; None for any other
    value (whose equality a key cannot promise)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return ("value", type(x).__name__, x)
    return None


def table_key(program: StepProgram, flat: list) -> tuple | None:
    """What ``program.table_module(*flat)`` depends on: the :func:`_value_key` of the inputs it reads (Wan2.1:
    the latents' shape, not the text's, so a negative prompt of another length keeps the tables) and,
    per tensor the module reads (``get_attr``: RoPE frequencies, a learned frame embedding), its storage
    and version counter, so new or updated weights (``.to()``, ``load_state_dict``, an optimizer step)
    give a new key. None where an input it reads is neither a tensor nor a scalar: such a call's tables
    are not kept."""
    if len(program.table_module.graph.find_nodes(op="placeholder")) != len(flat):  # not this program's inputs
        return None
    inputs = tuple(_value_key(flat[i]) for i in used_arguments(program.table_module, len(flat)))
    if any(k is None for k in inputs):
        return None
    constants = []
    for node in program.table_module.graph.find_nodes(op="get_attr"):
        value = program.table_module
        for name in node.target.split("."):
            value = getattr(value, name)
        if isinstance(value, torch.Tensor):
            constants.append((node.target, value.data_ptr(), value._version, tuple(value.shape), value.dtype,
                              value.device))
    return inputs, tuple(constants)


def table_home(device: torch.device, table_device: torch.device | None) -> torch.device:
    """Where a stream keeps a call's whole-video tables: ``table_device`` when given, host memory when the
    model runs on CUDA (each step moves its slice), else the model's device."""
    if table_device is not None:
        return table_device
    return torch.device("cpu") if device.type == "cuda" else device


def _to_home(x, home: torch.device):
    """``x`` moved to ``home``; page-locked when that is the host and CUDA is there, so each step's slice
    moves to the device asynchronously."""
    if not isinstance(x, torch.Tensor) or x.device == home:
        return x
    x = x.detach().to(home)
    return x.pin_memory() if home.type == "cpu" and torch.cuda.is_available() else x


def move_views(values, move) -> list:
    """``move(x)`` for each tensor, once per distinct view (:func:`~rehyat_compile.cuda_graph_step.view_key`):
    values that were the same view of the same memory (Wan2.1's 4 slices of one position table per
    block) stay one tensor, which a CUDA graph then holds once."""
    moved: dict[tuple, torch.Tensor] = {}
    out = []
    for x in values:
        if isinstance(x, torch.Tensor):
            key = view_key(x)
            if key not in moved:
                moved[key] = move(x)
            x = moved[key]
        out.append(x)
    return out


def _chunk(values, dims: list, start: int, stop: int, device=None) -> list:
    """Each value restricted to token frames [start, stop) per its dim (None: unchanged), then moved to
    ``device`` (where given) view by view (:func:`move_views`)."""
    out = []
    for x, fd in zip(values, dims):
        if fd is not None and (isinstance(x, torch.Tensor) or isinstance(fd, FrameCount)):
            x = fd.take(x, start, stop)
        out.append(x)
    if device is None:
        return out
    return move_views(out, lambda x: x.to(device, non_blocking=True))


def _static_frame_inputs(flat: list, dims: list, frame_axis) -> bool:
    """True when an input has the frame input's frame count in the same dim but a fixed size in the
    export (VACE's control video): the dynamic graph is only valid at that one size."""
    if frame_axis is None or frame_axis.flat_index is None or frame_axis.flat_index >= len(flat):
        return False
    video = flat[frame_axis.flat_index]
    return any(isinstance(x, torch.Tensor) and fd is None and i != frame_axis.flat_index and x.dim() == video.dim()
               and x.shape[frame_axis.dim] == video.shape[frame_axis.dim] for i, (x, fd) in enumerate(zip(flat, dims)))


def _call_frames(frame_axis, video_shape, patch: int, flat: list) -> tuple[int | None, dict]:
    """(token frames of this call, {frame symbol: input frames} when the graph has one): from the
    frame input the export found, else ``video_shape``, else None (the pass reads its sites)."""
    if frame_axis is not None and frame_axis.flat_index is not None and frame_axis.flat_index < len(flat):
        size = flat[frame_axis.flat_index].shape[frame_axis.dim]
        if size % patch:
            raise ShapeError(f"the video has {size} frames, not a multiple of the temporal patch {patch}")
        return size // patch, ({frame_axis.symbol: size} if frame_axis.symbol is not None else {})
    if video_shape is not None:
        return video_shape[0], {}
    return None, {}


def _unknown_roles_message(unknown) -> str:
    """The reasons first (the node the walk stopped at), then the inputs each leaves without a role."""
    by_reason: dict[str, list[str]] = {}
    for name, why in unknown:
        by_reason.setdefault(why, []).append(name)
    parts = [f"{why} (input{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names[:4])}"
             f"{f' and {len(names) - 4} more' if len(names) > 4 else ''})" for why, names in by_reason.items()]
    return ("stream cannot follow the frame axis of the inputs: " + "; ".join(parts) + "; chunking them by their "
            "sizes could be silently wrong, so the model is not streamed")


def _fixed_length_hint(roles, frames: int) -> str:
    """Why a model may run at its example length only: constants holding exactly that many frames."""
    if roles is None:
        return ""
    fixed = [name for name, fr in roles[1] if fr.plain]
    if not fixed:
        return ""
    return (f" (the model's constant {fixed[0]!r} holds exactly {frames} frames and reaches the converted sites "
            "unsliced, so its code runs at that frame count only)")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _count_candidates(x: int, frames: int | None, per_frame: set[int]) -> list:
    """The frame-count roles a python int could have: x = per_frame * frames (+ extra, for the
    per-frame counts of the inputs and sites: tokens per frame, input frames per token frame)."""
    if not frames:
        return []
    roles = [FrameCount(x // frames)] if x % frames == 0 else []
    return roles + [FrameCount(p, x - p * frames) for p in sorted(per_frame) if 0 < x - p * frames]


def _unflatten_call(flat: list, in_spec) -> tuple[tuple, dict]:
    """(args, kwargs) of a call from its flat inputs in the export's order."""
    if in_spec is None:
        return tuple(flat), {}
    args, kwargs = pytree.tree_unflatten(flat, in_spec)
    return tuple(args), dict(kwargs)


def site_state_nbytes(site) -> int:
    """Bytes of one site's state, from its shapes (allocates nothing)."""
    return site.initial(torch.device("meta")).nbytes()


def _propagate_meta(module: fx.GraphModule, example: tuple) -> None:
    """Set every node's ``meta["val"]`` to the fake value for ``example`` (chunk shapes, not the
    full video's), so later passes and backends see the step graph's real shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # a shape environment: data-dependent sizes (Mochi's unmasked text length) become unbacked symbols
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    for node in module.graph.nodes:
        node.meta.pop("unbacked_bindings", None)  # names from the export's shape environment, not this one
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example]
    try:
        FakeTensorProp(module, mode).propagate_dont_convert_inputs(*fakes)
    except Exception as exc:  # surfaces as one clear error instead of a fake-tensor traceback
        raise ConversionError(f"the step graph cannot be traced for a chunk with fixed shapes: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def stream(hybrid, *, table_device=None, cuda_graphs=None, compile=False, chunks_per_step=1) -> StreamRunner:
    """A :class:`StreamRunner` for a causal ``rc.transform`` result (raises ConversionError otherwise).
    ``cuda_graphs``: replay each step program as a CUDA graph (None: on CUDA, unless REHYAT_CUDA_GRAPHS=0);
    ``compile``: run each step program through torch.compile; ``chunks_per_step``: chunks one step
    program runs (the same function; a step holds G chunks' activations, measured peaks in
    docs/stream.md; models whose sites attend to extra tokens take 1)."""
    return StreamRunner(hybrid, table_device=table_device, cuda_graphs=cuda_graphs, compile=compile,
                        chunks_per_step=chunks_per_step)


__all__ = ["StreamRunner", "move_views", "step_spans", "stream", "table_home", "table_key"]
