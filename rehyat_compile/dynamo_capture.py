"""Dynamo capture: convert models that ``torch.export`` cannot take whole.

Official research code often turns tensors into python values inside ``forward`` (Wan2.1's
``grid_sizes.tolist()``, Open-Sora's ``height[0].item()``) or branches on tensor values (diffusers'
HunyuanVideo-1.5). ``torch.export`` refuses such a model; ``torch.compile`` runs it by capturing FX
graphs between graph breaks (Dynamo) and running the code between them eagerly. This module uses a
custom ``torch.compile`` backend to do the same, and puts every captured graph through the SAME
pass pipeline as an exported model (:mod:`rehyat_compile.passes.pipeline`):

1. the backend receives a torch-level graph ``gm`` and its example inputs (real tensors, the
   model's parameters among them); :func:`aten_graph` re-exports it with ``torch.export`` (a Dynamo
   graph holds no data-dependent python, so this is clean) under ``torch.no_grad`` to the aten
   graph the passes read, keeping which module each node came from (:func:`tag_modules`);
2. :data:`~rehyat_compile.passes.pipeline.ANALYSIS` runs on it with a static
   :class:`~rehyat_compile.export.FrameAxis` built from the call's shapes (:func:`graph_frame_axis`);
3. the graph's sites are named per module instance at run time: with inlined modules, Dynamo
   captures ONE graph for every layer of a class (the parameters are graph inputs), so the module a
   site belongs to is found from the identity of the parameters the graph is called with
   (:func:`parameter_sources`, :func:`instance_prefixes`, :func:`named_sites`);
4. :data:`~rehyat_compile.passes.pipeline.REWRITE` turns each chosen site of one (graph, instance)
   into one ``rehyat::hybrid_attention`` node (the op of exported models: same kernel, same cost).

Shapes are static per call (``dynamic=False``): a call with another frame count re-captures (the
number of captures is bounded and reported). :class:`DynamoConversion` holds the compiled model,
the captured graphs and the rendered programs; :class:`~rehyat_compile.transform.HybridModel` and
``rc.inspect`` use it when the export fails (docs/transform.md, "Dynamo capture").
"""
from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch._dynamo
import torch.fx.traceback as fx_traceback
from torch import fx, nn
from torch.utils import _pytree as pytree

from .declines import Decline
from .errors import ConversionError
from .export import FrameAxis, find_frame_input, temporal_patch
from .passes import pipeline
from .passes.infer_video_layout import reaches_without_attention
from .site import Site, site_key

MODULE_TAG = "rehyat_module"  # node.meta["custom"][MODULE_TAG] = (frame local, module path below it)
DEFAULT_MAX_CAPTURES = 8  # distinct call structures (frame counts) captured before a call is refused
_LOCAL_PATH = re.compile(r"^L\['([^']+)'\](.*)$")
_SEGMENT = re.compile(r"\.([A-Za-z0-9_]+)|\['([^']*)'\]|\[(\d+)\]")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}  # how Dynamo reaches attributes, not names


# ---------------------------------------------------------------------------------------------
# Pure functions: one captured graph
# ---------------------------------------------------------------------------------------------

def split_local_path(path: str) -> tuple[str, str]:
    """A Dynamo source or module path -> (frame local, dotted path below it):
    ``"L['self'].blocks[0].attn"`` and ``"L['self'].__dict__['_modules']['blocks']._modules['0']"``
    -> ("self", "blocks.0.attn") / ("self", "blocks.0"); ``("", path)`` for anything else (globals)."""
    found = _LOCAL_PATH.match(path)
    if found is None:
        return "", path
    rest, names, position = found.group(2), [], 0
    for segment in _SEGMENT.finditer(rest):
        if segment.start() != position:  # not a plain attribute / item chain
            return "", path
        position = segment.end()
        name = next(g for g in segment.groups() if g is not None)
        if name not in _CONTAINERS:
            names.append(name)
    if position != len(rest):
        return "", path
    return found.group(1), ".".join(names)


def tag_modules(gm: fx.GraphModule) -> None:
    """Record on every node of a Dynamo graph which module it came from, in ``meta["custom"]``
    (``torch.export`` copies that field onto the aten nodes it traces from the node).
    Nodes at the top of the captured frame get ("", "")."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        where = split_local_path(list(stack.values())[-1][0]) if stack else ("", "")
        node.meta["custom"] = {**(node.meta.get("custom") or {}), MODULE_TAG: where}


class _Interpreted(nn.Module):
    """A captured graph as a module that runs it node by node (so node meta reaches the export)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return fx.Interpreter(self.gm).run(*args)


