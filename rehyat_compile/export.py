"""Export a video DiT with the latent-frame axis symbolic.

:func:`export_video_model` is the one entry point every pass (and the cost model) uses. It runs
``torch.export.export`` (non-strict, training IR, so ``aten.scaled_dot_product_attention`` stays one
node) with the time axis of one input marked ``Dim.AUTO``. When the model's code allows it, every
sequence length in the graph is then a sympy expression in one symbol ``s`` (the input's frame
count), and a video self-attention over ``T = s / patch`` token frames reads ``M*T + E``.

Which input dim is time
-----------------------
* default: dim 2 of the first 5-D floating-point tensor among the inputs (positional arguments
  first, then keyword arguments in the order given) -- diffusers' ``hidden_states`` [B, C, T, H, W];
  dim 1 when the model config's input channel count is at dim 2 or 4 instead of dim 1
  ([B, T, C, H, W] CogVideoX, [B, T, H, W, C] Kandinsky 5);
* ``frames=int``: that dim of the same tensor;
* ``frames=(name_or_index, dim)``: dim ``dim`` of keyword argument ``name`` or positional
  argument ``index`` (a tensor).

The temporal patch size (``patch``: input frames per token frame) is read from the model's
``config`` (``patch_size_t``, or the first entry of a 3-tuple ``patch_size``), else 1.

Fallback
--------
If the model's code specialises the frame axis (python ints from shapes, data-dependent control
flow) or the dynamic export raises, the model is exported statically; ``FrameAxis.dynamic`` is then
False, ``FrameAxis.reason`` says why, and layout inference relies on ``video_shape=(frames, h, w)``
(token grid after patching) given by the user. When the static export fails too for a reason about
autograd, it is tried once more under ``torch.no_grad`` (FlexAttention exports on CPU only without
grad); models that export with grad keep the graph they always had. A model that cannot be exported
at all raises :class:`~rehyat_compile.errors.ConversionError` (code "cannot-export") naming the
export error; ``rc.inspect`` / ``rc.transform`` then capture it through Dynamo
(:mod:`rehyat_compile.dynamo_capture`).
"""
from __future__ import annotations

import inspect as _inspect
import sys
from dataclasses import dataclass

import sympy
import torch
from torch.export import Dim, ExportedProgram, ShapesCollection

from .errors import ConversionError


@dataclass(frozen=True)
class FrameAxis:
    """Which input holds time, and how the export saw it.

    ``input``: keyword name or ``"args[i]"``; ``dim``: its time dim; ``size``: example input frames;
    ``patch``: input frames per token frame; ``symbol``: the ShapeEnv symbol of the input frame count
    (token frames = symbol / patch) or None when static; ``video_shape``: (frames, h, w) token grid
    given by the user or None; ``reason``: why the export is static ("" when dynamic).
    """

    input: str | None
    dim: int | None
    size: int | None
    patch: int = 1
    symbol: sympy.Symbol | None = None
    video_shape: tuple[int, int, int] | None = None
    reason: str = ""
    flat_index: int | None = None  # position of the frame input among the flattened (args, kwargs) leaves
    video_inputs: tuple[int, ...] = ()  # Dynamo-captured graphs: every input holding video tokens (flat_index first)

    @property
    def dynamic(self) -> bool:
        return self.symbol is not None

    @property
    def frames(self) -> int | None:
        """Token frames of the example input (after the temporal patch)."""
        if self.video_shape is not None:
            return self.video_shape[0]
        return None if self.size is None else self.size // self.patch

    def to_dict(self) -> dict:
        return {"input": self.input, "dim": self.dim, "size": self.size, "patch": self.patch,
                "symbol": None if self.symbol is None else str(self.symbol), "dynamic": self.dynamic,
                "video_shape": None if self.video_shape is None else list(self.video_shape),
                "reason": self.reason}


def check_video_shape(video_shape) -> tuple[int, int, int] | None:
    """Validate ``video_shape=(frames, h, w)`` (token grid after patching) or None."""
    if video_shape is None:
        return None
    if (not isinstance(video_shape, (tuple, list)) or len(video_shape) != 3
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in video_shape)):
        raise ValueError(f"video_shape must be (frames, h, w) of positive ints (token grid after patching), "
                         f"got {video_shape!r}")
    return tuple(video_shape)


def temporal_patch(model) -> int:
    """Input frames per token frame, from a diffusers-style ``config`` (1 when unknown)."""
    config = getattr(model, "config", None)
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    if config is None:
        return 1
    p_t = get("patch_size_t")
    if isinstance(p_t, int) and p_t >= 1:
        return p_t
    patch = get("patch_size")
    if isinstance(patch, (tuple, list)) and len(patch) == 3 and isinstance(patch[0], int) and patch[0] >= 1:
        return patch[0]
    return 1


