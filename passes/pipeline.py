"""The conversion as one ordered list of passes over a graph and its sites.

Every entry point runs these passes and no other copy of them: ``rc.inspect`` runs
:data:`ANALYSIS`; ``rc.transform`` runs :data:`ANALYSIS` once per input structure, then
:data:`REWRITE` on a copy for the hybrid graph and again (``options=None``) for the teacher graph;
``rc.stream`` runs :data:`THREAD_STATE` (or, for fixed-shape exports, :data:`INFER_INPUT_FRAMES` on the
whole-video graph, then :data:`THREAD_STATE_MATCHED` on a chunk trace) on the hybrid graph; ``rc.distill`` runs :data:`FORCE_SOFTMAX`; ``rc.build`` runs :data:`PORTABLE`
on the exported program it compiles; ``rc.cost`` costs the graphs these produce.

    canonicalize -> find -> classify -> layout -> rewrite
        -> { (thread_state | infer_input_frames -> thread_state_matched) -> hoist_chunk_invariant
             [-> write_states_in_place]   (CUDA graph runners, cuda_graph_step.py)
           | force_softmax | portable }
    portable -> [legalize_softplus -> legalize_rms_norm] -> legalize_split -> legalize_softmax -> legalize_permute_rank
             -> legalize_reshape_rank               (HTP / HTP_QUANTIZED, backends/qnn.py)

A pass is a function ``(PassResult, PassContext) -> PassResult``: the result carries the graph, the
sites (immutable :class:`~rehyat_compile.site.Site` s, each accepted or declined with a
:class:`~rehyat_compile.declines.Decline`) and what a variant pass produced (``artifacts``: the
step program, the capture sink). The context is what the pass reads but never changes: the frame
axis of the export, the user's model, the conversion options, and variant settings.
See docs/architecture.md for where to add a pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable, Mapping

from torch import fx

from ..declines import Decline
from ..site import Site
from .canonicalize import canonicalize
from .classify_attention import classify_site
from .find_attention import find_sites
from .infer_video_layout import layout_site
from .rewrite_attention import ConversionOptions, rewrite_attention


@dataclass(frozen=True)
class PassContext:
    """What passes read: ``frame_axis`` (:class:`~rehyat_compile.export.FrameAxis`), ``model`` (the
    user's module, for linear-attention processors), ``options`` (chunking and feature dim; None
    makes the rewrite produce the teacher's softmax form), ``settings`` (variant passes' arguments),
    ``temporal_patch`` (the model's temporal patch when no export frame axis gives it)."""

    frame_axis: object = None
    model: object = None
    options: ConversionOptions | None = None
    settings: Mapping = field(default_factory=lambda: MappingProxyType({}))
    temporal_patch: int | None = None  # input frames per token frame when there is no frame axis

    @property
    def symbol(self):
        return None if self.frame_axis is None else self.frame_axis.symbol

    @property
    def patch(self) -> int:
        if self.frame_axis is not None:
            return self.frame_axis.patch
        return 1 if self.temporal_patch is None else self.temporal_patch

    @property
    def frames(self) -> int | None:
        """Token frames of the example (input frames // temporal patch), when known."""
        fa = self.frame_axis
        return None if fa is None or fa.size is None else fa.size // fa.patch


@dataclass(frozen=True)
class PassResult:
    """A graph (``fx.GraphModule``, or an ``ExportedProgram`` for :data:`PORTABLE`), its sites in graph
    order, and variant outputs by name."""

    graph: object
    sites: tuple[Site, ...] = ()
    artifacts: Mapping = field(default_factory=lambda: MappingProxyType({}))

    @property
    def declines(self) -> list[tuple[str, Decline]]:
        """(site name, decline) of every declined site."""
        return [(s.name, s.decline) for s in self.sites if s.decline is not None]

    def with_artifact(self, name: str, value) -> "PassResult":
        return replace(self, artifacts=MappingProxyType({**self.artifacts, name: value}))


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[PassResult, PassContext], PassResult]
    summary: str


