"""Export a model to a graph of standard aten ops every backend here can import.

The hybrid op reaches the backends as its decomposition (``rc.decompositions("matmul")``: prefix
sums over chunks as a lower-triangular matmul, because TVM's VM cannot lower cumsum), on top of
PyTorch's core-aten table (composite ops such as ``reshape`` must be decomposed in the same pass,
or the op's decomposition is traced with views on non-contiguous fake tensors). Two further
rewrites keep the graph inside what TVM's Relax frontend takes: ``unfold`` becomes slices + stack,
and empty tensors (the zero extra tokens of a video-only layout) are dropped from ``cat``. A strided
``slice_scatter`` (``out[..., 0::2] = a``, how diffusers' Wan applies rotary embeddings) becomes
slices, reshapes and ``cat``: TVM 0.27 lowers the strided form for Adreno OpenCL with a wrong
index (each even channel read one row early; the x86 build of the same TIR is right).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from rehyat_compile.op import decompositions


def unfold_as_slices(x: torch.Tensor, dimension: int, size: int, step: int) -> torch.Tensor:
    """``x.unfold(dimension, size, step)`` written as static slices stacked on a new axis."""
    dim = dimension % x.dim()
    count = (x.shape[dim] - size) // step + 1
    windows = [x.narrow(dim, i * step, size) for i in range(count)]
    return torch.stack(windows, dim=dim).movedim(dim + 1, -1)


def empty_as_zeros(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    """``aten.empty`` (uninitialised) as ``zeros``, a valid choice of its values: once strided
    writes become slices and ``cat`` (:func:`slice_scatter_as_cat`) the unwritten slots are read,
    and IREE fails to bufferize reads of an uninitialised tensor."""
    return torch.zeros(size, dtype=dtype, device=device)


def empty_permuted_as_zeros(size, physical_layout, *, dtype=None, layout=None, device=None, pin_memory=None,
                            requires_grad=False):
    """``aten.empty_permuted`` (uninitialised, strides only differ) as contiguous ``zeros``:
    torch-mlir cannot legalise it (and see :func:`empty_as_zeros`)."""
    return torch.zeros(size, dtype=dtype, device=device)


def slice_scatter_as_cat(input: torch.Tensor, src: torch.Tensor, dim: int = 0, start=None, end=None,
                         step: int = 1):
    """``aten.slice_scatter`` with ``step > 1`` as static slices, a reshape to (n, step) groups
    along ``dim`` (src fills slot 0 of each group) and ``cat``; NotImplemented (keep the op) for
    ``step == 1``."""
    if step == 1:
        return NotImplemented
    dim = dim % input.dim()
    size, count = input.shape[dim], src.shape[dim]
    if count == 0:
        return input.clone()
    start = 0 if start is None else min(max(start + size if start < 0 else start, 0), size)
    span = (count - 1) * step + 1  # from the first written position to the last
    segment = input.narrow(dim, start, span)
    padding = [0, 0] * (input.dim() - 1 - dim) + [0, count * step - span]
    grouped = torch.constant_pad_nd(segment, padding).unflatten(dim, (count, step))
    filled = torch.cat([src.unsqueeze(dim + 1), grouped.narrow(dim + 1, 1, step - 1)], dim=dim + 1)
    pieces = [input.narrow(dim, 0, start), filled.flatten(dim, dim + 1).narrow(dim, 0, span),
              input.narrow(dim, start + span, size - start - span)]
    return torch.cat([p for p in pieces if p.shape[dim] > 0], dim=dim)


def portable_decompositions() -> dict:
    """Core-aten decompositions + the hybrid op as matmul-prefix aten + unfold as slices +
    uninitialised tensors as zeros + strided slice_scatter as slices and cat."""
    table = torch.export.default_decompositions()
    table.update(decompositions("matmul"))
    table[torch.ops.aten.unfold.default] = unfold_as_slices
    table[torch.ops.aten.empty.memory_format] = empty_as_zeros
    table[torch.ops.aten.empty_permuted.default] = empty_permuted_as_zeros
    table[torch.ops.aten.slice_scatter.default] = slice_scatter_as_cat
    return table


def _is_empty(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.numel() == 0


def drop_empty_concat_inputs(graph: fx.Graph) -> int:
    """Remove zero-size inputs of ``aten.cat`` (a cat of one input becomes that input).
    Returns how many cat nodes changed; dead nodes are removed."""
    changed = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.cat.default:
            continue
        inputs = node.args[0]
        kept = [t for t in inputs if not _is_empty(t)]
        if len(kept) == len(inputs) or not kept:
            continue
        changed += 1
        if len(kept) == 1 and kept[0].meta["val"].shape == node.meta["val"].shape:
            node.replace_all_uses_with(kept[0])
        else:
            node.args = (kept, *node.args[1:])
    graph.eliminate_dead_code()
    return changed


class _TensorsOnly(torch.nn.Module):
    """``model`` called with only the tensors of (args, kwargs); the other leaves (flags such as
    ``return_dict=False``) are fixed to their example values."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.model = model
        leaves, self.spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
        self.fixed = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def forward(self, *tensors):
        supply = iter(tensors)
        leaves = [next(supply) if fixed is None else fixed for fixed in self.fixed]
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, self.spec)
        return self.model(*args, **kwargs)


