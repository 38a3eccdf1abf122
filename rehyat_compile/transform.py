"""``rc.inspect`` and ``rc.transform``: find softmax attention in a video DiT and rewrite it.

One export per input structure (and training mode): :func:`~rehyat_compile.export.export_video_model`
(frame axis symbolic) -> ``ep.module()`` -> the analysis passes of :mod:`rehyat_compile.passes.pipeline`
(canonicalise, find, classify, layout) -> its rewrite pass on a copy, once with the plan's options
(the hybrid graph) and once as softmax (the teacher graph). The rewritten ``torch.fx.GraphModule`` reads the ORIGINAL model's parameters
(its ``get_attr`` targets are ``original.<path>``; shared, not copied, so ``.to()``/``state_dict``
act on one set) and calls the feature maps as ``feature_maps.<key>.phi_q`` / ``phi_k``.

:class:`HybridModel` is an ``nn.Module`` called exactly like the original:

* ``hybrid.original``: the user's model; unknown attributes (``config``, ``dtype``, ``device``,
  ``cache_context`` ...) pass through to it, so it works as ``pipe.transformer``;
* ``hybrid.feature_maps``: ``nn.ModuleDict`` site key -> module with ``phi_q``, ``phi_k``
  (:class:`~rehyat_compile.FeatureMap`): the trainable parameters;
* ``hybrid.plan``: the immutable :class:`ConversionPlan` (options, layers, video shape, frame axis,
  sites); ``hybrid.sites``: its converted :class:`~rehyat_compile.site.Site` s (layout, scale, heads,
  kv heads); ``hybrid.report``: every site found, converted or not;
* ``hybrid.graph_module(*args, **kwargs)``: the rewritten GraphModule for that input structure;
  each converted site is ONE ``torch.ops.rehyat.hybrid_attention.default`` node with
  ``node.meta["rehyat_site"] = site.name``; read its arguments with
  ``rehyat_compile.op.HybridCall.from_node(node)`` (q, k, v, fq = phi_q(q), fk = phi_k(k) in
  [B, H, N, D] / [B, H, N, F]; q, k, v carry one extra head-dim column when a key mask was folded in);
* ``hybrid.teacher_graph_module(*args, **kwargs)``: the same graph with each site replaced by
  plain softmax attention on the same q, k, v (node ``meta["rehyat_site"]`` likewise) -- numerically
  the original model, with the sites findable;
* ``hybrid.site_tensors(*args, teacher=True, **kwargs)``: runs the teacher (or student) graph and
  returns ``{site name: {"q", "k", "v", "out"}}`` -- what distillation matches layer by layer;
* ``hybrid.config``-style conversion record: ``hybrid.conversion`` (JSON-serialisable dict).

Without example inputs :func:`transform` defers the export to the first call (and exports again for
a new input structure: other tensor shapes, other non-tensor arguments); feature maps are created then,
so build the optimizer after one call, or pass example inputs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .dynamo_capture import DEFAULT_MAX_CAPTURES, DynamoConversion, structure_key
from .errors import ConversionError
from .export import FrameAxis, check_video_shape, export_video_model
from .feature_map import FeatureMap
from .op import is_hybrid_node, HybridCall
from .passes import pipeline
from .passes.rewrite_attention import ConversionOptions
from .report import InspectReport
from .site import Site

DEFAULT_FEATURE_DIM = 64
_PLAN_VIDEO_SHAPE = object()  # "the plan's video_shape" (None is a value: no video_shape)


def _analysed(model, args, kwargs, video_shape, frames=None):
    """(GraphModule, FrameAxis, sites): exported, then the pipeline's analysis passes."""
    ep, frame_axis = export_video_model(model, args, kwargs, frames=frames, video_shape=video_shape)
    gm = ep.module()
    sites = pipeline.analyse(gm, frame_axis, model)
    return gm, frame_axis, sites


def _call_arguments(args, kwargs) -> tuple[tuple, dict]:
    args = () if args is None else (tuple(args) if isinstance(args, (tuple, list)) else (args,))
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    return args, {} if kwargs is None else kwargs


