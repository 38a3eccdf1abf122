"""``rc.stream``: run a converted (causal) video DiT chunk by chunk with a fixed-size state.

Inside one denoising step the whole DiT runs on chunk t (every layer), each converted layer reading
and updating its own state, then on chunk t+1 (REHYAT.md, "Inside a diffusion step"). The chunk
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

Position tables (RoPE, learned frame embeddings) are computed once per call for the whole video and
sliced per chunk. ``table_device="cpu"`` computes and keeps them in host memory and moves one chunk's
slice at a time, so device memory does not grow with the video length.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.export._tree_utils import reorder_kwargs
from torch.utils import _pytree as pytree

from .errors import ConversionError, ShapeError
from .export import temporal_patch
from .passes.thread_state import STATE_FIELDS, FrameDim, StepProgram, thread_state


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


class StreamRunner:
    """Runs a causal :class:`~rehyat_compile.HybridModel` chunk by chunk; see the module docstring."""

    def __init__(self, hybrid, *, table_device=None):
        if not hasattr(hybrid, "graph_module") or not hasattr(hybrid, "original"):
            raise TypeError(f"stream needs the model returned by rc.transform (a HybridModel), got "
                            f"{type(hybrid).__name__}")
        conversion = hybrid.conversion
        if not conversion.get("causal", True):
            raise ConversionError(
                "stream needs a causal conversion: this model was transformed with causal=False, so each chunk's "
                "linear attention reads later frames and the video cannot run chunk by chunk; "
                "use rc.transform(..., causal=True)")
        self.hybrid = hybrid
        self.table_device = None if table_device is None else torch.device(table_device)
        self._programs: dict[int, StepProgram] = {}

    # -- the step program for an input structure ---------------------------------------------
    def program(self, *args, **kwargs) -> StepProgram:
        """The :class:`StepProgram` for this input structure (built once, then cached)."""
        gm = self.hybrid.graph_module(*args, **kwargs)
        key = id(gm)
        if key not in self._programs:
            frame_axis = getattr(self.hybrid, "_frame_axis", None)
            patch = frame_axis.patch if frame_axis is not None else temporal_patch(self.hybrid.original)
            if frame_axis is not None and not frame_axis.dynamic:
                raise ConversionError(
                    "stream needs the model exported with a symbolic frame axis, but its export is static "
                    f"({frame_axis.reason}); the per-chunk program cannot be derived from a fixed-size graph")
            self._programs[key] = thread_state(gm, patch=patch)
        return self._programs[key]

    def _flat(self, program: StepProgram, args, kwargs) -> list:
        if program.in_spec is None:
            return list(args)
        kwargs = reorder_kwargs(dict(kwargs), program.in_spec) if kwargs else {}
        return pytree.tree_leaves((tuple(args), kwargs))

    @staticmethod
    def _frames(program: StepProgram, flat: list) -> int:
        for x, fd in zip(flat, program.input_dims):
            if fd is not None:
                body = x.shape[fd.dim] - fd.extra
                if body <= 0 or body % fd.per_frame:
                    raise ShapeError(f"an input of shape {tuple(x.shape)} has {x.shape[fd.dim]} entries in its frame "
                                     f"dim {fd.dim}, not {fd.per_frame} * frames + {fd.extra}")
                return body // fd.per_frame
        raise ConversionError("no input of the model has a frame-dependent dim to chunk")

    @staticmethod
    def _device(flat: list) -> torch.device:
        return next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))

    def _tables(self, program: StepProgram, flat: list) -> tuple:
        if self.table_device is None:
            return tuple(program.table_module(*flat))
        return tuple(_TablesOn(program.table_module, self.table_device).run(*flat))

    @staticmethod
    def _chunk(values, dims: list[FrameDim | None], start: int, stop: int, device=None) -> list:
        out = []
        for x, fd in zip(values, dims):
            if isinstance(x, torch.Tensor):
                x = fd.take(x, start, stop) if fd is not None else x
                x = x.to(device, non_blocking=True) if device is not None else x
            out.append(x)
        return out

    def _initial_states(self, program: StepProgram, device) -> list[torch.Tensor]:
        return [t for site in program.sites for t in site.initial(device)]

    # -- running ----------------------------------------------------------------------------------
    def _run_chunks(self, args, kwargs):
        """Yields (start frame, stop frame, flat outputs) per chunk."""
        program = self.program(*args, **kwargs)
        flat = self._flat(program, args, kwargs)
        frames = self._frames(program, flat)
        device = self._device(flat)
        tables = self._tables(program, flat)
        states = self._initial_states(program, device)
        n_out, tc = program.n_outputs, program.chunk_frames
        for start in range(0, frames, tc):
            stop = min(start + tc, frames)
            inputs = self._chunk(flat, program.input_dims, start, stop)
            chunk_tables = self._chunk(tables, program.table_dims, start, stop, device)
            outs = program.module(*inputs, *chunk_tables, *states)
            states = list(outs[n_out:])
            yield start, stop, list(outs[:n_out])

    def iter_chunks(self, *args, **kwargs):
        """One output per chunk, each in the model's output structure restricted to that chunk."""
        program = self.program(*args, **kwargs)
        for _, _, outs in self._run_chunks(args, kwargs):
            yield pytree.tree_unflatten(outs, program.out_spec) if program.out_spec is not None else outs

    def __call__(self, *args, **kwargs):
        """The converted model's output, computed chunk by chunk."""
        program = self.program(*args, **kwargs)
        pieces: list[list] = [[] for _ in program.output_dims]
        last = None
        for _, _, outs in self._run_chunks(args, kwargs):
            last = outs
            for i, (x, fd) in enumerate(zip(outs, program.output_dims)):
                if fd is not None:
                    pieces[i].append(x.narrow(fd.dim, fd.extra, x.shape[fd.dim] - fd.extra))
        flat = []
        for i, fd in enumerate(program.output_dims):
            if fd is None:
                flat.append(last[i])
            else:
                # extra (non-video) entries: the last chunk's, which has seen every frame through the state
                head = [last[i].narrow(fd.dim, 0, fd.extra)] if fd.extra else []
                flat.append(torch.cat(head + pieces[i], fd.dim))
        return pytree.tree_unflatten(flat, program.out_spec) if program.out_spec is not None else flat

    def state_nbytes(self, *args, **kwargs) -> int:
        """Bytes of the state carried between chunks (every converted layer); independent of frames."""
        program = self.program(*args, **kwargs)
        return sum(site_state_nbytes(site) for site in program.sites)

    # -- export ------------------------------------------------------------------------------------
    def step_module(self, *args, **kwargs) -> tuple[fx.GraphModule, tuple]:
        """(step GraphModule, example inputs of the first full chunk: chunk inputs, tables, states)."""
        program = self.program(*args, **kwargs)
        flat = self._flat(program, args, kwargs)
        frames = self._frames(program, flat)
        device = self._device(flat)
        stop = min(program.chunk_frames, frames)
        inputs = self._chunk(flat, program.input_dims, 0, stop)
        tables = self._chunk(self._tables(program, flat), program.table_dims, 0, stop, device)
        example = tuple(inputs + tables + self._initial_states(program, device))
        _propagate_meta(program.module, example)
        return program.module, example

    def signature(self, *args, **kwargs) -> dict:
        """Names of the step module's inputs and outputs, grouped (for manifests)."""
        program = self.program(*args, **kwargs)
        placeholders = [n.name for n in program.module.graph.find_nodes(op="placeholder")]
        n_in, n_tab = len(program.input_dims), len(program.table_dims)
        states = [f"{site.name}.{f}" for site in program.sites for f in STATE_FIELDS]
        return {"inputs": placeholders[:n_in], "tables": placeholders[n_in:n_in + n_tab],
                "states_in": states, "outputs": [f"output_{i}" for i in range(program.n_outputs)],
                "states_out": states, "chunk_frames": program.chunk_frames}


def site_state_nbytes(site) -> int:
    """Bytes of one site's state, from its shapes (allocates nothing)."""
    return site.initial(torch.device("meta")).nbytes()


def _propagate_meta(module: fx.GraphModule, example: tuple) -> None:
    """Set every node's ``meta["val"]`` to the fake value for ``example`` (chunk shapes, not the
    full video's), so later passes and backends see the step graph's real shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example]
    FakeTensorProp(module, mode).propagate_dont_convert_inputs(*fakes)


def stream(hybrid, *, table_device=None) -> StreamRunner:
    """A :class:`StreamRunner` for a causal ``rc.transform`` result (raises ConversionError otherwise)."""
    return StreamRunner(hybrid, table_device=table_device)


__all__ = ["StreamRunner", "stream"]