def _named_inputs(model, args: tuple, kwargs: dict) -> list[tuple[str, object]]:
    """(name, value) of every top-level input: positional ones named by the forward signature."""
    try:
        params = [p.name for p in _inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    named = [(params[i] if i < len(params) else f"args[{i}]", a) for i, a in enumerate(args)]
    return named + list(kwargs.items())


def find_frame_input(model, args: tuple, kwargs: dict, frames=None) -> tuple[str, torch.Tensor, int] | None:
    """(input name, tensor, time dim) per the rules in the module docstring, or None if there is none."""
    named = _named_inputs(model, args, kwargs)
    if isinstance(frames, tuple):
        if len(frames) != 2 or not isinstance(frames[1], int):
            raise ValueError(f"frames must be None, an int dim, or (input name or index, dim), got {frames!r}")
        key, dim = frames
        if isinstance(key, int):
            if not 0 <= key < len(args):
                raise ValueError(f"frames={frames!r}: positional argument {key} does not exist ({len(args)} given)")
            name, tensor = named[key]
        else:
            matches = [(n, v) for n, v in named if n == key]
            if not matches:
                raise ValueError(f"frames={frames!r}: no input named {key!r}; inputs are {[n for n, _ in named]}")
            name, tensor = matches[0]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"frames={frames!r}: input {name!r} is not a tensor")
    elif frames is None or (isinstance(frames, int) and not isinstance(frames, bool)):
        candidates = [(n, v) for n, v in named
                      if isinstance(v, torch.Tensor) and v.dim() == 5 and v.is_floating_point()]
        if not candidates:
            if frames is not None:
                raise ValueError(f"frames={frames!r}: no 5-D floating-point input tensor to take it from")
            return None
        name, tensor = candidates[0]
        dim = frames if frames is not None else _default_time_dim(model, tensor)
    else:
        raise ValueError(f"frames must be None, an int dim, or (input name or index, dim), got {frames!r}")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"frames: dim {dim} is out of range for input {name!r} of shape {tuple(tensor.shape)}")
    return name, tensor, dim % tensor.dim()


def _default_time_dim(model, tensor: torch.Tensor) -> int:
    """2 ([B, C, T, H, W]); 1 when the config's input channel count (``in_channels`` / ``in_visual_dim``)
    sits at dim 2 (CogVideoX-style [B, T, C, H, W]) or last (Kandinsky-style [B, T, H, W, C])."""
    config = getattr(model, "config", None)
    channels = None
    for name in ("in_channels", "in_visual_dim"):
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int):
            channels = value
            break
    if channels is not None and tensor.shape[1] != channels and channels in (tensor.shape[2], tensor.shape[4]):
        return 1
    return 2


class _ModuleAttributes:
    """Snapshot of every submodule's plain attributes, restored after an export attempt: a failed
    symbolic trace can leave symbolic values cached on modules (Cosmos' RoPE does)."""

    def __init__(self, model: torch.nn.Module):
        self.saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in model.modules()]

    def restore(self) -> None:
        for module, attrs, params, buffers in self.saved:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)


class _CodeCaches:
    """The caches in the model's own code, emptied for an export and restored after it: dicts and
    lists of tensors held by the modules and classes that define the model's submodules (official
    repos cache position tables in such dicts), and ``functools`` caches there (cleared). A trace
    stores fake tensors in them, which the next trace or an eager call would read; and a trace that
    found an earlier call's table cached would bake it in as a constant where a trace at another
    length computes it, so every trace starts from empty caches."""

    def __init__(self, model: torch.nn.Module):
        namespaces, seen = [], set()
        for module in model.modules():
            for cls in type(module).__mro__:
                if cls.__module__.startswith(("torch.", "builtins")) or cls is object:
                    continue
                for space in (vars(cls), vars(sys.modules.get(cls.__module__, cls))):
                    if id(space) not in seen:
                        seen.add(id(space))
                        namespaces.append(space)
        self.saved = [(v, v.copy()) for space in namespaces for v in list(space.values())
                      if type(v) in (dict, list) and _holds_tensors(v)]
        self.functions = [v for space in namespaces for v in list(space.values()) if hasattr(v, "cache_clear")]

    def empty(self) -> "_CodeCaches":
        for container, _ in self.saved:
            container.clear()
        for function in self.functions:
            function.cache_clear()
        return self

    def restore(self) -> None:
        for container, copy in self.saved:
            container.clear()
            container.update(copy) if isinstance(container, dict) else container.extend(copy)
        for function in self.functions:
            function.cache_clear()


def _holds_tensors(container) -> bool:
    """True for an empty container (a cache not filled yet) or one holding tensors."""
    values = list(container.values()) if isinstance(container, dict) else list(container)
    return not values or any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(values[:8]))