def _each_open_site(result: PassResult, fn) -> PassResult:
    """Apply ``fn`` to the sites no earlier pass declined."""
    return replace(result, sites=tuple(fn(s) if s.decline is None else s for s in result.sites))


def _canonicalize(result: PassResult, ctx: PassContext) -> PassResult:
    canonicalize(result.graph)
    return result


def _find(result: PassResult, ctx: PassContext) -> PassResult:
    return replace(result, sites=tuple(find_sites(result.graph, ctx.model)))


def _classify(result: PassResult, ctx: PassContext) -> PassResult:
    return _each_open_site(result, lambda s: classify_site(s, ctx.symbol, ctx.patch))


def _frame_input(gm: fx.GraphModule, frame_axis):
    """The placeholder of the input that holds time (FrameAxis.flat_index), if any; for a graph
    captured through Dynamo with several inputs holding video tokens (FrameAxis.video_inputs), the
    tuple of their placeholders."""
    index = getattr(frame_axis, "flat_index", None)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    several = [placeholders[i] for i in getattr(frame_axis, "video_inputs", ()) if i < len(placeholders)]
    if len(several) > 1:
        return tuple(several)
    return placeholders[index] if index is not None and index < len(placeholders) else None


def _layout(result: PassResult, ctx: PassContext) -> PassResult:
    fa = ctx.frame_axis
    frame_input = _frame_input(result.graph, fa)
    earlier: dict = {}  # sites in graph order: later layers of a joint model reuse the first's layout
    return _each_open_site(result, lambda s: layout_site(s, ctx.symbol, ctx.patch, ctx.frames,
                                                         None if fa is None else fa.video_shape, frame_input,
                                                         earlier))


def _rewrite(result: PassResult, ctx: PassContext) -> PassResult:
    """Rewrite every site of ``result`` (the caller passes only the chosen ones); the sites come back
    with the chunking they were converted with (none for the teacher form)."""
    sites = result.sites
    if ctx.options is not None:
        o = ctx.options
        sites = tuple(replace(s, chunk_frames=o.chunk_frames, overlap_frames=o.overlap_frames, causal=o.causal)
                      for s in sites)
    rewrite_attention(result.graph, list(sites), ctx.options, ctx.frame_axis)
    return replace(result, sites=sites)


def _thread_state(result: PassResult, ctx: PassContext) -> PassResult:
    from .thread_state import thread_state
    return result.with_artifact("step_program", thread_state(result.graph, patch=ctx.patch))


def _infer_input_frames(result: PassResult, ctx: PassContext) -> PassResult:
    """settings: frames (the call's token frames), sizes (symbol values of a symbolic graph)."""
    from .infer_input_frames import infer_input_frames
    s = ctx.settings
    return result.with_artifact("input_frames", infer_input_frames(result.graph, s.get("frames"), s.get("sizes")))


def _thread_state_matched(result: PassResult, ctx: PassContext) -> PassResult:
    """settings: full_graph, chunk_inputs, full_inputs, chunk_frames, frames, input_dims."""
    from .thread_state import thread_state_matched
    s = ctx.settings
    program = thread_state_matched(result.graph, s["full_graph"], s["chunk_inputs"], s["full_inputs"],
                                   chunk_frames=s["chunk_frames"], frames=s["frames"], input_dims=s["input_dims"],
                                   patch=ctx.patch)
    return result.with_artifact("step_program", program)


def _hoist_chunk_invariant(result: PassResult, ctx: PassContext) -> PassResult:
    """artifacts: step_program in, hoisted_step out (the step's chunk-invariant part split off)."""
    from ..cuda_graph_step import invariant_inputs
    from .hoist_chunk_invariant import hoist_chunk_invariant
    program = result.artifacts["step_program"]
    return result.with_artifact("hoisted_step", hoist_chunk_invariant(program.module, invariant_inputs(program)))