def aten_graph(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """The aten-level graph of a Dynamo graph: ``torch.export`` (non-strict, no grad) of ``gm`` on its
    example inputs, unlifted (``ep.module()``: same positional inputs and outputs as ``gm``). Each node's
    ``nn_module_stack`` reads ``"@<frame local>.<path>"`` (:func:`tag_modules`), which
    :func:`named_sites` resolves to the module instance at run time."""
    tag_modules(gm)
    with torch.no_grad(), fx_traceback.preserve_node_meta():
        ep = torch.export.export(_Interpreted(gm), tuple(example_inputs), strict=False)
    out = ep.module()
    for node in out.graph.nodes:
        where = (node.meta.get("custom") or {}).get(MODULE_TAG)
        if where is not None:
            local, path = where
            node.meta["nn_module_stack"] = {"rehyat": ("@" + local + ("." + path if path else ""), "")}
    return out


_TORCH_ATTENTION = {"scaled_dot_product_attention", "softmax", "_softmax", "flex_attention"}


def unexported_sites(gm: fx.GraphModule, error: str) -> tuple[Site, ...]:
    """Declined sites ("cannot-export") for the attention-like calls of a Dynamo graph that
    ``torch.export`` could not re-export, so they are reported rather than silently kept."""
    sites = []
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_function", "call_method") and name in _TORCH_ATTENTION:
            local, path = (node.meta.get("custom") or {}).get(MODULE_TAG, ("", ""))
            encoded = "@" + local + ("." + path if path else "")
            sites.append(Site(encoded, encoded, "self", name, decline=Decline(
                "cannot-export", f"its captured graph could not be exported to aten ops: {error}")))
    return tuple(sites)


def parameter_sources(gm: fx.GraphModule) -> dict[int, tuple[str, str]]:
    """placeholder index -> (frame local, parameter path below it) for the model parameters and
    buffers among a Dynamo graph's inputs (``L['self']._modules['qkv']._parameters['weight']`` ->
    ("self", "qkv.weight"))."""
    out = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        example = getattr(arg, "example", None)
        if not isinstance(name, str) or not isinstance(example, torch.Tensor):
            continue
        local, path = split_local_path(name)
        if local and path and (isinstance(example, nn.Parameter) or "_buffers" in name):
            out[i] = (local, path)
    return out


def frame_self(sources: dict[int, tuple[str, str]]) -> str:
    """The frame local that sites at the top of the captured frame belong to: ``self`` when the
    graph reads its parameters, else the only local it reads parameters of, else ""."""
    locals_ = {local for local, _ in sources.values()}
    if "self" in locals_:
        return "self"
    return next(iter(locals_)) if len(locals_) == 1 else ""


def instance_prefixes(sources: dict[int, tuple[str, str]], args, parameter_paths: dict[int, str]) -> dict[str, str]:
    """frame local -> its module path in the user's model, from the parameters this call passes
    (``parameter_paths``: id(tensor) -> qualified name in the model)."""
    out: dict[str, str] = {}
    for i, (local, rel) in sources.items():
        if local in out or i >= len(args):
            continue
        full = parameter_paths.get(id(args[i]))
        if full is not None and (full == rel or full.endswith("." + rel)):
            out[local] = full[: len(full) - len(rel)].rstrip(".")
    return out


def site_module(encoded: str, prefixes: dict[str, str], default_local: str, graph: int) -> str:
    """A site's module path from its encoded ``"@<local>.<path>"``; an unresolved local reads
    ``"<graph i>"`` (one site per captured graph, shared by every instance)."""
    local, _, path = encoded[1:].partition(".") if encoded.startswith("@") else ("", "", encoded)
    local = local or default_local
    if local in prefixes:
        base = prefixes[local]
    else:
        base = f"<graph {graph}>"
    return ".".join(p for p in (base, path) if p)


def named_sites(sites, prefixes: dict[str, str], default_local: str, graph: int) -> tuple[Site, ...]:
    """The graph's sites named after the module instance of this call ("<module>:<i>" for the i-th
    after the first in one module), each with ``graph`` set."""
    counts: dict[str, int] = {}
    out = []
    for site in sites:
        module = site_module(site.module, prefixes, default_local, graph)
        index = counts.get(module, 0)
        counts[module] = index + 1
        name = module if index == 0 else f"{module}:{index}"
        out.append(replace(site, name=name, module=module, key=site_key(name), graph=graph))
    return tuple(out)


class VideoTensors:
    """The tensors of the call in flight that hold the video tokens: the video input, then each
    captured graph's outputs that the video reaches without passing an attention (the residual
    stream, not the text after a joint attention). A later graph reads which of its inputs is the
    video from this (:func:`graph_frame_axis`), as an exported graph reads its frame input placeholder.
    Held weakly: a freed tensor's id is never mistaken for a new one."""

    def __init__(self, video=None):
        self._alive = weakref.WeakValueDictionary()
        if video is not None:
            self.add(video)

    def add(self, tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            self._alive[id(tensor)] = tensor

    def __contains__(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and self._alive.get(id(tensor)) is tensor


def graph_frame_axis(call_axis: FrameAxis, example_inputs, videos: VideoTensors) -> FrameAxis:
    """The call's static frame axis for one graph: ``flat_index`` is the position of the first input
    holding video tokens (None when the graph reads none), ``video_inputs`` the positions of all."""
    held = tuple(i for i, t in enumerate(example_inputs) if t in videos)
    return replace(call_axis, flat_index=held[0] if held else None, video_inputs=held)


def video_outputs(aten: fx.GraphModule, video_inputs) -> tuple[bool, ...]:
    """Per flat output of ``aten``: whether an input in ``video_inputs`` (placeholder positions) reaches
    it without passing an attention."""
    placeholders = list(aten.graph.find_nodes(op="placeholder"))
    sources = [placeholders[i] for i in video_inputs if i < len(placeholders)]
    output = next(n for n in aten.graph.nodes if n.op == "output")
    return tuple(isinstance(x, fx.Node) and any(reaches_without_attention(x, p) for p in sources)
                 for x in pytree.tree_leaves(output.args[0]))


def call_frame_axis(model, args, kwargs, frames, video_shape, reason: str) -> tuple[FrameAxis, object]:
    """(static FrameAxis of this call, the video tensor or None). ``video_shape``'s frame count follows
    the call's (a re-capture at another frame count keeps h, w)."""
    found = find_frame_input(model, tuple(args), kwargs, frames)
    patch = temporal_patch(model)
    if found is None:
        return FrameAxis(None, None, None, patch, None, video_shape, reason), None
    name, tensor, dim = found
    if video_shape is not None and tensor.shape[dim] // patch != video_shape[0]:
        video_shape = (tensor.shape[dim] // patch, video_shape[1], video_shape[2])
    return FrameAxis(name, dim, tensor.shape[dim], patch, None, video_shape, reason), tensor


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""


def break_reason(gm: fx.GraphModule) -> str:
    """Why Dynamo ended this graph, "" when not at a graph break: the construct and where in the
    user's code, e.g. ``"Data dependent operator at model.py:41: for i, (f, h, w) in
    enumerate(grid_sizes.tolist()):"`` (from ``gm.compile_subgraph_reason``)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return ""
    text = first_line(str(reason.reason))
    stack = list(getattr(reason, "user_stack", None) or [])
    if stack:
        frame = stack[-1]
        code = (frame.line or "").strip()
        text += f" at {os.path.basename(frame.filename)}:{frame.lineno}" + (f": {code}" if code else "")
    return text


def unmarked(args, kwargs) -> tuple[tuple, dict]:
    """The inputs as fresh aliases (``t.view_as(t)``: same storage and autograd history) without the
    ``_dynamo_*`` dim marks a failed ``torch.export`` leaves on them; Dynamo would otherwise trace
    those dims symbolically, and each capture is static per call."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.view_as(t), (tuple(args), dict(kwargs)))


def parameter_paths(model: nn.Module) -> dict[int, str]:
    """id(parameter or buffer) -> its qualified name in ``model`` (first name of a shared tensor)."""
    out: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        out.setdefault(id(t), name)
    return out


# ---------------------------------------------------------------------------------------------
# The conversion: compiled model, captured graphs, rendered programs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CapturedGraph:
    """One graph Dynamo captured: ``index`` (capture order), ``aten`` (the analysed aten graph,
    pristine), ``frame_axis`` (static, of the call it was captured in), ``sites`` (named
    ``"@<local>.<path>"`` until :func:`named_sites` places them), ``sources`` (parameter inputs, see
    :func:`parameter_sources`), ``self_local`` (:func:`frame_self`), ``break_reason`` (the graph break
    that ended it, :func:`break_reason`), ``error`` (why it could not be re-exported, "" when it was),
    ``video_outputs`` (:func:`video_outputs`)."""

    index: int
    aten: fx.GraphModule | None
    frame_axis: FrameAxis
    sites: tuple[Site, ...]
    sources: dict
    self_local: str
    break_reason: str = ""
    error: str = ""
    video_outputs: tuple[bool, ...] = ()


@dataclass
class _Call:
    """The call in flight: its frame axis, the tensors holding video, the model's parameter names."""

    axis: FrameAxis
    videos: VideoTensors
    parameter_paths: dict = field(default_factory=dict)


class _GraphRunner:
    """What the backend returns for one captured graph: runs it through the conversion."""

    def __init__(self, owner: "DynamoConversion", index: int, eager):
        self.owner, self.index, self.eager = owner, index, eager

    def __call__(self, *args):
        return self.owner.run_graph(self.index, self.eager, args)


class DynamoConversion:
    """The model compiled with a custom backend, its captured graphs and their rewritten programs.

    ``render(aten, frame_axis, sites) -> GraphModule`` makes the converted program of one (graph,
    instance) from the chosen sites (the pipeline's REWRITE on a copy; HybridModel supplies it, with
    the feature maps); ``choose(sites) -> sites`` picks which to convert (``layers=``). Without
    ``render`` (``rc.inspect``) every graph runs as captured. ``export_error``: why torch.export failed.
    """

    def __init__(self, model: nn.Module, export_error: str, *, frames=None, video_shape=None, render=None,
                 choose=None, max_captures: int = DEFAULT_MAX_CAPTURES):
        self.model = model
        self.export_error = export_error
        self.frames = frames
        self.video_shape = video_shape
        self.render = render
        self.choose = choose or (lambda sites: [s for s in sites if s.rewritable])
        self.max_captures = max_captures
        self.graphs: list[CapturedGraph] = []
        self.breaks: list[str] = []
        self.structures: dict = {}  # call structure key -> sites recorded by its analysis run
        self.programs: dict = {}  # (graph index, instance) -> (GraphModule or None, converted sites)
        self.converted_ran = 0
        self._recording: list | None = None
        self._call: _Call | None = None
        self._compiled = torch.compile(model, backend=self._backend, dynamic=False)

    # -- backend ------------------------------------------------------------------------------
    def _backend(self, gm: fx.GraphModule, example_inputs):
        index = len(self.graphs)
        videos = self._call.videos
        axis = graph_frame_axis(self._call.axis, example_inputs, videos)
        sources, reason = parameter_sources(gm), break_reason(gm)
        if reason and reason not in self.breaks:
            self.breaks.append(reason)
        try:
            aten = aten_graph(gm, example_inputs)
        except Exception as exc:  # a graph export cannot take stays as Dynamo captured it
            error = f"{type(exc).__name__}: {first_line(str(exc))[:200]}"
            self.graphs.append(CapturedGraph(index, None, axis, unexported_sites(gm, error), sources,
                                             frame_self(sources), reason, error))
            return _GraphRunner(self, index, gm.forward)
        sites = tuple(pipeline.analyse(aten, axis, self.model))
        carried = video_outputs(aten, axis.video_inputs)
        self.graphs.append(CapturedGraph(index, aten, axis, sites, sources, frame_self(sources), reason, "", carried))
        return _GraphRunner(self, index, gm.forward)

    def _instance(self, graph: CapturedGraph, args) -> tuple:
        prefixes = instance_prefixes(graph.sources, args, self._call.parameter_paths)
        return tuple(sorted(prefixes.items()))

    def run_graph(self, index: int, eager, args):
        """One call of captured graph ``index``: record its sites (analysis run) or run its program."""
        graph = self.graphs[index]
        instance = self._instance(graph, args)
        sites = named_sites(graph.sites, dict(instance), graph.self_local, index)
        if self._recording is not None:
            self._recording.append(sites)
            return self._carry_video(graph, eager(*args))
        key = (index, instance)
        if key not in self.programs:
            chosen = list(self.choose(list(sites))) if self.render is not None else []
            program = self.render(graph.aten, graph.frame_axis, chosen) if chosen else None
            self.programs[key] = (program, tuple(chosen))
        program, chosen = self.programs[key]
        if program is None:
            return self._carry_video(graph, eager(*args))
        self.converted_ran += len(chosen)
        return self._carry_video(graph, program(*args))

    def _carry_video(self, graph: CapturedGraph, out):
        """Record the outputs of ``graph`` that hold video tokens (for the graphs after it); returns ``out``."""
        for carries, tensor in zip(graph.video_outputs, pytree.tree_leaves(out)):
            if carries:
                self._call.videos.add(tensor)
        return out

    # -- calls -------------------------------------------------------------------------------
    def _run(self, args, kwargs):
        patch = dict(recompile_limit=max(64, 16 * self.max_captures), accumulated_recompile_limit=4096,
                     capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False)
        with torch._dynamo.config.patch(**patch):
            return self._compiled(*args, **kwargs)

    def analyse(self, args, kwargs, structure) -> tuple[tuple[Site, ...], FrameAxis]:
        """Run the model once with every graph as captured, recording each graph's sites per
        instance (deduplicated, call order); captures the graphs of a new call structure. Returns
        (sites, the call's FrameAxis). Raises ConversionError when Dynamo fails or the bound on
        captures is reached."""
        args, kwargs = unmarked(args, kwargs)
        axis, video = self._call_axis(args, kwargs)
        if structure in self.structures:
            return self.structures[structure], axis
        if len(self.structures) >= self.max_captures:
            raise ConversionError(
                f"Dynamo capture: this call needs a new capture (frame count {axis.frames}), and "
                f"{len(self.structures)} were made already (the bound, max_captures={self.max_captures}); shapes are "
                "static per capture, call with a frame count used before", code="cannot-export")
        self._call = _Call(axis, VideoTensors(video), parameter_paths(self.model))
        self._recording = []
        try:
            self._run(args, kwargs)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(
                f"model cannot be captured: torch.export failed ({self.export_error}) and so did Dynamo "
                f"(torch.compile): {type(exc).__name__}: {first_line(str(exc))[:300]}", code="cannot-export") from exc
        finally:
            recorded, self._recording = self._recording, None
            self._call = None
        seen, sites = set(), []
        for group in recorded:
            for site in group:
                if site.name not in seen:
                    seen.add(site.name)
                    sites.append(site)
        self.structures[structure] = tuple(sites)
        return self.structures[structure], axis

    def __call__(self, args, kwargs):
        """Run the converted model (every chosen site of every captured graph as the hybrid op)."""
        args, kwargs = unmarked(args, kwargs)
        axis, video = self._call_axis(args, kwargs)
        self._call = _Call(axis, VideoTensors(video), parameter_paths(self.model))
        self.converted_ran = 0
        try:
            return self._run(args, kwargs)
        finally:
            self._call = None

    def _call_axis(self, args, kwargs):
        return call_frame_axis(self.model, args, kwargs, self.frames, self.video_shape,
                               f"shapes static per Dynamo capture; torch.export failed: {self.export_error[:160]}")

    @property
    def captures(self) -> int:
        """How many call structures (frame counts) have been captured."""
        return len(self.structures)

    def graph_errors(self) -> list[str]:
        return [f"graph {g.index}: {g.error}" for g in self.graphs if g.error]


def structure_key(args, kwargs, mode=()) -> tuple:
    """Cache key of a call: pytree structure, tensor shapes, dtypes, devices and other values (every
    shape static: a Dynamo capture is per frame count), and ``mode``."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    key = tuple(("tensor", tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor)
                else ("value", repr(x)) for x in leaves)
    return str(spec), key, mode


__all__ = ["CapturedGraph", "DynamoConversion", "VideoTensors", "aten_graph", "break_reason", "call_frame_axis",
           "frame_self", "graph_frame_axis", "instance_prefixes", "named_sites", "parameter_sources", "site_module",
           "split_local_path", "structure_key", "tag_modules", "unexported_sites", "unmarked", "video_outputs"]