class _DataAsDetach(torch.overrides.TorchFunctionMode):
    """Reads ``t.data`` as ``t.detach()`` (same values, same storage, no autograd history).

    Model code that builds a tensor inside forward and fills it through ``.data`` (diffusers'
    CogVideoX positional table at a frame count other than its config's) leaves the trace: export
    freezes the fake tensor it saw as a graph constant and fails ("fake tensor in the exported
    program constant's list"). ``detach`` is traced like any view, so the fill stays in the graph."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == torch.Tensor.data.__get__:  # == : each attribute read makes a new method-wrapper
            return args[0].detach()
        return func(*args, **(kwargs or {}))


def _leaked_fake_constant(exc: Exception) -> bool:
    return isinstance(exc, RuntimeError) and "fake tensor in the exported program constant" in str(exc)


def _export(model, args, kwargs, dynamic_shapes=None) -> ExportedProgram:
    def run():
        return torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes, strict=False)

    attributes, caches = _ModuleAttributes(model), _CodeCaches(model).empty()
    try:
        return run()
    except RuntimeError as exc:
        # Only models whose export failed this way are traced again with .data as detach: the
        # others keep the graph they always had (parameter .data reads stay plain constants).
        if not _leaked_fake_constant(exc):
            raise
    finally:
        caches.restore()  # whatever the trace cached is fake
    attributes.restore()  # the failed trace left its lifted fake constant on the module
    caches.empty()
    try:
        with _DataAsDetach():
            return run()
    finally:
        caches.restore()


def _fails_for_grad(exc: Exception) -> bool:
    """An export error about autograd (FlexAttention on CPU: "does not support backward ... set the
    input requires_grad to False"): the one kind a no-grad export may avoid."""
    text = str(exc)
    return "backward" in text or "requires_grad" in text


def _export_inference(model, args, kwargs, first: Exception) -> ExportedProgram:
    """The static export under ``torch.no_grad``: what fails only because export traces with grad
    (FlexAttention on CPU: "does not support backward") reaches its graph this way. Raises the
    cannot-export ConversionError naming ``first`` (the export with grad) when this fails too."""
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, (tuple(args), kwargs))
    try:
        with torch.no_grad():
            return _export(model, args, kwargs)
    except Exception:
        raise _cannot_export(first) from first


def _cannot_export(exc: Exception) -> ConversionError:
    """The whole-model refusal, naming the export error (code "cannot-export")."""
    return ConversionError(f"model cannot be exported with torch.export: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}", code="cannot-export")


def _placeholder_dim(ep: ExportedProgram, tensor_index: int, dim: int):
    """Shape entry ``dim`` of the ``tensor_index``-th user input placeholder of ``ep``."""
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder"][len(ep.graph_signature.inputs_to_parameters)
                                                                    + len(ep.graph_signature.inputs_to_buffers)
                                                                    + len(ep.graph_signature.inputs_to_lifted_tensor_constants):]
    return inputs[tensor_index].meta["val"].shape[dim]


def export_video_model(model, args, kwargs=None, *, frames=None, video_shape=None
                       ) -> tuple[ExportedProgram, FrameAxis]:
    """Export ``model(*args, **kwargs)`` with the time axis symbolic when the code allows it.

    Returns ``(ExportedProgram, FrameAxis)``; see the module docstring for the rules. ``video_shape``
    (frames, h, w) is the token grid after patching; it is only recorded here (layout inference
    uses it when the export is static). Raises ConversionError if the model cannot be exported.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = () if args is None else args
    if not isinstance(args, (tuple, list)):
        args = (args,)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    video_shape = check_video_shape(video_shape)
    found = find_frame_input(model, tuple(args), kwargs, frames)
    patch = temporal_patch(model)
    index = None
    if found is not None:
        index = next(i for i, t in enumerate(torch.utils._pytree.tree_leaves((tuple(args), kwargs))) if t is found[1])
    reason = ""
    if found is None:
        reason = "no 5-D video input found (pass frames=(input, dim))"
    else:
        name, tensor, dim = found
        collection = ShapesCollection()
        collection[tensor] = {dim: Dim.AUTO}
        attributes = _ModuleAttributes(model)
        try:
            ep = _export(model, args, kwargs, collection.dynamic_shapes(model, tuple(args), kwargs))
        except Exception as exc:  # any export failure: fall back to static below
            attributes.restore()
            reason = f"dynamic export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            size = _placeholder_dim(ep, index, dim)
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                return ep, FrameAxis(name, dim, tensor.shape[dim], patch, size.node.expr, video_shape, "", index)
            reason = "the model's code specialises the frame axis (shapes used as python ints)"
    # Fresh input tensors: a failed symbolic export can leave the old ones memoised as symbolic fakes.
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, (tuple(args), kwargs))
    attributes = _ModuleAttributes(model)
    try:
        ep = _export(model, args, kwargs)
    except Exception as exc:
        if not _fails_for_grad(exc):
            raise _cannot_export(exc) from exc
        attributes.restore()
        ep = _export_inference(model, args, kwargs, exc)
        reason = (reason + "; " if reason else "") + "exported under torch.no_grad (the export with grad failed)"
    if found is None:
        return ep, FrameAxis(None, None, None, patch, None, video_shape, reason)
    name, tensor, dim = found
    return ep, FrameAxis(name, dim, tensor.shape[dim], patch, None, video_shape, reason, index)