def _write_states_in_place(result: PassResult, ctx: PassContext) -> PassResult:
    """artifacts: step_program and hoisted_step in; in_place_step (the step writing its new states into its
    state inputs, layer by layer) and in_place_invariant (the hoisted part writing each value into a buffer
    it is given) out: for runners that own the state and invariant buffers."""
    from .write_states_in_place import write_outputs_into, write_states_in_place
    program, step = result.artifacts["step_program"], result.artifacts["hoisted_step"]
    n_in = len(program.input_dims) + len(program.table_dims)
    n_states = len(list(step.step.graph.find_nodes(op="placeholder"))) - n_in - step.n_hoisted
    in_place = write_states_in_place(step.step, slice(n_in, n_in + n_states), program.n_outputs)
    return result.with_artifact("in_place_step", in_place).with_artifact(
        "in_place_invariant", write_outputs_into(step.invariant))


def _force_softmax(result: PassResult, ctx: PassContext) -> PassResult:
    """settings: record (site names or None for all), offload (device or None)."""
    from ..distill import softmax_forced
    forced, sink = softmax_forced(result.graph, ctx.settings.get("record"), ctx.settings.get("offload"))
    return replace(result, graph=forced).with_artifact("capture", sink)


def _portable(result: PassResult, ctx: PassContext) -> PassResult:
    from ..backends.portable import decompose_for_backends
    return replace(result, graph=decompose_for_backends(result.graph))


def _on_program(rewrite):
    """A pass running ``rewrite(fx.Graph) -> int`` on a :data:`PORTABLE` result's program in place;
    the count of changed nodes is kept as artifact ``<rewrite name>``."""
    def run(result: PassResult, ctx: PassContext) -> PassResult:
        module = result.graph.graph_module
        changed = rewrite(module.graph)
        module.recompile()
        return result.with_artifact(rewrite.__name__, changed)
    return run


def legalize_permute_rank(graph: fx.Graph) -> int:
    from .legalize_permute_rank import compose_permutes, lower_permute_rank
    return compose_permutes(graph) + lower_permute_rank(graph)


def legalize_reshape_rank(graph: fx.Graph) -> int:
    from .legalize_reshape_rank import fold_reshape_chains
    return fold_reshape_chains(graph)


def legalize_softmax(graph: fx.Graph) -> int:
    from .legalize_softmax import drop_softmax_guards, multiplicative_masks
    return drop_softmax_guards(graph) + multiplicative_masks(graph)


def legalize_softplus(graph: fx.Graph) -> int:
    from .legalize_softplus import softplus_as_one_op
    return softplus_as_one_op(graph)


def legalize_rms_norm(graph: fx.Graph) -> int:
    from .legalize_rms_norm import rms_norm_as_layer_norm
    return rms_norm_as_layer_norm(graph)


def legalize_split(graph: fx.Graph) -> int:
    from .legalize_split import split_as_slices
    return split_as_slices(graph)


CANONICALIZE = Pass("canonicalize", _canonicalize, "normalise spellings (views, einsum, bmm, div by a number)")
FIND = Pass("find", _find, "one site per softmax / SDPA / flex_attention node, per linear-attention module")
CLASSIFY = Pass("classify", _classify, "self vs cross-attention, causal, factorised; head dims, masks")
LAYOUT = Pass("layout", _layout, "where the video sits in the token axis; frame-major check")
REWRITE = Pass("rewrite", _rewrite, "each chosen site becomes one rehyat::hybrid_attention node (or softmax)")
THREAD_STATE = Pass("thread_state", _thread_state, "the step program of one chunk, states explicit")
INFER_INPUT_FRAMES = Pass("infer_input_frames", _infer_input_frames,
                          "which inputs of a fixed-shape graph carry the frame axis, from its dataflow")
THREAD_STATE_MATCHED = Pass("thread_state_matched", _thread_state_matched,
                            "the step program of a fixed-shape export, from a chunk trace and a whole trace")
