"""``rc.inspect`` and ``rc.transform``: find softmax attention in a video DiT and rewrite it.

Pipeline (one export per input structure): :func:`~rehyat_compile.export.export_video_model`
(frame axis symbolic) -> ``ep.module()`` -> :func:`rehyat_compile.passes.manager.analyse`
(canonicalise, find, classify, infer layout) -> :func:`rehyat_compile.passes.rewrite_attention.
rewrite_attention`. The rewritten ``torch.fx.GraphModule`` reads the ORIGINAL model's parameters
(its ``get_attr`` targets are ``original.<path>``; shared, not copied, so ``.to()``/``state_dict``
act on one set) and calls the feature maps as ``feature_maps.<key>.phi_q`` / ``phi_k``.

:class:`HybridModel` is an ``nn.Module`` called exactly like the original:

* ``hybrid.original``: the user's model; unknown attributes (``config``, ``dtype``, ``device``,
  ``cache_context`` ...) pass through to it, so it works as ``pipe.transformer``;
* ``hybrid.feature_maps``: ``nn.ModuleDict`` site key -> module with ``phi_q``, ``phi_k``
  (:class:`~rehyat_compile.FeatureMap`): the trainable parameters;
* ``hybrid.sites``: the converted :class:`~rehyat_compile.passes.manager.Site` s (layout, scale,
  heads, kv heads); ``hybrid.report``: every site found, converted or not;
* ``hybrid.graph_module(*args, **kwargs)``: the rewritten GraphModule for that input structure;
  each converted site is ONE ``torch.ops.rehyat.hybrid_attention.default`` node with
  ``node.meta["rehyat_site"] = site.name``; its args 0..4 are q, k, v, phi_q(q), phi_k(k) in
  [B, H, N, D] / [B, H, N, F] (q, k, v carry one extra head-dim column when a key mask was folded in);
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

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import ConversionError
from .export import FrameAxis, check_video_shape, export_video_model
from .feature_map import FeatureMap
from .passes.manager import Site, analyse
from .passes.rewrite_attention import ChunkOptions, rewrite_attention
from .report import InspectReport

DEFAULT_FEATURE_DIM = 64


def _analysed(model, args, kwargs, video_shape, frames=None):
    """(GraphModule, FrameAxis, sites): exported, canonicalised, every attention decided."""
    ep, frame_axis = export_video_model(model, args, kwargs, frames=frames, video_shape=video_shape)
    gm = ep.module()
    sites = analyse(gm, frame_axis, model)
    return gm, frame_axis, sites


def inspect(model, args=(), kwargs=None, *, video_shape=None, frames=None) -> InspectReport:
    """Export ``model(*args, **kwargs)`` and report every attention site and the decision about it."""
    video_shape = check_video_shape(video_shape)
    _, frame_axis, sites = _analysed(model, args, kwargs, video_shape, frames)
    return InspectReport(sites, frame_axis, type(model).__name__)


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


def _selected(sites: list[Site], layers) -> list[Site]:
    rewritable = [s for s in sites if s.rewritable]
    if layers is None:
        return rewritable
    if isinstance(layers, str) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be None or a list of site names / module paths, got {layers!r}")
    wanted = list(layers)
    chosen = []
    for item in wanted:
        hits = [s for s in sites if item in (s.name, s.module, s.key)]
        if not hits:
            raise ValueError(f"layers: {item!r} names no attention site; sites are {[s.name for s in sites]}")
        for site in hits:
            if not site.rewritable:
                raise ConversionError(f"layers: site {site.name} cannot be converted: {site.reason}")
            if site not in chosen:
                chosen.append(site)
    return chosen


def _structure_key(args, kwargs, frame_axis: FrameAxis | None):
    """Cache key: pytree structure, tensor shapes (frame dim free when symbolic), dtypes, other values."""
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
    return str(spec), tuple(key)


class HybridModel(nn.Module):
    """The converted model; see the module docstring."""

    def __init__(self, model: nn.Module, *, video_shape=None, chunk_frames=3, overlap_frames=1, causal=True,
                 layers=None, feature_dim=None, frames=None):
        super().__init__()
        self.original = model
        self.feature_maps = nn.ModuleDict()
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
        # plain attributes (not submodules): the graphs share the original's parameters
        object.__setattr__(self, "_options", ChunkOptions(chunk_frames, overlap_frames, causal, feature_dim))
        object.__setattr__(self, "_video_shape", check_video_shape(video_shape))
        object.__setattr__(self, "_layers", None if layers is None else list(layers))
        object.__setattr__(self, "_frames", frames)
        object.__setattr__(self, "_programs", {})
        object.__setattr__(self, "_analyses", {})
        object.__setattr__(self, "_frame_axis", None)
        object.__setattr__(self, "sites", [])
        object.__setattr__(self, "report", None)

    # -- attribute pass-through: the hybrid stands in for the original (pipe.transformer) --------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self._modules.get("original")
            if original is None:
                raise
            return getattr(original, name)

    @property
    def dtype(self):
        return next(self.original.parameters()).dtype

    @property
    def device(self):
        return next(self.original.parameters()).device

    @property
    def conversion(self) -> dict:
        """JSON-serialisable record of the conversion (for save/load)."""
        o = self._options
        return {"chunk_frames": o.chunk_frames, "overlap_frames": o.overlap_frames, "causal": o.causal,
                "feature_dim": o.feature_dim, "layers": [s.name for s in self.sites],
                "video_shape": None if self._video_shape is None else list(self._video_shape),
                "sites": [s.to_dict() | {"key": s.key} for s in self.sites]}

    # -- building ------------------------------------------------------------------------------
    def _analysis(self, args, kwargs):
        """(pristine GraphModule, FrameAxis, sites) for this input structure; exported once, shared by
        every :meth:`with_options` sibling."""
        key = _structure_key(args, kwargs, self._frame_axis)
        if key not in self._analyses:
            gm, frame_axis, sites = _analysed(self.original, args, kwargs, self._video_shape, self._frames)
            key = _structure_key(args, kwargs, frame_axis)
            self._analyses[key] = (gm, frame_axis, sites)
        return self._analyses[key]

    def _fresh_graph(self, pristine: fx.GraphModule, sites: list[Site]) -> tuple[fx.GraphModule, list[Site]]:
        graph, node_map = _copy_graph(pristine.graph)
        gm = fx.GraphModule(pristine, graph)
        gm.original = self.original
        gm.feature_maps = self.feature_maps
        return gm, _rematch(node_map, sites)

    def _build(self, args, kwargs):
        pristine, frame_axis, sites = self._analysis(args, kwargs)
        report = InspectReport(sites, frame_axis, type(self.original).__name__)
        chosen = _selected(sites, self._layers)
        if not chosen:
            raise ConversionError("no attention site can be converted:\n" + str(report))
        for site in chosen:
            if site.key not in self.feature_maps:
                heads = site.heads if site.heads is not None else 1
                pair = PhiPair(heads, site.head_dim, self._options.feature_dim)
                param = next(self.original.parameters(), None)
                if param is not None:
                    pair.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
                self.feature_maps[site.key] = pair
        object.__setattr__(self, "_frame_axis", frame_axis)
        object.__setattr__(self, "report", report)
        key = _structure_key(args, kwargs, frame_axis)
        self._render_cached(key, pristine, frame_axis, chosen)
        return self._programs[key]

    def with_options(self, *, chunk_frames=None, overlap_frames=None, causal=None) -> "HybridModel":
        """A sibling with other chunking that shares the original, the feature maps and the exports."""
        o = self._options
        sibling = HybridModel(self.original, video_shape=self._video_shape,
                              chunk_frames=o.chunk_frames if chunk_frames is None else chunk_frames,
                              overlap_frames=o.overlap_frames if overlap_frames is None else overlap_frames,
                              causal=o.causal if causal is None else causal, layers=self._layers,
                              feature_dim=o.feature_dim, frames=self._frames)
        sibling.feature_maps = self.feature_maps
        object.__setattr__(sibling, "_analyses", self._analyses)
        object.__setattr__(sibling, "_frame_axis", self._frame_axis)
        object.__setattr__(sibling, "report", self.report)
        for key, (gm, frame_axis, sites) in list(self._analyses.items()):
            if key in self._programs:  # same structures as self, ready to call
                chosen = [s for s in sites if s.name in {c.name for c in self.sites}]
                sibling._render_cached(key, gm, frame_axis, chosen)
        return sibling

    def _render_cached(self, key, pristine, frame_axis, chosen):
        """Rewrite fresh copies of the pristine graph: the student (hybrid) and the teacher (softmax)."""
        gm, student_sites = self._fresh_graph(pristine, chosen)
        rewrite_attention(gm, student_sites, self._options, frame_axis)
        _redirect_parameters(gm, self.original)
        teacher_gm, teacher_sites = self._fresh_graph(pristine, chosen)
        rewrite_attention(teacher_gm, teacher_sites, None, frame_axis)
        _redirect_parameters(teacher_gm, self.original)
        object.__setattr__(self, "sites", chosen)
        self._programs[key] = (gm, teacher_gm)

    def _programs_for(self, args, kwargs):
        kwargs = {} if kwargs is None else kwargs
        key = _structure_key(args, kwargs, self._frame_axis)
        if key not in self._programs:
            return self._build(args, kwargs)
        return self._programs[key]

    def graph_module(self, *args, **kwargs) -> fx.GraphModule:
        """The rewritten GraphModule for this input structure (built on first use)."""
        return self._programs_for(args, kwargs)[0]

    def teacher_graph_module(self, *args, **kwargs) -> fx.GraphModule:
        """The original computation, each converted site as one tagged softmax-attention node."""
        return self._programs_for(args, kwargs)[1]

    def site_tensors(self, *args, teacher: bool = True, **kwargs) -> dict:
        """``{site: {"q", "k", "v", "out"}}`` from one run of the teacher (or student) graph."""
        gm = self._programs_for(args, kwargs)[0 if not teacher else 1]
        return _tap_sites(gm, args, kwargs)

    def forward(self, *args, **kwargs):
        return self._programs_for(args, kwargs)[0](*args, **kwargs)


def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict]:
    """A copy of ``graph`` (same codegen, i.e. the same pytree calling convention) and old -> new nodes."""
    new = fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    node_map: dict = {}
    out = new.graph_copy(graph, node_map)
    new.output(out)
    return new, node_map


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
        s = copy.copy(site)
        s.match = m
        out.append(s)
    return out


def _tap_sites(gm: fx.GraphModule, args, kwargs) -> dict:
    site_nodes = {n: n.meta["rehyat_site"] for n in gm.graph.nodes if "rehyat_site" in n.meta}
    taps: dict = {}

    class Tap(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in site_nodes:
                q, k, v = (self.env[a] for a in n.args[:3])
                taps[site_nodes[n]] = {"q": q, "k": k, "v": v, "out": result}
            return result

    flat = pytree.tree_leaves((tuple(args), dict(kwargs)))
    Tap(gm).run(*flat)
    return taps


def transform(model, args=None, kwargs=None, *, video_shape=None, chunk_frames=3, overlap_frames=1, causal=True,
              layers=None, feature_dim=None, frames=None) -> HybridModel:
    """Convert every (or the ``layers``-selected) softmax video attention of ``model`` to the hybrid op.

    With ``args``/``kwargs`` given the export happens now (errors surface here); otherwise on the
    first call. Raises ConversionError when nothing can be converted (with the inspect table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hybrid = HybridModel(model, video_shape=video_shape, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                         causal=causal, layers=layers, feature_dim=feature_dim, frames=frames)
    if args is not None or kwargs is not None:
        args = () if args is None else (args if isinstance(args, (tuple, list)) else (args,))
        hybrid._build(tuple(args), {} if kwargs is None else kwargs)
    return hybrid


__all__ = ["HybridModel", "inspect", "transform"]