def portable_program(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` + the decompositions above: an ExportedProgram of standard aten ops whose
    inputs are the tensors of ``(args, kwargs)`` (:func:`tensor_leaves`), in order."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    from rehyat_compile.passes import pipeline  # its "portable" pass is decompose_for_backends
    with torch.no_grad():
        program = torch.export.export(_TensorsOnly(model, args, kwargs or {}), tuple(tensor_leaves(args, kwargs)))
        return pipeline.run(pipeline.PORTABLE, pipeline.PassResult(program)).graph


def decompose_for_backends(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The pipeline's "portable" pass: :func:`portable_decompositions`, then zero-size ``cat`` inputs
    dropped."""
    with torch.no_grad():
        program = program.run_decompositions(portable_decompositions())
    drop_empty_concat_inputs(program.graph_module.graph)
    program.graph_module.recompile()
    return program


def tensor_leaves(args: tuple, kwargs: dict | None = None) -> list[torch.Tensor]:
    """The tensors of ``(args, kwargs)`` in pytree order (other leaves such as
    ``return_dict=False`` are constants of the exported graph)."""
    leaves = torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs or {})))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape, dtype (torch name without 'torch.') and role ('input', 'state', 'weight',
    'output') of one tensor crossing the compiled function's boundary."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, role: str) -> "TensorSpec":
        return cls(name, tuple(int(d) for d in tensor.shape), str(tensor.dtype).removeprefix("torch."), role)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "role": self.role}


class _AllInputs(torch.nn.Module):
    """The exported graph as a function of (weights..., inputs...) returning a flat tuple."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *flat):
        return tuple(self.graph_module(*flat))


@dataclass
class FlatProgram:
    """A function of weights and inputs, all explicit: ``program`` (an ExportedProgram whose every
    placeholder is a user input, weights first), ``weights`` (name -> tensor, in argument order),
    and the specs of the inputs and outputs. Backends compile this; ``rc.load`` feeds it.
    ``calibration``: example input tuples (inputs only, in ``inputs`` order) of the calls this graph
    serves, for quantised builds; the example call unless the builder knows more (a step graph:
    every chunk of the example video, states fed through)."""

    program: torch.export.ExportedProgram
    weights: dict[str, torch.Tensor]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    calibration: list = field(default_factory=list)

    @property
    def arguments(self) -> list[TensorSpec]:
        return [TensorSpec.of(n, t, "weight") for n, t in self.weights.items()] + self.inputs


def positional_names(model: torch.nn.Module, count: int) -> list[str]:
    """Names of ``model.forward``'s first ``count`` positional parameters (``args[i]`` past a
    ``*args``)."""
    import inspect
    names = []
    for param in inspect.signature(model.forward).parameters.values():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) or len(names) == count:
            break
        names.append(param.name)
    return names + [f"args[{i}]" for i in range(len(names), count)]


def tensor_names(args: tuple, kwargs: dict | None = None, arg_names: list[str] | None = None) -> list[str]:
    """Readable names of :func:`tensor_leaves`: ``hidden_states`` (from ``arg_names``, else
    ``args[0]``), ``timestep``, ``cond['mask']``..."""
    paths, _ = torch.utils._pytree.tree_flatten_with_path((tuple(args), dict(kwargs or {})))
    names = []
    for path, leaf in paths:
        if isinstance(leaf, torch.Tensor):
            position, rest = path[1].idx if path[0].idx == 0 else None, torch.utils._pytree.keystr(path[2:])
            if position is None:
                names.append(torch.utils._pytree.keystr(path[1:]).strip("[]'\"") + rest)
            else:
                names.append((arg_names[position] if arg_names else f"args[{position}]") + rest)
    return names


def _with_state(specs: list, tensors, names: list[str], state_names: list[str]) -> list[TensorSpec]:
    """Specs of ``tensors``; the last ``len(state_names)`` take those names and the role 'state'."""
    first_state = len(names) - len(state_names)
    names = names[:first_state] + state_names
    return [TensorSpec.of(name, t, "state" if i >= first_state else role)
            for i, (name, t, role) in enumerate(zip(names, tensors, specs))]


def flat_program(program: torch.export.ExportedProgram, args: tuple, kwargs: dict | None = None, *,
                 state_names: tuple[str, ...] = (), state_inputs: bool = False,
                 arg_names: list[str] | None = None) -> FlatProgram:
    """Lift parameters, buffers and constants of ``program`` to leading arguments; the inputs are
    the tensors of ``(args, kwargs)``. With ``state_names`` the last outputs are the next
    recurrent state (named ``next_<name>``), and with ``state_inputs`` the last inputs the state."""
    from torch.export.graph_signature import InputKind, OutputKind
    lookup = {**program.state_dict, **program.constants}
    weights, user = {}, []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user.append(spec.arg.name)
        else:
            weights[spec.target] = lookup[spec.target].detach().contiguous()
    outs = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if len(outs) != len(program.graph_signature.output_specs):
        raise ValueError("model mutates buffers in forward; only pure functions can be built")
    flat_args = tensor_leaves(args, kwargs)
    if len(flat_args) != len(user):
        raise ValueError(f"the exported graph takes {len(user)} tensor inputs but args/kwargs hold {len(flat_args)} "
                         "tensors; tensors inside non-pytree containers are not supported")
    inputs = _with_state(["input"] * len(flat_args), flat_args, tensor_names(args, kwargs, arg_names),
                         list(state_names) if state_inputs else [])
    with torch.no_grad():
        results = tuple(program.graph_module(*weights.values(), *flat_args))
        flat = _AllInputs(program.graph_module)
        lifted = torch.export.export(flat, (*weights.values(), *flat_args))
    outputs = _with_state(["output"] * len(results), results, [f"output{i}" for i in range(len(results))],
                          [f"next_{n}" for n in state_names])
    return FlatProgram(lifted, weights, inputs, outputs, [tuple(t.detach().clone() for t in flat_args)])