HOIST_CHUNK_INVARIANT = Pass("hoist_chunk_invariant", _hoist_chunk_invariant,
                             "work the same for every chunk (text K/V, time embeddings) once per call")
WRITE_STATES_IN_PLACE = Pass("write_states_in_place", _write_states_in_place,
                             "each new state written into its state input right after its layer (graph runners)")
FORCE_SOFTMAX = Pass("force_softmax", _force_softmax, "every site as the teacher's softmax, recording q, k, v, out")
PORTABLE = Pass("portable", _portable, "the hybrid op and composite ops in standard aten ops for the backends")
LEGALIZE_SPLIT = Pass("legalize_split", _on_program(legalize_split), "splits as slices (HTP takes no sequence ops)")
LEGALIZE_SOFTMAX = Pass("legalize_softmax", _on_program(legalize_softmax),
                        "softmax guards dropped, -inf masks multiplicative (no infinities to quantise)")
LEGALIZE_SOFTPLUS = Pass("legalize_softplus", _on_program(legalize_softplus),
                         "decomposed softplus back as one Softplus (HTP's quantised Log is wrong)")
LEGALIZE_RMS_NORM = Pass("legalize_rms_norm", _on_program(legalize_rms_norm),
                         "x * rsqrt(mean(x^2) + eps) as LayerNorm([x, -x])[..., :n] (HTP's quantised Reciprocal is off)")
LEGALIZE_PERMUTE_RANK = Pass("legalize_permute_rank", _on_program(legalize_permute_rank),
                             "permutes composed, coalesced to rank <= 5 (HTP's limit)")
LEGALIZE_RESHAPE_RANK = Pass("legalize_reshape_rank", _on_program(legalize_reshape_rank),
                             "reshape chains folded so no rank-6+ tensor is left between them")

ANALYSIS = (CANONICALIZE, FIND, CLASSIFY, LAYOUT)
CONVERSION = ANALYSIS + (REWRITE,)
HTP = (LEGALIZE_SPLIT, LEGALIZE_SOFTMAX, LEGALIZE_PERMUTE_RANK, LEGALIZE_RESHAPE_RANK)  # after PORTABLE
# Quantised HTP builds also need softplus as one op and RMS norms as LayerNorms; fp16 keeps the decomposed form (HTP's fp16
# Softplus measured 10x less accurate: 0.013 vs 0.0014 on the feature map's softplus).
HTP_QUANTIZED = (LEGALIZE_SOFTPLUS, LEGALIZE_RMS_NORM) + HTP  # after PORTABLE, for the qnn backend
VARIANTS = {"stream": (THREAD_STATE, INFER_INPUT_FRAMES, THREAD_STATE_MATCHED, HOIST_CHUNK_INVARIANT,
                       WRITE_STATES_IN_PLACE),
            "distill": (FORCE_SOFTMAX,), "build": (PORTABLE,), "htp": HTP_QUANTIZED}
PIPELINE = CONVERSION + tuple(p for group in VARIANTS.values() for p in group)  # every pass, in order


def run(passes, result: PassResult | fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    """Run ``passes`` (a Pass or a sequence of them) in order."""
    if isinstance(passes, Pass):
        passes = (passes,)
    result = result if isinstance(result, PassResult) else PassResult(result)
    ctx = PassContext() if ctx is None else ctx
    for p in passes:
        result = p.run(result, ctx)
    return result


def analyse(gm: fx.GraphModule, frame_axis, model=None) -> list[Site]:
    """:data:`ANALYSIS` over ``gm`` (canonicalised in place): every attention decided. Graph order."""
    return list(run(ANALYSIS, gm, PassContext(frame_axis, model)).sites)


__all__ = ["ANALYSIS", "CONVERSION", "HTP", "HTP_QUANTIZED", "PIPELINE", "VARIANTS", "Pass", "PassContext", "PassResult", "analyse", "run"]
