"""Symbolic cost model: what a video model costs as a function of the number of latent frames T.

:func:`cost` exports the model with the latent-frame axis symbolic and runs the exported graph on
fake tensors whose shapes are sympy expressions. Every aten op that runs is counted the way
``torch.utils.flop_counter.FlopCounterMode`` counts it (same decomposition rule, same registered
formulas, evaluated on symbolic shapes), and attributed to the graph node that issued it:

* ``flops`` -- matmul / convolution / attention FLOPs, a multiply-add counting 2;
* ``flops_elementwise`` -- one per output element of pointwise ops and one per input element of
  reductions and normalisations (softmax over attention scores included);
* ``bytes`` -- bytes read and written, every non-view op reading its tensor inputs and writing its
  outputs once (no fusion);
* ``peak_memory`` -- most activation bytes alive at once (liveness over storages, weights excluded,
  plus each node's transient workspace).

All four are sympy expressions in the symbol ``T`` (other dims concrete), with per-node and
per-attention-site breakdowns. :func:`check_linear` raises ``ComplexityError`` naming the nodes whose
cost grows faster than linearly in T.

Attention is costed as fused kernels by default (SDPA and the hybrid op each read their inputs and
write their output; FLOPs by their registered formulas, so the hybrid op's cost is
:func:`~rehyat_compile.op.hybrid_attention_flops`); ``attention="math"`` runs both unfused, which
is what memory traffic looks like where score matrices are materialised (most phone GPUs).

A :class:`~rehyat_compile.transform.HybridModel` is costed from the rewritten graph it already
holds (sites and feature maps included). A streaming step graph has no time axis: pass
``chunk_frames`` and its per-call cost is constant, totals scale with ceiling(T / chunk_frames).
The expressions hold for the frame counts the graph's guards allow (``CostReport.frames_range``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.fx import Interpreter, Node
from torch._decomp import decomposition_table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils._sympy.numbers import int_oo
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop

from . import symbolic
from .errors import ComplexityError, ConversionError
from .export import export_video_model, find_frame_input
from .attention_spellings import SdpaCall, spelling_of
from .op import HYBRID_OP, HybridCall, decompositions, hybrid_attention_flops
from .passes.liveness import activation_liveness, storage_key
from .transform import HybridModel

aten = torch.ops.aten
METRICS = ("flops", "flops_elementwise", "bytes", "peak_memory")
SDPA_OP = aten.scaled_dot_product_attention.default

# PyTorch counts SDPA on CUDA (flash / efficient / cudnn kernels) but has no formula for the CPU
# flash kernel, so FlopCounterMode reports 0 FLOPs for attention on CPU. Register the same formula.
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(sdpa_flop.__wrapped__)

# Ops FlopCounterMode passes through uncounted (size/stride queries).
_SHAPE_QUERIES = {aten.sym_is_contiguous.default, aten.is_contiguous.default, aten.is_contiguous.memory_format,
                  aten.is_strides_like_format.default, aten.is_non_overlapping_and_dense.default, aten.size.default,
                  aten.sym_size.default, aten.stride.default, aten.sym_stride.default, aten.storage_offset.default,
                  aten.sym_storage_offset.default, aten.numel.default, aten.sym_numel.default, aten.dim.default,
                  torch.ops.prim.layout.default}

# C++ kernels that reject symbolic sizes outside export tracing: run their Python decomposition
# (what export itself traces) instead.
_SYMBOLIC_SIZE_DECOMPOSED = {aten.constant_pad_nd.default}

# Non-pointwise ops whose elementwise work is one FLOP per input element.
_NORMALISATIONS = {aten._softmax, aten._log_softmax, aten._safe_softmax, aten.native_layer_norm,
                   aten.native_group_norm, aten.native_batch_norm, aten._fused_rms_norm, aten.cumsum,
                   aten._native_batch_norm_legit_no_training}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeCost:
    """Cost of one graph node per call: sympy expressions in T (bytes and FLOPs)."""

    name: str
    target: str
    module: str  # qualified path of the innermost module that issued the node ('' at top level)
    site: str | None  # attention site the node belongs to (see CostReport.by_site)
    flops: sympy.Expr
    flops_elementwise: sympy.Expr
    bytes: sympy.Expr
    workspace: sympy.Expr  # transient bytes alive only while the node runs


@dataclass(frozen=True)
class SiteCost:
    """Summed cost of the nodes of one attention site (projections, norms, the attention itself)."""

    name: str
    module: str
    flops: sympy.Expr
    flops_elementwise: sympy.Expr
    bytes: sympy.Expr
    nodes: tuple[str, ...]


@dataclass
class CostReport:
    """Cost of a model as sympy expressions in ``T`` (latent frames).

    For a whole-video graph ``calls`` is 1. For a streaming step graph (``chunk_frames`` given to
    :func:`cost`) the graph's own cost is constant, ``calls = ceiling(T / chunk_frames)``, the totals
    are per-call cost times calls, and ``peak_memory`` is one call's peak (state inputs included).
    ``by_node`` and ``by_site`` are per call.
    """

    flops: sympy.Expr
    flops_elementwise: sympy.Expr
    bytes: sympy.Expr
    peak_memory: sympy.Expr
    by_node: dict[str, NodeCost]
    by_site: dict[str, SiteCost]
    weights_bytes: sympy.Expr
    calls: sympy.Expr = sympy.Integer(1)
    chunk_frames: int | None = None
    frames_range: tuple[int, int | None] = (1, None)  # T for which the exported graph is valid
    T: sympy.Symbol = field(default=symbolic.T, init=False)

    def metric(self, name: str) -> sympy.Expr:
        if name not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {name!r}")
        return getattr(self, name)

    def per_call(self, name: str) -> sympy.Expr:
        """One graph call's value of ``name`` (for a step graph: one chunk; constant in T)."""
        value = self.metric(name)
        return value if name == "peak_memory" else sympy.simplify(value / self.calls)

    def degree(self, metric: str | sympy.Expr = "flops") -> int:
        """Polynomial degree in T of a metric name (see METRICS) or of any expression in T."""
        expr = self.metric(metric) if isinstance(metric, str) else metric
        return symbolic.degree(expr, self.T)

    def asymptotic(self, metric: str | sympy.Expr = "flops") -> sympy.Expr:
        """A polynomial in T growing like the metric (floors, ceilings, Min/Max of chunk counts
        resolved for large T): the readable form of hybrid-attention costs."""
        expr = self.metric(metric) if isinstance(metric, str) else metric
        return symbolic.growth_polynomial(expr, self.T)

    def evaluate(self, T: int) -> dict[str, int]:
        """The four metrics at ``T`` latent frames, as integers."""
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int (latent frames), got {T!r}")
        lower, upper = self.frames_range
        if T < lower or (upper is not None and T > upper):
            raise ValueError(f"T={T} is outside the frame counts [{lower}, {upper or 'oo'}] the exported graph "
                             "holds for (its guards)")
        return {name: int(sympy.sympify(self.metric(name)).subs(self.T, T)) for name in METRICS}

    def to_dict(self) -> dict:
        """JSON-serialisable: expressions as strings, degrees as ints."""
        return {
            "symbol": str(self.T), "chunk_frames": self.chunk_frames, "calls": str(self.calls),
            "frames_range": list(self.frames_range),
            "weights_bytes": str(self.weights_bytes),
            **{name: str(self.metric(name)) for name in METRICS},
            "degree": {name: self.degree(name) for name in METRICS},
            "by_site": {s.name: {"module": s.module, "flops": str(s.flops), "bytes": str(s.bytes),
                                 "flops_elementwise": str(s.flops_elementwise), "nodes": len(s.nodes)}
                        for s in self.by_site.values()},
        }

    def __str__(self) -> str:
        lines = [f"cost in T = latent frames ({len(self.by_node)} nodes, {len(self.by_site)} attention sites"
                 + (f", step graph over chunks of {self.chunk_frames} frames)" if self.chunk_frames else ")")]
        for name in METRICS:
            exact, growth = self.metric(name), self.asymptotic(name)
            lines.append(f"  {name:<18} degree {self.degree(name)}  {exact}"
                         + (f"\n  {'':<18} ~ {growth}" if sympy.expand(exact - growth) != 0 else ""))
        lines.append(f"  {'weights_bytes':<18} {self.weights_bytes}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Counting aten ops on fake tensors with symbolic shapes
# ---------------------------------------------------------------------------------------------

@dataclass
class _OpCost:
    flops: Any = 0
    flops_elementwise: Any = 0
    bytes: Any = 0
    new_storages: dict = field(default_factory=dict)  # StorageWeakRef -> bytes allocated by the op


class _Symbols:
    """Converts SymInts / torch sympy to plain sympy in ``T``, with a cache (shapes repeat a lot)."""

    def __init__(self, substitution: dict):
        self.substitution = substitution
        self.cache: dict = {}

    def __call__(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return sympy.Integer(value)
        expr = value.node.expr if isinstance(value, torch.SymInt) else value
        if expr not in self.cache:
            converted = sympy.expand(symbolic.to_standard(expr).xreplace(self.substitution))
            unknown = converted.free_symbols - {symbolic.T}
            if unknown:
                raise ValueError(f"a size in the graph depends on {sorted(map(str, unknown))}, not only on the "
                                 "frame count: another dynamic input size, or a data-dependent output size "
                                 "(nonzero, masking), which cannot be costed")
            self.cache[expr] = converted
        return self.cache[expr]

    def shape(self, t: torch.Tensor) -> tuple:
        return tuple(self(d) for d in t.shape)

    def numel(self, t: torch.Tensor):
        return self(t.numel())

    def nbytes(self, t: torch.Tensor):
        return self(t.numel()) * t.element_size()

    def storage_nbytes(self, t: torch.Tensor):
        return self(t.untyped_storage().nbytes())


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _registered_flops(func, args, kwargs, out, sym: _Symbols):
    """FLOPs of ``func`` by the formula registered with torch.utils.flop_counter, on sympy shapes."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    shape_formula = getattr(formula, "__wrapped__", None)
    if shape_formula is None:  # a raw formula: it wants the tensors themselves
        return sym(formula(*args, **kwargs, out_val=out))

    def as_shape(x):
        if isinstance(x, torch.Tensor):
            return sym.shape(x)
        return sym(x) if isinstance(x, torch.SymInt) else x

    try:
        shapes, kw_shapes, out_shape = tree_map(as_shape, (args, kwargs, out))
        return sympy.expand(shape_formula(*shapes, out_shape=out_shape, **kw_shapes))
    except AssertionError:
        # a formula's shape check that sympy cannot prove (e.g. floor(T/floor(T/2)) == 2): evaluate
        # it on the SymInt shapes as FlopCounterMode does (guards hold at the example length)
        return sym(formula(*args, **kwargs, out_val=out))


def _hybrid_scores(call: HybridCall, sym: _Symbols):
    """Number of (query, key) softmax scores the hybrid op computes: its FLOP formula with
    head_dim 1 and no features counts 4 per score."""
    bsz, heads, n, _ = sym.shape(call.q)
    layout = {k: v for k, v in call.layout.items() if k != "scale"}
    return hybrid_attention_flops(bsz, heads, n, 1, 0, **layout) / 4


def _elementwise(func, args, inputs, outputs, sym: _Symbols):
    if func == HYBRID_OP:
        # softmax over the window scores + combining o with the linear numerator and denominator
        call = HybridCall.from_args(args)
        return _hybrid_scores(call, sym) + 2 * sym.numel(call.q)
    if torch.Tag.pointwise in func.tags:
        return sum(sym.numel(t) for t in outputs)
    if (torch.Tag.reduction in func.tags or func._overloadpacket in _NORMALISATIONS) and inputs:
        return sym.numel(inputs[0])
    return 0


def op_cost(func, args, kwargs, out, sym: _Symbols) -> _OpCost:
    """Cost of one aten op call (the unit FlopCounterMode counts)."""
    inputs, outputs = _tensors((args, kwargs)), _tensors(out)
    if not outputs:
        return _OpCost()
    read = {storage_key(t) for t in inputs}
    new = {storage_key(t): sym.storage_nbytes(t) for t in outputs if storage_key(t) not in read}
    moved = 0 if func.is_view else sum(sym.nbytes(t) for t in inputs) + sum(sym.nbytes(t) for t in outputs)
    return _OpCost(_registered_flops(func, args, kwargs, out, sym), _elementwise(func, args, inputs, outputs, sym),
                   moved, new)


class _OpCounter(TorchDispatchMode):
    """Records the cost of every op that reaches dispatch, following FlopCounterMode's rule: try to
    decompose first (CompositeImplicit ops), count what cannot be decomposed."""

    def __init__(self, sym: _Symbols, unfuse_hybrid: bool = False, prefix: str = "cumsum"):
        super().__init__()
        self.sym = sym
        self.ops: list[_OpCost] = []
        self.opaque = False  # while True, ops pass through uncounted (a node costed as a whole)
        # attention="math"/"portable": the hybrid op runs as its chunk-parallel aten form (materialised
        # windows), prefix sums as cumsum or (portable, what the AOT backends compile) a triangular matmul
        self.hybrid_decomposition = decompositions(prefix)[HYBRID_OP] if unfuse_hybrid else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.opaque or func in _SHAPE_QUERIES or isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if func == HYBRID_OP and self.hybrid_decomposition is not None:
            with self:
                return self.hybrid_decomposition(*args, **kwargs)
        if func is not torch.ops.prim.device.default:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        if func in _SYMBOLIC_SIZE_DECOMPOSED:
            with self:
                return decomposition_table[func](*args, **kwargs)
        out = func(*args, **kwargs)
        self.ops.append(op_cost(func, args, kwargs, out, self.sym))
        return out


def _fused_attention_cost(node: Node, env: dict, out, sym: _Symbols) -> _OpCost:
    """scaled_dot_product_attention as one fused kernel: the FLOPs of its registered formula, one
    elementwise FLOP per score (the softmax), reads q, k, v (and a mask), writes the output."""
    call = SdpaCall.from_node(node)
    q, k, v = (env[a] for a in (call.q, call.k, call.v))
    inputs = [q, k, v] + ([env[call.mask]] if isinstance(call.mask, Node) else [])
    flops = sympy.expand(sdpa_flop.__wrapped__(sym.shape(q), sym.shape(k), sym.shape(v)))
    scores = sympy.prod(sym.shape(q)[:-1]) * sym.shape(k)[-2]
    moved = sum(sym.nbytes(t) for t in inputs) + sym.nbytes(out)
    return _OpCost(flops, scores, moved, {storage_key(out): sym.storage_nbytes(out)})


class _CostInterpreter(Interpreter):
    """Runs the exported graph on fake tensors and keeps, per node, the ops it dispatched."""

    def __init__(self, gm, counter: _OpCounter, fake_mode, fused_attention: bool):
        super().__init__(gm, garbage_collect_values=False)
        self.counter = counter
        self.fake_mode = fake_mode
        self.fused_attention = fused_attention
        self.node_ops: dict[Node, list[_OpCost]] = {}
        self.fakes: dict[int, torch.Tensor] = {}  # id(real tensor) -> its fake twin

    def _fake(self, t):
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor):
            return t
        if id(t) not in self.fakes:
            self.fakes[id(t)] = self.fake_mode.from_tensor(t, static_shapes=True)
        return self.fakes[id(t)]

    def get_attr(self, target, args, kwargs):
        # weights are real (or meta) tensors on the module: run on fake twins, as export did
        return self._fake(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        state = {k: self._fake(v) for k, v in
                 list(module.named_parameters()) + list(module.named_buffers())}
        return torch.func.functional_call(module, state, args, kwargs)

    def run_node(self, n: Node):
        self.counter.ops = []
        fused = self.fused_attention and n.target == SDPA_OP
        self.counter.opaque = fused
        try:
            result = super().run_node(n)
        finally:
            self.counter.opaque = False
        self.node_ops[n] = ([_fused_attention_cost(n, self.env, result, self.counter.sym)] if fused
                            else self.counter.ops)
        return result


# ---------------------------------------------------------------------------------------------
# Export with a symbolic frame axis
# ---------------------------------------------------------------------------------------------

def _export_whole_video(model, args: tuple, kwargs: dict, frames):
    """Export with the latent-frame axis symbolic (export_video_model's rules for ``frames``)."""
    found = find_frame_input(model, args, kwargs, frames)
    if found is None:
        raise ValueError("no frame axis: no 5-D [B, C, T, H, W] tensor among the inputs; pass frames=axis "
                         "or frames=(argument, axis), or chunk_frames=... for a streaming step graph")
    name, video, axis = found
    if video.shape[axis] < 2:
        raise ValueError(f"the example input {name!r} needs at least 2 frames on axis {axis} to make it symbolic "
                         f"(torch.export specialises sizes 0 and 1); got shape {tuple(video.shape)}")
    ep, axis_info = export_video_model(model, args, kwargs, frames=frames)
    if not axis_info.dynamic:
        raise ConversionError(f"{type(model).__name__} exports only with a fixed frame count, so its cost cannot be "
                              f"expressed in T: {axis_info.reason}")
    return ep


def _export_static(model, args: tuple, kwargs: dict):
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # any tracing failure: report it as the model not exporting
        raise ConversionError(f"{type(model).__name__} could not be exported: {type(err).__name__}: {err}") from err


@dataclass
class _Program:
    """A graph to cost: its GraphModule, user-input placeholders, and the nodes holding weights."""

    gm: torch.fx.GraphModule
    inputs: list[Node]
    weights: set[Node]

    @classmethod
    def exported(cls, ep) -> "_Program":
        sig = ep.graph_signature
        weights = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
        placeholders = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
        return cls(ep.graph_module, [n for n in placeholders if n.name in set(sig.user_inputs)],
                   {n for n in placeholders if n.name in weights} | _get_attrs(ep.graph_module))

    @classmethod
    def unlifted(cls, gm) -> "_Program":
        """An ``ExportedProgram.module()`` graph (as HybridModel keeps): weights are get_attr nodes."""
        return cls(gm, [n for n in gm.graph.nodes if n.op == "placeholder"], _get_attrs(gm))

    def fake_mode(self):
        mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in self.gm.graph.nodes])
        if mode is None:
            raise ValueError("the graph carries no fake tensor values (node.meta['val']); pass an nn.Module or an "
                             "ExportedProgram")
        return mode


def _get_attrs(gm) -> set[Node]:
    return {n for n in gm.graph.nodes if n.op == "get_attr"}


def _frame_substitution(program: _Program) -> dict:
    """{export symbol: expression in T} from the one symbolic dim of the user inputs."""
    dims = [d for n in program.inputs for t in _tensors(n.meta.get("val")) for d in t.shape
            if isinstance(d, torch.SymInt)]
    if not dims:
        raise ValueError("the exported graph has no symbolic input dimension: the frame axis was specialised "
                         "(the model's code depends on the exact number of frames)")
    frame_expr = symbolic.to_standard(dims[0])
    symbols = {s for d in dims for s in symbolic.to_standard(d).free_symbols}
    if len(symbols) != 1:
        raise ValueError(f"expected one symbolic dimension (the frames), found {sorted(map(str, symbols))}")
    (sym,) = symbols
    solved = sympy.solve(sympy.Eq(frame_expr, symbolic.T), sym)
    if len(solved) != 1:
        raise ValueError(f"cannot express the export symbol {sym} through the frame count {frame_expr} = T")
    return {sym: solved[0]}


# ---------------------------------------------------------------------------------------------
# Walking the graph
# ---------------------------------------------------------------------------------------------

def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def _is_attention(node: Node) -> bool:
    """An attention node of the spelling table (kernels, and the softmax of manual attention), or a
    node the rewrite tagged with its site."""
    return spelling_of(node) is not None or "rehyat_site" in node.meta


def _sites(nodes: list[Node]) -> dict[str, tuple[str, str]]:
    """{module path: (site name, module path)} for every module holding an attention node."""
    sites = {}
    for n in nodes:
        if n.op == "call_function" and _is_attention(n):
            module = _module_path(n)
            sites.setdefault(module, (n.meta.get("rehyat_site") or module or n.name, module))
    return sites


def _site_of(module: str, sites: dict) -> tuple[str, str] | None:
    parts = module.split(".") if module else []
    for cut in range(len(parts), -1, -1):
        hit = sites.get(".".join(parts[:cut]))
        if hit:
            return hit
    return None


def _node_sites(nodes: list[Node], sites: dict) -> dict[Node, str]:
    """Site of each node: by its module path, else (nodes a pass inserted without one, such as the
    feature maps) the one site all its users belong to."""
    found = {}
    for n in reversed(nodes):
        site = _site_of(_module_path(n), sites) if _module_path(n) else None
        if site:
            found[n] = site[0]
        elif n.users and len({found.get(u) for u in n.users}) == 1 and found.get(next(iter(n.users))):
            found[n] = found[next(iter(n.users))]
    return found


def _walk(program: _Program, substitution: dict, attention: str):
    """(by_node, by_site, peak memory, weight bytes)."""
    gm = program.gm
    fake_mode = program.fake_mode()
    sym = _Symbols(substitution)
    counter = _OpCounter(sym, unfuse_hybrid=attention in ("math", "portable"),
                         prefix="matmul" if attention == "portable" else "cumsum")
    interp = _CostInterpreter(gm, counter, fake_mode, fused_attention=attention == "fused")
    backend = sdpa_kernel([SDPBackend.MATH]) if attention in ("math", "portable") else contextlib.nullcontext()
    with fake_mode, backend, torch.no_grad(), counter:
        interp.run(*[n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])

    weight_nodes = program.weights
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    sites = _sites(nodes)
    node_site = _node_sites(nodes, sites)
    by_node, workspace = {}, {}
    for n in nodes:
        ops = interp.node_ops.get(n, [])
        own = {storage_key(t) for t in _tensors(interp.env.get(n))}
        workspace[n] = sum((size for op in ops for key, size in op.new_storages.items() if key not in own),
                           sympy.Integer(0))
        by_node[n.name] = NodeCost(n.name, str(n.target), _module_path(n), node_site.get(n),
                                   sympy.expand(sum((o.flops for o in ops), sympy.Integer(0))),
                                   sympy.expand(sum((o.flops_elementwise for o in ops), sympy.Integer(0))),
                                   sympy.expand(sum((o.bytes for o in ops), sympy.Integer(0))),
                                   sympy.expand(workspace[n]))
    by_site = _sum_sites(by_node, sites)
    live = activation_liveness(gm.graph, interp.env, sym.storage_nbytes, weight_nodes, workspace)
    envelope = symbolic.upper_envelope(live.candidates or [sympy.Integer(0)])
    peak = envelope[0] if len(envelope) == 1 else sympy.Max(*envelope)
    held = {storage_key(t): t for n in weight_nodes for t in _tensors(interp.env.get(n))}
    held |= {storage_key(t): t for n in nodes if n.op == "call_module"  # inserted modules, e.g. phi
             for t in interp.fetch_attr(n.target).state_dict().values()}
    weights = sum((sym.storage_nbytes(t) for t in held.values()), sympy.Integer(0))
    return by_node, by_site, peak, weights


def _valid_frames(substitution: dict, exported_range: dict, shape_env) -> tuple[int, int | None]:
    """(lowest, highest or None) frame count for which the graph's guards hold. Decompositions can
    guard on the example's frame count (e.g. "one chunk"); if that capped the range the export
    allowed, the expressions would be wrong for longer videos, so that is an error."""
    if not substitution:
        return (1, None)
    (sym, in_t), = substitution.items()
    before, after = exported_range[sym], shape_env.var_to_range.get(sym)
    after = after or before
    if before is not None and after.upper < before.upper:
        allowed = "oo" if before.upper == int_oo else before.upper
        raise ConversionError(f"the graph only holds for input frame counts in [{after.lower}, {after.upper}] "
                              f"(the export allowed up to {allowed}): it specialises on the example's frame "
                              "count; give an example with more frames (e.g. more than chunk+overlap)")
    frame_of = sympy.solve(sympy.Eq(in_t, sym), symbolic.T)[0]  # T as a function of the symbol
    lower = int(frame_of.subs(sym, int(after.lower)))
    upper = None if after.upper in (int_oo, sympy.oo) else int(frame_of.subs(sym, int(after.upper)))
    return (max(lower, 1), upper)


def _sum_sites(by_node: dict[str, NodeCost], sites: dict) -> dict[str, SiteCost]:
    out = {}
    for name, module in sites.values():
        members = [c for c in by_node.values() if c.site == name]
        out[name] = SiteCost(name, module, *(sympy.expand(sum((getattr(c, m) for c in members), sympy.Integer(0)))
                                             for m in ("flops", "flops_elementwise", "bytes")),
                             tuple(c.name for c in members))
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def cost(model, args=(), kwargs=None, *, frames=None, chunk_frames: int | None = None,
         attention: str = "fused") -> CostReport:
    """Symbolic cost of ``model(*args, **kwargs)`` in ``T`` = latent frames.

    model: an nn.Module (exported here with the frame axis symbolic) or a ``torch.export``
    ExportedProgram that already has one symbolic input dimension counting frames.
    frames: which input dim is time -- None (the first 5-D [B, C, T, H, W] input, axis 2), an int
    axis of that input (or of the first tensor input), or (argument position or keyword, axis).
    chunk_frames: the model is a streaming step graph processing ``chunk_frames`` latent frames per
    call (nothing symbolic is exported); totals are per-call cost times ceiling(T / chunk_frames),
    peak memory is one call's.
    attention: "fused" counts scaled_dot_product_attention and the hybrid op as one kernel each
    (FLOPs by their registered formulas; they read q, k, v (and phi_q, phi_k) and write the output,
    no score matrix in memory); "math" runs both as their unfused aten decompositions (SDPA's math
    path, the hybrid op's chunk-parallel form), so score and probability matrices are materialised
    as on most phone GPUs, and FLOPs are those of the decomposed ops; "portable" is "math" with the
    hybrid op's prefix sums as a triangular matmul: the decomposition the ahead-of-time backends
    (TVM, IREE, QNN HTP; ``backends/portable.py``) compile (its [chunks, chunks] matrix makes bytes
    formally quadratic in T, with a small coefficient).
    """
    kwargs = dict(kwargs or {})
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    if attention not in ("fused", "math", "portable"):
        raise ValueError(f"attention must be 'fused', 'math' or 'portable', got {attention!r}")
    if chunk_frames is not None:
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive int (latent frames per step), got {chunk_frames!r}")
        if frames is not None:
            raise ValueError("give frames (a whole-video graph) or chunk_frames (a step graph), not both")
    exported = isinstance(model, torch.export.ExportedProgram)
    if not exported and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or an ExportedProgram, got {type(model).__name__}")

    if isinstance(model, HybridModel):
        if chunk_frames is not None:
            raise ValueError("chunk_frames is for streaming step graphs; a HybridModel runs the whole video "
                             "(cost it without chunk_frames)")
        if model.capture == "dynamo":
            raise model.whole_graph_refusal(
                "for rc.cost one graph of the whole model with the frame axis symbolic: the captured graphs are "
                "static per frame count (so each would cost as a constant in T) and the python between graph "
                "breaks is not costed")
        # its rewritten graph is already exported with the frame axis symbolic (and knows its sites)
        program = _Program.unlifted(model.graph_module(*args, **kwargs))
    elif exported:
        program = _Program.exported(model)
    elif chunk_frames is not None:
        program = _Program.exported(_export_static(model, args, kwargs))
    else:
        program = _Program.exported(_export_whole_video(model, args, kwargs, frames))
    if chunk_frames is not None:
        substitution, calls = {}, sympy.ceiling(symbolic.T / chunk_frames)
    else:
        substitution, calls = _frame_substitution(program), sympy.Integer(1)
    shape_env = program.fake_mode().shape_env
    exported_range = {sym: shape_env.var_to_range.get(sym) for sym in substitution}

    by_node, by_site, peak, weights = _walk(program, substitution, attention)
    frames_range = _valid_frames(substitution, exported_range, shape_env)
    totals = {m: calls * sympy.expand(sum((getattr(c, m) for c in by_node.values()), sympy.Integer(0)))
              for m in ("flops", "flops_elementwise", "bytes")}
    return CostReport(**totals, peak_memory=peak, by_node=by_node, by_site=by_site, weights_bytes=weights,
                      calls=calls, chunk_frames=chunk_frames, frames_range=frames_range)


def check_linear(report: CostReport, metrics=("flops", "flops_elementwise", "bytes", "peak_memory")) -> CostReport:
    """Raise ComplexityError naming every node whose cost grows faster than linearly in T (and the
    peak memory, if it does). Returns ``report`` when everything is at most linear."""
    if not isinstance(report, CostReport):
        raise TypeError(f"check_linear takes the CostReport returned by rc.cost, got {type(report).__name__}")
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"metrics must be names from {METRICS}, got {m!r}")
    node_metrics = [m for m in metrics if m != "peak_memory"] + (["workspace"] if "peak_memory" in metrics else [])
    offenders = []
    for c in report.by_node.values():
        bad = {m: report.degree(getattr(c, m)) for m in node_metrics}
        bad = {m: d for m, d in bad.items() if d > 1}
        if bad:
            offenders.append((c, bad))
    peak_degree = report.degree("peak_memory") if "peak_memory" in metrics else 0
    if not offenders and peak_degree <= 1:
        return report
    lines = [f"{c.name} ({c.target}" + (f", site {c.site}" if c.site else "") + (f", module {c.module}" if c.module
             else "") + "): " + ", ".join(f"{m} ~ T^{d}" for m, d in bad.items()) for c, bad in offenders]
    if peak_degree > 1:
        lines.append(f"peak_memory ~ T^{peak_degree}")
    shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
    err = ComplexityError(f"cost is super-linear in T (latent frames) at {len(offenders)} node(s):\n  {shown}")
    err.nodes = [c.name for c, _ in offenders]
    raise err