def inspect(model, args=(), kwargs=None, *, video_shape=None, frames=None) -> InspectReport:
    """Export ``model(*args, **kwargs)`` and report every attention site and the decision about it.

    When ``torch.export`` cannot take the model, it is captured through Dynamo instead (it runs once,
    under ``torch.no_grad``, as ``torch.compile`` with graph breaks) and the report lists the sites of
    every captured graph (``report.capture == "dynamo"``; rehyat_compile/dynamo_capture.py)."""
    video_shape = check_video_shape(video_shape)
    try:
        _, frame_axis, sites = _analysed(model, args, kwargs, video_shape, frames)
    except ConversionError as err:
        if err.code != "cannot-export":
            raise
        args, kwargs = _call_arguments(args, kwargs)
        conversion = DynamoConversion(model, _export_failure(err), frames=frames, video_shape=video_shape)
        with torch.no_grad():
            sites, frame_axis = conversion.analyse(args, kwargs, structure_key(args, kwargs))
        return _dynamo_report(sites, frame_axis, model, conversion)
    return InspectReport(sites, frame_axis, type(model).__name__)


def _export_failure(err: ConversionError) -> str:
    """The export error of a cannot-export refusal, without its lead-in."""
    return str(err).removeprefix("model cannot be exported with torch.export: ")


def _dynamo_report(sites, frame_axis, model, conversion: DynamoConversion) -> InspectReport:
    if not conversion.graphs:
        raise ConversionError(f"model cannot be captured: torch.export failed ({conversion.export_error}) and Dynamo "
                              "captured no graph (the whole forward ran as eager python)", code="cannot-export")
    return InspectReport(sites, frame_axis, type(model).__name__, capture="dynamo", graphs=len(conversion.graphs),
                         captures=conversion.captures, breaks=conversion.breaks)


class PhiPair(nn.Module):
    """The two feature maps of one site."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.phi_q = FeatureMap(heads, head_dim, feature_dim)
        self.phi_k = FeatureMap(heads, head_dim, feature_dim)


def _redirect_parameters(gm: fx.GraphModule, model: nn.Module) -> None:
    """Point get_attr nodes at ``original.<path>`` when the path resolves on ``model``."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, attr = node.target.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        if attr in module._parameters or attr in module._buffers:
            node.target = f"original.{node.target}"
    gm.graph.lint()
    gm.recompile()


def check_layers(layers) -> tuple[str, ...] | None:
    """``layers`` as a tuple of site names / module paths (one string is one name), or None."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    if not hasattr(layers, "__iter__") or not all(isinstance(x, str) for x in layers):
        raise TypeError(f"layers must be None, a site name / module path, or a list of them, got {layers!r}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers=[] selects no attention site; pass layers=None to convert every rewritable site")
    return layers


def _selected(sites: list[Site], layers: tuple[str, ...] | None) -> list[Site]:
    rewritable = [s for s in sites if s.rewritable]
    if layers is None:
        return rewritable
    chosen = []
    for item in layers:
        hits = [s for s in sites if item in (s.name, s.module, s.key)]
        if not hits:
            raise ValueError(f"layers: {item!r} names no attention site; sites are {[s.name for s in sites]}")
        for site in hits:
            if not site.rewritable:
                raise ConversionError(f"layers: site {site.name} cannot be converted: {site.reason}")
            if site not in chosen:
                chosen.append(site)
    return chosen


def _structure_key(args, kwargs, frame_axis: FrameAxis | None, mode=()):
    """Cache key: pytree structure, tensor shapes (frame dim free when symbolic), dtypes, other values,
    and ``mode`` (the training flags and trace options the graph was made for)."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    key = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            shape = list(leaf.shape)
            if frame_axis is not None and frame_axis.dynamic and i == frame_axis.flat_index:
                shape[frame_axis.dim] = None
            key.append(("tensor", tuple(shape), leaf.dtype, leaf.device.type))
        else:
            key.append(("value", repr(leaf)))
    return str(spec), tuple(key), mode


def check_options(chunk_frames, overlap_frames, causal, feature_dim) -> ConversionOptions:
    feature_dim = DEFAULT_FEATURE_DIM if feature_dim is None else feature_dim
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 2 or feature_dim % 2:
        raise ValueError(f"feature_dim must be an even int >= 2 or None, got {feature_dim!r}")
    for name, value, minimum in (("chunk_frames", chunk_frames, 1), ("overlap_frames", overlap_frames, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if overlap_frames > chunk_frames:
        raise ValueError(f"overlap_frames must be <= chunk_frames ({chunk_frames}), got {overlap_frames}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return ConversionOptions(chunk_frames, overlap_frames, causal, feature_dim)


@dataclass(frozen=True)
class ConversionPlan:
    """Everything a :class:`HybridModel` was converted with, fixed once known.

    ``options`` (chunking, causal, feature dim), ``layers`` (the user's selection, None = all),
    ``video_shape`` and ``frames`` (how the export finds time), then, from the first trace,
    ``frame_axis``, ``sites`` (the converted sites, with their chunking) and ``report`` (every site
    found). Streaming, distillation, cost and builds read the plan; none of them changes it."""

    options: ConversionOptions
    layers: tuple[str, ...] | None = None
    video_shape: tuple[int, int, int] | None = None
    frames: object = None
    frame_axis: FrameAxis | None = None
    sites: tuple[Site, ...] = ()
    report: InspectReport | None = None
    capture: str = "export"  # "dynamo" once torch.export failed and the model was captured by torch.compile
    export_error: str = ""  # why torch.export failed (capture "dynamo")
    max_captures: int = DEFAULT_MAX_CAPTURES

    @property
    def traced(self) -> bool:
        return self.report is not None

    def to_dict(self) -> dict:
        """JSON-serialisable record (``hybrid.conversion``; what checkpoints store)."""
        o = self.options
        return {"chunk_frames": o.chunk_frames, "overlap_frames": o.overlap_frames, "causal": o.causal,
                "feature_dim": o.feature_dim, "layers": [s.name for s in self.sites],
                "video_shape": None if self.video_shape is None else list(self.video_shape),
                "sites": [s.to_dict() | {"key": s.key} for s in self.sites]} | (
                    {} if self.capture == "export" else {"capture": self.capture})


class _Traces:
    """Per-structure caches of one conversion family (shared by :meth:`HybridModel.with_options`
    siblings): ``analyses[key]`` = (pristine analysed GraphModule, FrameAxis, sites)."""

    def __init__(self):
        self.analyses: dict = {}


class HybridModel(nn.Module):
    """The converted model; see the module docstring."""

    def __init__(self, model: nn.Module, *, video_shape=None, chunk_frames=3, overlap_frames=1, causal=True,
                 layers=None, feature_dim=None, frames=None, max_captures=DEFAULT_MAX_CAPTURES,
                 _plan: ConversionPlan | None = None):
        super().__init__()
        self.original = model
        self.feature_maps = nn.ModuleDict()
        if isinstance(max_captures, bool) or not isinstance(max_captures, int) or max_captures < 1:
            raise ValueError(f"max_captures must be an int >= 1, got {max_captures!r}")
        self.plan = _plan or ConversionPlan(check_options(chunk_frames, overlap_frames, causal, feature_dim),
                                            check_layers(layers), check_video_shape(video_shape), frames,
                                            max_captures=max_captures)
        self._traces = _Traces()
        self._programs: dict = {}  # structure key -> (hybrid GraphModule, teacher GraphModule, sites)
        self._runner = None  # the StreamRunner a joint causal conversion runs as (see forward)
        self._dynamo = None  # the DynamoConversion once torch.export failed (see _exported_programs)

    # -- attribute pass-through: the hybrid stands in for the original (pipe.transformer) --------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self._modules.get("original")
            if original is None or name.startswith("__"):
                raise
            return getattr(original, name)

    @property
    def dtype(self):
        return next(self.original.parameters()).dtype

    @property
    def device(self):
        return next(self.original.parameters()).device

    @property
    def sites(self) -> list[Site]:
        """The converted sites of the first trace (``plan.sites``)."""
        return list(self.plan.sites)

    @property
    def report(self) -> InspectReport | None:
        return self.plan.report

    @property
    def conversion(self) -> dict:
        """JSON-serialisable record of the conversion (for save/load)."""
        return self.plan.to_dict()

    @property
    def capture(self) -> str:
        """"export" (one exported graph per input structure) or "dynamo" (graphs between graph breaks)."""
        return "dynamo" if self._dynamo is not None else self.plan.capture

    @property
    def captures(self) -> int | None:
        """Dynamo captures made so far (one per call structure: frame count); None for exported models."""
        return None if self._dynamo is None else self._dynamo.captures

    # -- copies, pickling, state dicts ---------------------------------------------------------
    def __getstate__(self):
        # traced graphs hold fake tensors and generated classes: drop them, a copy traces again
        state = self.__dict__.copy()
        state["_traces"], state["_programs"], state["_runner"], state["_dynamo"] = _Traces(), {}, None, None
        plan = state["plan"]
        state["plan"] = replace(plan, sites=tuple(replace(s, match=None) for s in plan.sites), report=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        clone = copy.copy(self)  # shares nothing below: every field replaced
        memo[id(self)] = clone
        state = self.__getstate__()
        state["_modules"] = copy.deepcopy(self._modules, memo)
        state["_parameters"] = copy.deepcopy(self._parameters, memo)
        state["_buffers"] = copy.deepcopy(self._buffers, memo)
        clone.__dict__.update(state)
        return clone

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = sorted({k.split(".")[1] for k in state_dict if k.startswith("feature_maps.")}
                         - set(self.feature_maps.keys()))
        if missing:
            raise ConversionError(
                f"load_state_dict: the feature maps of sites {missing} do not exist yet: a lazily converted model "
                "creates them on its first call. Call the model once (or pass example inputs to rc.transform) "
                "before loading, or use rc.load_hybrid(model, path, args, kwargs)")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- building ------------------------------------------------------------------------------
    def _mode(self) -> tuple:
        """What a trace depends on beyond the inputs: which modules are in training mode (dropout)."""
        return tuple(m.training for m in self.original.modules())

    def _analysis(self, args, kwargs, video_shape) -> tuple:
        """(key, (pristine GraphModule, FrameAxis, sites)) for this input structure; exported once,
        shared by every :meth:`with_options` sibling."""
        plan = self.plan
        key = (_structure_key(args, kwargs, plan.frame_axis, self._mode()), video_shape)
        if key not in self._traces.analyses:
            gm, frame_axis, sites = _analysed(self.original, args, kwargs, video_shape, plan.frames)
            key = (_structure_key(args, kwargs, frame_axis, self._mode()), video_shape)
            self._traces.analyses[key] = (gm, frame_axis, sites)
        return key, self._traces.analyses[key]

    def _ensure_feature_maps(self, chosen: list[Site]) -> None:
        for site in chosen:
            if site.key not in self.feature_maps:
                heads = site.heads if site.heads is not None else 1
                pair = PhiPair(heads, site.head_dim, self.plan.options.feature_dim)
                param = next(self.original.parameters(), None)
                if param is not None:
                    pair.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
                self.feature_maps[site.key] = pair

    def _build(self, args, kwargs, video_shape):
        analysis_key, (pristine, frame_axis, sites) = self._analysis(args, kwargs, video_shape)
        report = InspectReport(sites, frame_axis, type(self.original).__name__)
        chosen = _selected(sites, self.plan.layers)
        if self.plan.traced:  # the first trace fixed which sites are converted; later traces follow it
            planned = {site.name for site in self.plan.sites}
            chosen = [site for site in chosen if site.name in planned]
        if not chosen:
            raise _nothing_to_convert(report)
        self._ensure_feature_maps(chosen)
        return self._install(analysis_key, chosen, report)

    def _install(self, analysis_key, chosen: list[Site], report: InspectReport) -> tuple:
        """Render the hybrid and teacher graphs of one analysed structure and cache them; the first
        one fixes the plan's frame axis and sites (later traces never change them)."""
        pristine, frame_axis, _ = self._traces.analyses[analysis_key]
        gm, teacher_gm, sites = self._render(pristine, frame_axis, chosen)
        if not self.plan.traced:
            self.plan = replace(self.plan, frame_axis=frame_axis, sites=tuple(sites), report=report)
        (spec, leaves, mode), video_shape = analysis_key
        programs = (gm, teacher_gm, sites, analysis_key)
        self._programs[(spec, leaves, (mode, video_shape))] = programs
        return programs

    def _fresh_graph(self, pristine: fx.GraphModule, sites: list[Site]) -> tuple[fx.GraphModule, list[Site]]:
        graph, node_map = _copy_graph(pristine.graph)
        gm = fx.GraphModule(pristine, graph)
        gm.original = self.original
        gm.feature_maps = self.feature_maps
        return gm, _rematch(node_map, sites)

    def _render(self, pristine, frame_axis, chosen) -> tuple:
        """(hybrid graph, teacher graph, converted sites): the pipeline's rewrite pass on fresh copies of
        the pristine graph, once with the plan's options and once as softmax (the teacher)."""
        (gm, sites), (teacher_gm, _) = (self._rewritten(pristine, frame_axis, chosen, options)
                                        for options in (self.plan.options, None))
        return gm, teacher_gm, sites

    def _rewritten(self, pristine, frame_axis, chosen, options) -> tuple[fx.GraphModule, list[Site]]:
        """The pipeline's rewrite pass on a fresh copy of ``pristine`` (``options=None``: the teacher)."""
        gm, sites = self._fresh_graph(pristine, chosen)
        result = pipeline.run(pipeline.REWRITE, pipeline.PassResult(gm, tuple(sites)),
                              pipeline.PassContext(frame_axis, self.original, options))
        _redirect_parameters(gm, self.original)
        return gm, list(result.sites)

    def with_options(self, *, chunk_frames=None, overlap_frames=None, causal=None) -> "HybridModel":
        """A sibling with other chunking that shares the original, the feature maps and the exports."""
        o = self.plan.options
        options = check_options(o.chunk_frames if chunk_frames is None else chunk_frames,
                                o.overlap_frames if overlap_frames is None else overlap_frames,
                                o.causal if causal is None else causal, o.feature_dim)
        sibling = HybridModel(self.original, _plan=replace(self.plan, options=options, sites=(), report=None,
                                                           frame_axis=None))
        sibling.feature_maps = self.feature_maps
        sibling._traces = self._traces
        if self._dynamo is not None:  # captured through Dynamo: the sibling captures for itself, no export again
            sibling._dynamo = sibling._new_dynamo(self._dynamo.export_error)
        for _, _, sites, analysis_key in list(self._programs.values()):  # the structures self has run
            converted = {s.name for s in sites}
            chosen = [s for s in self._traces.analyses[analysis_key][2] if s.name in converted]
            sibling._install(analysis_key, chosen, self.report)
        return sibling

    def _programs_for(self, args, kwargs, video_shape=_PLAN_VIDEO_SHAPE):
        """(hybrid graph, teacher graph, sites, analysis key) of the one exported graph for this input
        structure; for a model captured through Dynamo, a ConversionError naming its graph breaks."""
        programs = self._exported_programs(args, kwargs, video_shape)
        if programs is None:
            with torch.no_grad():
                self._dynamo_analysed(tuple(args), {} if kwargs is None else kwargs)
            raise self.whole_graph_refusal()
        return programs

    def _exported_programs(self, args, kwargs, video_shape=_PLAN_VIDEO_SHAPE):
        """The export path's programs, or None once the model goes through Dynamo capture (torch.export
        refused it on the first trace)."""
        if self._dynamo is None and self.plan.capture == "dynamo":  # a copy of a captured model: capture again
            self._dynamo = self._new_dynamo(self.plan.export_error)
        if self._dynamo is not None:
            return None
        kwargs = {} if kwargs is None else kwargs
        video_shape = self.plan.video_shape if video_shape is _PLAN_VIDEO_SHAPE else check_video_shape(video_shape)
        key = _structure_key(args, kwargs, self.plan.frame_axis, (self._mode(), video_shape))
        if key in self._programs:
            return self._programs[key]
        try:
            return self._build(args, kwargs, video_shape)
        except ConversionError as err:
            if err.code != "cannot-export" or self.plan.traced:
                raise
            failure = _export_failure(err)
        self._dynamo = self._new_dynamo(failure)
        return None

    def _new_dynamo(self, export_error: str) -> DynamoConversion:
        plan = self.plan
        return DynamoConversion(self.original, export_error, frames=plan.frames, video_shape=plan.video_shape,
                                render=self._dynamo_program, choose=self._dynamo_choice,
                                max_captures=plan.max_captures)

    # -- Dynamo capture (rehyat_compile/dynamo_capture.py) ---------------------------------------
    def _dynamo_choice(self, sites: list[Site]) -> list[Site]:
        """The sites of one (captured graph, module instance) to convert: rewritable and selected."""
        layers = self.plan.layers
        return [s for s in sites if s.rewritable and (layers is None or any(x in (s.name, s.module, s.key)
                                                                                for x in layers))]

    def _dynamo_program(self, aten: fx.GraphModule, frame_axis: FrameAxis, chosen: list[Site]) -> fx.GraphModule:
        """One captured graph with ``chosen`` rewritten to the hybrid op (the same REWRITE pass)."""
        self._ensure_feature_maps(chosen)
        return self._rewritten(aten, frame_axis, chosen, self.plan.options)[0]

    def _dynamo_analysed(self, args, kwargs) -> tuple[list[Site], FrameAxis]:
        """The analysis run of this call structure (captures its graphs; cached per structure); the
        first fixes the plan. Returns the converted sites of this structure and the call's frame axis."""
        dynamo = self._dynamo
        sites, frame_axis = dynamo.analyse(args, kwargs, structure_key(args, kwargs, self._mode()))
        report = _dynamo_report(sites, frame_axis, self.original, dynamo)
        chosen = _selected(sites, self.plan.layers)
        if not chosen:
            raise _nothing_to_convert(report, code=_common_code(sites))
        self._ensure_feature_maps(chosen)
        o = self.plan.options
        chosen = [replace(s, chunk_frames=o.chunk_frames, overlap_frames=o.overlap_frames, causal=o.causal)
                  for s in chosen]
        if not self.plan.traced:
            self.plan = replace(self.plan, frame_axis=frame_axis, sites=tuple(chosen), report=report, capture="dynamo",
                                export_error=dynamo.export_error)
        return chosen, frame_axis

    def whole_graph_refusal(self, what: str = "one whole graph of the model (streaming, distillation taps, "
                                               "rc.cost, builds)") -> ConversionError:
        """The ConversionError for what a Dynamo-captured model cannot do: ``what`` needs one whole
        graph; names the export failure and the graph breaks."""
        dynamo = self._dynamo
        breaks = "; ".join(dynamo.breaks) if dynamo.breaks else "none recorded"
        return ConversionError(
            f"this model was captured through Dynamo because torch.export failed ({dynamo.export_error}): "
            f"{len(dynamo.graphs)} graphs, the code between its graph breaks running as eager python; this needs "
            f"{what}, which a graph break splits. Graph breaks: {breaks}", code="cannot-export")

    def _dynamo_forward(self, args, kwargs):
        sites, frame_axis = self._dynamo_analysed(args, kwargs)
        frames = frame_axis.frames
        if (self.plan.options.causal and any(is_joint(s) for s in sites)
                and (frames is None or frames > self.plan.options.chunk_frames)):
            raise self.whole_graph_refusal(
                "to run chunk by chunk (causal=True with joint attention: a copy of the extra tokens per chunk, "
                "docs/hybrid_attention.md) a step program of one whole graph; transform with causal=False for "
                "global extra tokens, or chunk_frames >= the frame count")
        out = self._dynamo(args, kwargs)
        if self._dynamo.converted_ran < len(sites):  # every converted site runs at least once per call
            raise ConversionError(f"Dynamo ran this call with {self._dynamo.converted_ran} of the {len(sites)} "
                                  "converted sites (it fell back to eager code for the others, e.g. past "
                                  "torch._dynamo's recompile limit): the output would not be the converted model's",
                                  code="cannot-export")
        return out

    def graph_module(self, *args, **kwargs) -> fx.GraphModule:
        """The rewritten GraphModule for this input structure (built on first use)."""
        return self._programs_for(args, kwargs)[0]

    def graph_module_for(self, args, kwargs=None, *, video_shape) -> fx.GraphModule:
        """The rewritten GraphModule traced with another ``video_shape`` (streaming traces chunk-length
        inputs of fixed-shape exports this way); the plan is unchanged."""
        return self._programs_for(tuple(args), kwargs, video_shape)[0]

    def teacher_graph_module(self, *args, **kwargs) -> fx.GraphModule:
        """The original computation, each converted site as one tagged softmax-attention node."""
        return self._programs_for(args, kwargs)[1]

    def sites_for(self, *args, **kwargs) -> list[Site]:
        """The converted sites of the trace for this input structure (layouts at these shapes)."""
        return list(self._programs_for(args, kwargs)[2])

    def site_tensors(self, *args, teacher: bool = True, **kwargs) -> dict:
        """``{site: {"q", "k", "v", "out"}}`` from one run of the teacher (or student) graph."""
        gm = self._programs_for(args, kwargs)[0 if not teacher else 1]
        return _tap_sites(gm, args, kwargs)

    def runs_recurrently(self, *args, **kwargs) -> bool:
        """True when this call runs as the step program, chunk by chunk: a causal conversion with a
        joint site (extra tokens in the attention sequence). Global extra tokens would carry later
        frames into earlier ones through the next layer, so with ``causal=True`` every chunk carries
        its own copy of the extra tokens (docs/hybrid_attention.md, "joint models, causal"), which
        is what the recurrent form computes."""
        return self._runs_recurrently(self._programs_for(args, kwargs)[2], args, kwargs)

    def _runs_recurrently(self, sites, args, kwargs) -> bool:
        if not (self.plan.options.causal and any(is_joint(s) for s in sites)):
            return False
        frames = self._call_frames(args, kwargs)
        return frames is None or frames > self.plan.options.chunk_frames  # one chunk: the parallel graph is it

    def _call_frames(self, args, kwargs) -> int | None:
        """Token frames of this call, from the frame input the export found (None when it found none)."""
        fa = self.plan.frame_axis
        leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
        if fa is None or fa.flat_index is None or fa.dim is None or fa.flat_index >= len(leaves):
            return None
        video = leaves[fa.flat_index]
        return video.shape[fa.dim] // fa.patch if isinstance(video, torch.Tensor) else None

    def forward(self, *args, **kwargs):
        programs = self._exported_programs(args, kwargs)  # one cache lookup per call
        if programs is None:
            return self._dynamo_forward(args, kwargs)
        graph, _, sites, _ = programs
        if self._runs_recurrently(sites, args, kwargs):
            return self._recurrent(args, kwargs)
        return graph(*args, **kwargs)

    def _recurrent(self, args, kwargs):
        from .stream import StreamRunner
        if self._runner is None:  # a plain attribute, not a submodule: the runner holds this model
            self.__dict__["_runner"] = StreamRunner(self)
        try:
            plan = self._runner.plan(*args, **kwargs)
            for length in {min(plan.chunk_frames, plan.frames), plan.frames % plan.chunk_frames} - {0}:
                plan.program(length)  # every step program this call needs, before anything runs
        except Exception as err:  # any reason the step program cannot be built is a refusal with that reason
            raise ConversionError(f"causal=True on a model with joint attention runs chunk by chunk, with a copy of "
                                  f"the extra tokens per chunk (docs/hybrid_attention.md), and this one cannot: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                                  "transform with causal=False for global extra tokens") from err
        return self._runner.run(plan)


def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict]:
    """A copy of ``graph`` (same codegen, i.e. the same pytree calling convention) and old -> new nodes."""
    new = fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    node_map: dict = {}
    out = new.graph_copy(graph, node_map)
    new.output(out)
    return new, node_map


def _nothing_to_convert(report: InspectReport, code: str | None = None) -> ConversionError:
    """The refusal of a model none of whose sites converts: the inspect table in the message, the
    report itself as ``error.report``."""
    error = ConversionError("no attention site can be converted:\n" + str(report), code=code)
    error.report = report
    return error


def _common_code(sites) -> str | None:
    """The decline code every site shares (e.g. all "flex-attention"), else None."""
    codes = {s.code for s in sites}
    return codes.pop() if len(codes) == 1 and None not in codes else None


def is_joint(site: Site) -> bool:
    """A site whose attention sequence holds extra (non-video) tokens; a data-dependent count counts."""
    layout = site.layout
    return layout is not None and (layout.extra_before != 0 or layout.extra_after != 0)


def _rematch(node_map: dict, sites: list[Site]) -> list[Site]:
    """The sites re-pointed at the matching nodes of a copied graph."""

    def same(node):
        return node_map[node] if isinstance(node, fx.Node) else node

    out = []
    for site in sites:
        m = copy.copy(site.match)
        for field in ("anchor", "output", "q", "k", "k_t", "v", "mask"):
            setattr(m, field, same(getattr(m, field)))
        m.interior = [same(n) for n in m.interior]
        out.append(replace(site, match=m))
    return out


def site_qkv(node: fx.Node) -> tuple:
    """(q, k, v) nodes of a site node: the hybrid op's (through its call view), or the teacher form's
    ``softmax_attention(q, k, v, scale)``."""
    if is_hybrid_node(node):
        return HybridCall.from_node(node).tensors[:3]
    q, k, v, _scale = node.args
    return q, k, v


def _tap_sites(gm: fx.GraphModule, args, kwargs) -> dict:
    site_nodes = {n: n.meta["rehyat_site"] for n in gm.graph.nodes if "rehyat_site" in n.meta}
    taps: dict = {}

    class Tap(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in site_nodes:
                q, k, v = (self.env[a] for a in site_qkv(n))
                taps[site_nodes[n]] = {"q": q, "k": k, "v": v, "out": result}
            return result

    flat = pytree.tree_leaves((tuple(args), dict(kwargs)))
    Tap(gm).run(*flat)
    return taps


def transform(model, args=None, kwargs=None, *, video_shape=None, chunk_frames=3, overlap_frames=1, causal=True,
              layers=None, feature_dim=None, frames=None, max_captures=DEFAULT_MAX_CAPTURES) -> HybridModel:
    """Convert every (or the ``layers``-selected) softmax video attention of ``model`` to the hybrid op.

    With ``args``/``kwargs`` given the export happens now (errors surface here); otherwise on the
    first call. Raises ConversionError when nothing can be converted (with the inspect table).
    A model torch.export cannot take is captured through Dynamo (rehyat_compile/dynamo_capture.py):
    with example inputs it runs once now, under ``torch.no_grad``; each new frame count is captured
    again on its call, at most ``max_captures`` times.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hybrid = HybridModel(model, video_shape=video_shape, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                         causal=causal, layers=layers, feature_dim=feature_dim, frames=frames,
                         max_captures=max_captures)
    if args is not None or kwargs is not None:
        args = () if args is None else (args if isinstance(args, (tuple, list)) else (args,))
        kwargs = {} if kwargs is None else kwargs
        if hybrid._exported_programs(tuple(args), kwargs) is None:
            with torch.no_grad():
                hybrid._dynamo_analysed(tuple(args), kwargs)
    return hybrid


__all__ = ["HybridModel", "inspect", "transform"]
