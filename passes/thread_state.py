"""thread_state: turn a converted video DiT graph into a step program that runs one chunk.

Input: the rewritten ``torch.fx.GraphModule`` of a :class:`~rehyat_compile.HybridModel` (exported with
the latent-frame axis symbolic; every converted site is one ``rehyat::hybrid_attention`` node).
Output: a :class:`StepProgram` whose ``module`` is a flat GraphModule

    step(*chunk_inputs, *tables, *states) -> (*chunk_outputs, *new_states)

* ``chunk_inputs``: the model's flattened inputs, each frame-dependent one restricted to the chunk's
  frames (latents, per-frame timesteps, per-token rotary tables given as inputs);
* ``tables``: position-dependent values that the graph computes from shapes and constants alone
  (RoPE tables from ``arange(T)``, learned frame embeddings sliced by the frame count). They are
  evaluated once for the whole video (``table_module``) and sliced per chunk, so every chunk sees
  its true frame offset;
* ``states``: six tensors per converted site (``rc.HybridState`` fields: S, z, overlap K/V/phi_k,
  overlap validity), fixed shapes, so one step graph serves every chunk; each hybrid node becomes a
  call to :func:`hybrid_step` (``rc.hybrid_attention_step``) reading them and returning the new ones.

Frame-dependent sizes are affine in token frames T (= input frames / temporal patch): ``a*T + b``.
A chunk of token frames [t0, t1) takes ``[0, b)`` (extra tokens, assumed in front) and
``[b + a*t0, b + a*t1)`` of such a dim. The pass refuses (ConversionError) non-causal sites, sites
with different chunk sizes, and attention/softmax left unconverted over frame-dependent tokens (it
would need every frame at once).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from ..attention import HybridState, hybrid_attention_steps, initial_state
from ..attention_spellings import mixed_axis
from ..declines import describe_shape, describe_size
from ..errors import ConversionError
from ..op import HybridCall, is_hybrid_node

STATE_FIELDS = HybridState._fields

# Ops that read only the shape (and dtype/device) of their tensor argument, never its values.
_SHAPE_READERS = {
    torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_storage_offset.default, torch.ops.aten.empty_like.default,
    torch.ops.aten.zeros_like.default, torch.ops.aten.ones_like.default, torch.ops.aten.full_like.default,
    torch.ops.aten.new_zeros.default, torch.ops.aten.new_ones.default, torch.ops.aten.new_empty.default,
    torch.ops.aten.new_full.default,
}
# Checks the export inserted for the example shapes; a chunk has other shapes, so they are dropped.
_DROPPED = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
            torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten.sym_constrain_range.default}


@dataclass(frozen=True)
class FrameDim:
    """A dim of size ``per_frame * T + extra + extra_after`` (T token frames): ``extra`` entries sit in
    front of the frames, ``extra_after`` behind them (a joint sequence with text after the video)."""

    dim: int
    per_frame: int
    extra: int = 0
    extra_after: int = 0

    def size(self, frames: int) -> int:
        return self.per_frame * frames + self.extra + self.extra_after

    def take(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Entries of token frames [start, stop), with the extra entries before and after them."""
        body = t.narrow(self.dim, self.extra + self.per_frame * start, self.per_frame * (stop - start))
        if not (self.extra or self.extra_after):
            return body
        head = t.narrow(self.dim, 0, self.extra)
        tail = t.narrow(self.dim, t.shape[self.dim] - self.extra_after, self.extra_after)
        return torch.cat([head, body, tail], self.dim)


def place_extras(fd, sites) -> "FrameDim":
    """``fd`` with its extra entries split as the sites' token layout splits them (before / after the
    video), when exactly one split of the converted sites fits its size; front otherwise."""
    if not isinstance(fd, FrameDim) or not (fd.extra or fd.extra_after):
        return fd
    extras = fd.extra + fd.extra_after
    splits = {(s.extra_before, s.extra_after) for s in sites
              if s.tokens_per_frame == fd.per_frame and isinstance(s.extra_before, int)
              and isinstance(s.extra_after, int) and s.extra_before + s.extra_after == extras}
    if len(splits) != 1:
        return fd
    before, after = splits.pop()
    return FrameDim(fd.dim, fd.per_frame, before, after)


@dataclass(frozen=True)
class SiteState:
    """One converted site's recurrent state: layout and the shapes/dtypes of its six tensors."""

    name: str
    tokens_per_frame: int
    chunk_frames: int
    overlap_frames: int
    extra_before: int | None    # None: computed in the graph (data-dependent)
    extra_after: int | None
    batch: int
    heads: int
    head_dim: int
    feature_dim: int
    dtype: torch.dtype           # q/k/v dtype
    feature_dtype: torch.dtype   # phi_k dtype

    def initial(self, device) -> HybridState:
        """S = 0, z = 0 and an empty overlap cache (``rc.attention.initial_state``)."""
        k = torch.empty(self.batch, self.heads, 0, self.head_dim, dtype=self.dtype, device=device)
        fk = torch.empty(self.batch, self.heads, 0, self.feature_dim, dtype=self.feature_dtype, device=device)
        return initial_state(k, k, fk, self.overlap_frames * self.tokens_per_frame)


@dataclass
class StepProgram:
    """The result of :func:`thread_state`; see the module docstring for the calling convention."""

    module: fx.GraphModule                 # step(*chunk_inputs, *tables, *states)
    table_module: fx.GraphModule           # tables(*flat_full_inputs) -> tuple of full-video tables
    input_dims: list[FrameDim | None]      # per flat input: its frame dim, None = passed whole
    table_dims: list[FrameDim | None]      # per table: its frame dim, None = passed whole
    output_dims: list[FrameDim | None]     # per flat output: its frame dim, None = last chunk's value
    sites: list[SiteState]
    in_spec: object                        # pytree spec of (args, kwargs); None for a flat module
    out_spec: object
    patch: int = 1                         # input frames per token frame
    table_names: list[str] = field(default_factory=list)

    @property
    def chunk_frames(self) -> int:
        return self.sites[0].chunk_frames

    @property
    def n_outputs(self) -> int:
        return len(self.output_dims)


# ---------------------------------------------------------------------------------------------
# Frame-dependent sizes
# ---------------------------------------------------------------------------------------------

def _expr(size):
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return size if isinstance(size, sympy.Basic) else None


def frame_dim_of(size, dim: int, symbol, patch: int) -> FrameDim | None:
    """The :class:`FrameDim` of a dim of symbolic ``size`` (in the input-frame symbol), or None if
    its size does not depend on the frames. Raises ConversionError if it is not affine in T."""
    expr = _expr(size)
    symbols = set(symbol) if isinstance(symbol, (set, frozenset)) else {symbol}
    if expr is None or not symbols & expr.free_symbols:
        return None
    values = [int(expr.subs({s: patch * t for s in symbols})) for t in (1, 2, 3, 5, 8)]
    per_frame, extra = values[1] - values[0], 2 * values[0] - values[1]
    if len(set(values)) == 1:
        return None  # constant whenever the frames fill whole temporal patches
    if per_frame <= 0 or any(v != per_frame * t + extra for v, t in zip(values, (1, 2, 3, 5, 8))):
        raise ConversionError(f"a frame-dependent size, {describe_size(expr, tuple(symbols), patch, 'entries')}, "
                              "is not of the form a*T + b in token frames T; cannot chunk it")
    return FrameDim(dim, per_frame, extra)


def tensor_frame_dim(val, symbol, patch: int) -> FrameDim | None:
    """The one frame-dependent dim of a (fake) tensor, or None."""
    if not isinstance(val, torch.Tensor):
        return None
    dims = [d for d in (frame_dim_of(s, i, symbol, patch) for i, s in enumerate(val.shape)) if d is not None]
    if len(dims) > 1:
        raise ConversionError(f"a tensor of shape {describe_shape(val.shape, symbol, patch)} has several "
                              "frame-dependent dims; streaming chunks one")
    return dims[0] if dims else None


def _free_symbols(val) -> set:
    if isinstance(val, torch.Tensor):
        return set().union(*(_expr(s).free_symbols for s in val.shape if _expr(s) is not None))
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return set(val.node.expr.free_symbols)
    if isinstance(val, (list, tuple)):
        return set().union(*(_free_symbols(v) for v in val)) if val else set()
    return set()


def frame_symbols(gm: fx.GraphModule) -> frozenset:
    """The shape symbols of the graph's inputs: latent-frame counts (several when more than one video
    input was exported with a symbolic frame axis, e.g. VACE's control video; equal when streaming)."""
    symbols = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        symbols |= _free_symbols(node.meta.get("val"))
    if not symbols:
        raise ConversionError("streaming needs the model exported with a symbolic frame axis; the graph's inputs "
                              "have no symbolic dims (the export specialised the frame count)")
    return frozenset(symbols)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

def _input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _mutated_root(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes into, followed back through views to the base."""
    schema = _schema(node)
    if schema is None or not schema.arguments or not (schema.arguments[0].alias_info or False) \
            or not schema.arguments[0].alias_info.is_write or not isinstance(node.args[0], fx.Node):
        return None
    root = node.args[0]
    while (s := _schema(root)) is not None and s.returns and s.returns[0].alias_info is not None \
            and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    return root


def data_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values depend on the values of input tensors (not only on their shapes). A
    buffer that an in-place op fills with data (``empty_like`` + ``copy_`` into slices) is data."""
    seeds: set[fx.Node] = set()
    while True:
        data: set[fx.Node] = set()
        for node in graph.nodes:
            if node.op == "placeholder":
                if isinstance(node.meta.get("val"), torch.Tensor):
                    data.add(node)
            elif node.op in ("call_function", "call_method", "call_module"):
                inputs = _input_nodes(node)
                if node.target in _SHAPE_READERS:
                    inputs = [n for n in inputs if n is not node.args[0]]
                if node in seeds or any(n in data for n in inputs):
                    data.add(node)
        roots = {r for n in data if (r := _mutated_root(n)) is not None}
        if roots <= seeds:
            return data
        seeds |= roots


def symbol_dependent(graph: fx.Graph, symbols: frozenset) -> set[fx.Node]:
    """Nodes whose value (or shape) depends on the frame count."""
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if symbols & _free_symbols(node.meta.get("val")) or any(n in dep for n in _input_nodes(node)):
            dep.add(node)
    return dep


def _refuse_global_mixer(node: fx.Node) -> None:
    if mixed_axis(node) is None:
        raise ConversionError(
            f"stream cannot run node {node.name} ({node.target}) chunk by chunk: it reduces over the frame axis, "
            f"so each frame's output depends on every frame of the video (a non-causal computation)")
    raise ConversionError(
        f"stream cannot run node {node.name} ({node.target}) chunk by chunk: it attends over every "
        f"frame (an unconverted attention site); convert it with rc.transform(..., layers=None)")


_REDUCTIONS = {torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.dim, torch.ops.aten.amax.default,
               torch.ops.aten.amin.default, torch.ops.aten.prod.dim_int, torch.ops.aten.var.correction,
               torch.ops.aten.std.correction, torch.ops.aten.logsumexp.default, torch.ops.aten.max.dim,
               torch.ops.aten.min.dim, torch.ops.aten.argmax.default, torch.ops.aten.argmin.default,
               torch.ops.aten.linalg_vector_norm.default, torch.ops.aten.cumsum.default}


def mixing_axes(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """(tensor node, dim) pairs a node mixes all entries of: the keys of an attention
    (:func:`~rehyat_compile.attention_spellings.mixed_axis`), each dim a reduction reduces, the
    contracted dim of a matrix product. Applied to a frame dim, every frame's output reads every frame."""
    mixed = mixed_axis(node)
    if mixed is not None:
        return [mixed]
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return []
    x, target = node.args[0], node.target
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return []
    if target in _REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or range(val.dim()))
        return [(x, d % max(val.dim(), 1)) for d in dims]
    if target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.matmul.default):
        return [(x, val.dim() - 1)]
    return []




def _check_streamable(graph: fx.Graph, data: set, symbol, patch: int) -> None:
    """Refuse what cannot run chunk by chunk (see :func:`_check_sites`): any attention spelling of
    :mod:`rehyat_compile.attention_spellings` left unconverted over frame-dependent keys."""
    _check_sites(graph)
    for node in graph.nodes:
        for keys, dim in (mixing_axes(node) if node in data else ()):
            val = keys.meta.get("val") if isinstance(keys, fx.Node) else None
            if isinstance(val, torch.Tensor) and frame_dim_of(val.shape[dim], 0, symbol, patch) is not None:
                _refuse_global_mixer(node)


# ---------------------------------------------------------------------------------------------
# The step function each site becomes
# ---------------------------------------------------------------------------------------------

def hybrid_step(q, k, v, fq, fk, s, z, k_overlap, v_overlap, fk_overlap, overlap_valid, tokens_per_frame: int,
                chunk_frames: int, overlap_frames: int, extra_before: int, extra_after: int, scale: float):
    """``rc.hybrid_attention_step`` with the state as six flat tensors: returns (y, *new_state). A
    call on several chunks' frames steps them in turn (:func:`~rehyat_compile.attention.hybrid_attention_steps`)."""
    state = HybridState(s, z, k_overlap, v_overlap, fk_overlap, overlap_valid)
    y, new = hybrid_attention_steps(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                   chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                   extra_before=extra_before, extra_after=extra_after, scale=scale)
    return (y, *new)


def _site_state(node: fx.Node) -> SiteState:
    call = HybridCall.from_node(node)
    q, fk = call.q.meta["val"], call.fk.meta["val"]
    bsz, heads, d = q.shape[0], q.shape[1], q.shape[3]
    if not all(isinstance(x, int) for x in (bsz, heads, d, fk.shape[3])):
        raise ConversionError(f"site {node.meta.get('rehyat_site', node.name)}: batch, heads and head dims must be "
                              f"static to carry a fixed-size state, got q {describe_shape(q.shape)}")
    eb, ea = (None if isinstance(x, fx.Node) else x for x in (call.extra_before, call.extra_after))
    return SiteState(node.meta.get("rehyat_site", node.name), call.tokens_per_frame, call.chunk_frames,
                     call.overlap_frames, eb, ea, bsz, heads, d, fk.shape[3], q.dtype, fk.dtype)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------

def _pytree_specs(gm: fx.GraphModule):
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return (info.in_spec, info.out_spec) if info is not None else (None, None)


def _is_tensor_valued(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and bool(val)
                                             and all(isinstance(v, torch.Tensor) for v in val))


class _FillMissingMeta(fx.Interpreter):
    """Runs only the nodes without ``meta["val"]`` (on fake values); the others give their own."""

    def run_node(self, n):
        if "val" in n.meta:
            return n.meta["val"]
        result = super().run_node(n)
        n.meta["val"] = result
        return result


def ensure_meta(gm: fx.GraphModule) -> None:
    """Fill in ``meta["val"]`` where a pass left it out, by fake propagation in the export's own
    symbolic shape environment (so sizes stay expressions in the frame symbol)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("output",) and n.target not in _DROPPED]
    if all("val" in n.meta for n in nodes):
        return
    inputs = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    mode = next((x.fake_mode for x in inputs if hasattr(x, "fake_mode")), None)
    if mode is None:
        raise ConversionError("thread_state needs meta['val'] on the graph's inputs (an exported graph)")
    with mode:
        _FillMissingMeta(gm).run(*inputs)


def _tables(graph: fx.Graph, data: set, dep: set) -> list[fx.Node]:
    """Shape-and-constant tensors that depend on the frame count and feed data nodes or outputs."""
    out = []
    for node in graph.nodes:
        if node in data or node not in dep or node.op == "placeholder":
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if any(u.op == "output" or (u in data and u.target not in _DROPPED) for u in node.users):
            out.append(node)
    return out


def _graph_module(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule of ``graph`` whose submodules ARE gm's (not the copies fx makes), so a later
    ``hybrid.to(device)`` (which replaces buffers) or training of the feature maps reaches it."""
    module = fx.GraphModule(gm, graph)
    for name, _ in list(module.named_children()):
        live = getattr(gm, name, None)
        if isinstance(live, torch.nn.Module):
            setattr(module, name, live)
    return module


def _table_module(gm: fx.GraphModule, tables: list[fx.Node]) -> fx.GraphModule:
    """GraphModule(*flat_inputs) -> tuple of tables: the ancestors of the tables, copied, with every
    in-place op that writes into one of them (``keep[-3:] = False`` on a mask built from a shape)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    needed: set[fx.Node] = set()
    stack = list(tables)
    while True:
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        stack = [n for n in gm.graph.nodes if n not in needed and _mutated_root(n) in needed]
        if not stack:
            break
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        elif node in needed and node.target not in _DROPPED:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[t] for t in tables))
    module = _graph_module(gm, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _example_frames(placeholders, symbol, patch: int) -> int | None:
    """Token frames of the example the graph was exported with (from the symbolic sizes' hints)."""
    for node in placeholders:
        val = node.meta.get("val")
        fd = tensor_frame_dim(val, symbol, patch)
        if fd is not None:
            hint = val.shape[fd.dim].node.hint
            if hint is not None:
                return (int(hint) - fd.extra - fd.extra_after) // fd.per_frame
    return None


def _input_dims(placeholders, sites: list[SiteState], symbol, patch: int) -> list[FrameDim | None]:
    """Frame dim of every input. A static input dim whose size is the example's video token count
    M*T (CogVideoX 1.5's ``image_rotary_emb``, exported with static shapes) is a per-token input too."""
    frames = _example_frames(placeholders, symbol, patch)
    token_counts = {s.tokens_per_frame * frames: s.tokens_per_frame for s in sites} if frames else {}
    dims = []
    for node in placeholders:
        val = node.meta.get("val")
        fd = tensor_frame_dim(val, symbol, patch)
        if fd is None and isinstance(val, torch.Tensor) and not _free_symbols(val):
            hits = [i for i, size in enumerate(val.shape) if size in token_counts and size > 1]
            if len(hits) == 1:
                fd = FrameDim(hits[0], token_counts[val.shape[hits[0]]])
        dims.append(fd)
    return dims


def _step_graph(gm: fx.GraphModule, data: set, tables: list[fx.Node], skip) -> tuple:
    """(step GraphModule, sites, flat output leaves of ``gm``): placeholders = gm's inputs, then the
    tables, then six state tensors per hybrid node; each hybrid node becomes a :func:`hybrid_step`
    call; ``skip(node)`` says which other nodes stay out (table internals)."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    site_nodes = [n for n in graph.nodes if is_hybrid_node(n)]
    step = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in placeholders:
        env[node] = step.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for i, node in enumerate(tables):
        env[node] = step.placeholder(f"table_{i}_{node.name}")
        env[node].meta = dict(node.meta)
    sites = [_site_state(n) for n in site_nodes]
    state_in = {}
    for node, site in zip(site_nodes, sites):
        tag = re.sub(r"\W", "_", site.name)  # a valid identifier: "<root>", "blocks.0.attn1:1"
        state_in[node] = [step.placeholder(f"state_{tag}_{f}") for f in STATE_FIELDS]

    state_out = []
    table_set = set(tables)
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or node in table_set or node.target in _DROPPED:
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # guards of the example shapes
        if skip(node):
            continue
        if is_hybrid_node(node):
            # extra token counts can be graph values (Mochi keeps only the unmasked text tokens)
            c = HybridCall.from_node(node).map(lambda a: env[a] if isinstance(a, fx.Node) else a)
            call = step.call_function(hybrid_step, (*c.tensors, *state_in[node], c.tokens_per_frame, c.chunk_frames,
                                                    c.overlap_frames, c.extra_before, c.extra_after, c.scale))
            call.meta = {k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")}
            outs = [step.call_function(operator.getitem, (call, i)) for i in range(1 + len(STATE_FIELDS))]
            outs[0].meta = dict(node.meta)
            env[node] = outs[0]
            state_out.extend(outs[1:])
            continue
        missing = [n for n in node.all_input_nodes if n not in env]
        if missing:
            raise ConversionError(f"thread_state: node {node.name} reads {missing[0].name}, which depends on the "
                                  "frame count through values the step cannot recompute per chunk")
        env[node] = step.node_copy(node, lambda n: env[n])

    out_node = next(iter(graph.find_nodes(op="output")))
    leaves = out_node.args[0]
    flat_leaves = list(leaves) if isinstance(leaves, (tuple, list)) else [leaves]
    step.output(tuple([env[x] if isinstance(x, fx.Node) else x for x in flat_leaves] + state_out))
    module = _graph_module(gm, step)
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    return module, sites, flat_leaves


def _check_patch(patch) -> None:
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be an int >= 1 (input frames per token frame), got {patch!r}")


def thread_state(gm: fx.GraphModule, *, patch: int = 1, symbol=None) -> StepProgram:
    """Build the step program of a converted, frame-symbolic GraphModule (see module docstring)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    _check_patch(patch)
    ensure_meta(gm)
    graph = gm.graph
    symbol = frame_symbols(gm) if symbol is None else frozenset(symbol if isinstance(symbol, (set, frozenset))
                                                                  else {symbol})
    data = data_nodes(graph)
    dep = symbol_dependent(graph, symbol)
    _check_streamable(graph, data, symbol, patch)
    tables = _tables(graph, data, dep)
    # table internals are evaluated once on the full video instead
    module, sites, leaves = _step_graph(gm, data, tables,
                                        lambda n: n not in data and n in dep and _is_tensor_valued(n))
    in_spec, out_spec = _pytree_specs(gm)
    return StepProgram(
        module=module,
        table_module=_table_module(gm, tables),
        input_dims=[place_extras(d, sites) for d in _input_dims(list(graph.find_nodes(op="placeholder")), sites,
                                                                symbol, patch)],
        table_dims=[place_extras(tensor_frame_dim(t.meta.get("val"), symbol, patch), sites) for t in tables],
        output_dims=[place_extras(tensor_frame_dim(x.meta.get("val"), symbol, patch), sites)
                     if isinstance(x, fx.Node) else None for x in leaves],
        sites=sites, in_spec=in_spec, out_spec=out_spec, patch=patch, table_names=[t.name for t in tables])


# ---------------------------------------------------------------------------------------------
# Static exports: compare a chunk-length trace with the whole-video trace
# ---------------------------------------------------------------------------------------------

def _frontier(graph: fx.Graph, data: set) -> list[fx.Node]:
    """Tensors computed from shapes and constants alone that data nodes (or outputs) read."""
    out = []
    for node in graph.nodes:
        if node in data or node.op == "placeholder" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if node.target in _DROPPED:
            continue
        if any(u.op == "output" or (u in data and u.target not in _DROPPED) for u in node.users):
            out.append(node)
    return out


def _concrete(shape) -> tuple[int, ...]:
    """Sizes as ints; a symbolic size gives the example's value it was traced with."""
    return tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in shape)


def frame_dim_between(chunk_shape, full_shape, chunk_frames: int, frames: int) -> FrameDim | None:
    """The FrameDim a tensor of ``full_shape`` at ``frames`` token frames and ``chunk_shape`` at
    ``chunk_frames`` implies (None when the shapes agree). Raises ConversionError otherwise."""
    chunk_shape, full_shape = _concrete(chunk_shape), _concrete(full_shape)
    if chunk_shape == full_shape:
        return None
    differ = [i for i, (c, f) in enumerate(zip(chunk_shape, full_shape)) if c != f]
    if len(chunk_shape) != len(full_shape) or len(differ) != 1 or frames == chunk_frames:
        raise ConversionError(f"a tensor of shape {full_shape} for {frames} frames has shape {chunk_shape} for "
                              f"{chunk_frames}: not one dim of size a*T + b; cannot chunk it")
    i = differ[0]
    per_frame, rest = divmod(full_shape[i] - chunk_shape[i], frames - chunk_frames)
    extra = chunk_shape[i] - per_frame * chunk_frames
    if rest or per_frame <= 0 or extra < 0:
        raise ConversionError(f"dim {i} has size {full_shape[i]} for {frames} frames and {chunk_shape[i]} for "
                              f"{chunk_frames}: not a*T + b with a > 0, b >= 0; cannot chunk it")
    return FrameDim(i, per_frame, extra)


def _check_sites(graph: fx.Graph) -> None:
    """Refuse graphs without hybrid nodes, non-causal sites, and sites with different chunk sizes."""
    calls = {node: HybridCall.from_node(node) for node in graph.nodes if is_hybrid_node(node)}
    if not calls:
        raise ConversionError("stream needs a converted model: the graph has no rehyat::hybrid_attention node")
    for node, call in calls.items():
        if not call.causal:
            raise ConversionError(
                f"stream needs a causal conversion: site {node.meta.get('rehyat_site', node.name)} was converted "
                "with causal=False (its linear part reads future frames); transform with causal=True")
    chunk_sizes = sorted({call.chunk_frames for call in calls.values()})
    if len(chunk_sizes) > 1:
        raise ConversionError(f"stream needs one chunk size for every site, got chunk_frames {chunk_sizes}")


def _check_no_global_mixer(chunk_graph: fx.Graph, data: set, full_nodes: dict) -> None:
    """Refuse attention, softmax, reductions and contractions over a dim whose size differs between
    the chunk and the whole video (a dim of frames)."""
    for node in chunk_graph.nodes:
        mixed = mixing_axes(node) if node in data else []
        full = full_nodes.get(node.name)
        full_mixed = mixing_axes(full) if mixed and full is not None else []
        for (keys, dim), (full_keys, _) in zip(mixed, full_mixed):
            if not all(isinstance(m, fx.Node) for m in (keys, full_keys)):
                continue
            a, b = keys.meta.get("val"), full_keys.meta.get("val")
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
                    _concrete(a.shape)[dim] != _concrete(b.shape)[dim]:
                _refuse_global_mixer(node)


def _is_size_arithmetic(node: fx.Node) -> bool:
    """Nodes whose count varies with the sizes themselves: python arithmetic on sizes, size reads,
    getitems (an unbind along frames has one per frame), the export's checks."""
    target = node.target
    if target is operator.getitem or target in _DROPPED or target in _SHAPE_READERS:
        return True
    module = getattr(target, "__module__", "") or ""
    return not isinstance(target, torch._ops.OpOverload) and (
        module in ("_operator", "operator", "math", "builtins") or "sym" in getattr(target, "__name__", ""))


def pair_nodes(chunk: fx.Graph, full: fx.Graph) -> dict[str, fx.Node]:
    """{chunk node name: whole-video node} for the data nodes of both traces (those that read input
    values): the two must run the same data ops in the same order (sizes aside; a python branch on
    a size would otherwise pair different computations), paired by position; getitems through
    their pair's source; inputs by position. What is computed from shapes and constants alone may
    differ (a table read from a buffer at one length, computed at another):
    :func:`_counterpart` pairs it through the data op that reads it. Raises ConversionError naming
    the first data op where the traces differ."""
    datas = data_nodes(chunk), data_nodes(full)

    def ops(graph, data):
        return [n for n in graph.nodes if n in data and n.op in ("call_function", "call_module")
                and not _is_size_arithmetic(n)]
    a, b = ops(chunk, datas[0]), ops(full, datas[1])
    if [n.target for n in a] != [n.target for n in b]:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x.target != y.target), min(len(a), len(b)))
        where = a[first].name if first < len(a) else b[first].name
        raise ConversionError(f"the chunk and whole-video graphs differ from node {where} on ({len(a)} vs {len(b)} "
                              "ops on input values): the model's code branches on the frame count or on an input "
                              "that counts frames")
    pairs = {n.name: n for n in full.nodes}
    pairs.update({x.name: y for x, y in zip(chunk.find_nodes(op="placeholder"), full.find_nodes(op="placeholder"))})
    pairs.update({x.name: y for x, y in zip(a, b)})
    getitems = {(u.args[0], u.args[1]): u for u in full.nodes if u.target is operator.getitem}
    for node in chunk.nodes:
        if node.target is operator.getitem and node.args[0].name in pairs:
            match = getitems.get((pairs[node.args[0].name], node.args[1]))
            if match is not None:
                pairs[node.name] = match
    return pairs


def _counterpart(node: fx.Node, pairs: dict, data: set) -> fx.Node | None:
    """The whole-video node in the place of chunk node ``node`` (a table): the same argument of the
    paired data op that reads it, else the node of the same name."""
    for user in node.users:
        if user in data and user.name in pairs:
            mine = torch.utils._pytree.tree_leaves((user.args, user.kwargs))
            theirs = torch.utils._pytree.tree_leaves((pairs[user.name].args, pairs[user.name].kwargs))
            if len(mine) == len(theirs) and isinstance(theirs[mine.index(node)], fx.Node):
                return theirs[mine.index(node)]
    return pairs.get(node.name)


def _check_same_sites(chunk: fx.Graph, full: fx.Graph) -> None:
    """The chunk trace must convert the sites the whole-video trace converted, no more, no fewer."""
    calls = [{n.name: HybridCall.from_node(n) for n in g.nodes if is_hybrid_node(n)} for g in (chunk, full)]
    if calls[0].keys() != calls[1].keys():
        extra, missing = sorted(calls[0].keys() - calls[1].keys()), sorted(calls[1].keys() - calls[0].keys())
        raise ConversionError(f"the chunk trace converts other sites than the whole video's (only in the chunk: "
                              f"{extra or 'none'}; only in the whole video: {missing or 'none'}); its layout at a "
                              "chunk's length differs, so the model is not streamed")
    for name, call in calls[0].items():
        whole = calls[1][name]
        fixed = [f for f in ("tokens_per_frame", "chunk_frames", "overlap_frames", "extra_before", "extra_after")
                 if isinstance(getattr(whole, f), int) and getattr(call, f) != getattr(whole, f)]
        if fixed:  # every chunk must carry the whole video's extra tokens and frame size
            raise ConversionError(f"site {name}: the chunk trace lays its tokens out otherwise than the whole video's "
                                  + ", ".join(f"{f} {getattr(call, f)} vs {getattr(whole, f)}" for f in fixed))


def thread_state_matched(chunk_gm: fx.GraphModule, full_gm: fx.GraphModule, chunk_inputs: list,
                         full_inputs: list, *, chunk_frames: int, frames: int,
                         input_dims: list[FrameDim | None], patch: int = 1) -> StepProgram:
    """The step program for exports with fixed shapes: ``chunk_gm`` is the converted graph traced on
    one chunk (``chunk_frames`` token frames), ``full_gm`` on the whole video (``frames``), both
    from the same code, so their nodes pair up (:func:`pair_nodes`: the same ops in the same order).
    It refuses other converted sites or layouts in the chunk trace, and attention, reductions or
    matrix products over frames. Every tensor the chunk graph computes from shapes and
    constants is evaluated in both; where the two differ, the whole-video one becomes a table
    (sliced per chunk when one dim grows with the frames, passed whole otherwise). ``input_dims``:
    how each flat input is chunked (the caller decided it). The program serves chunks of exactly
    ``chunk_frames`` frames."""
    _check_patch(patch)
    for gm in (chunk_gm, full_gm):
        ensure_meta(gm)
    data = data_nodes(chunk_gm.graph)
    _check_sites(chunk_gm.graph)
    _check_same_sites(chunk_gm.graph, full_gm.graph)
    full_nodes = pair_nodes(chunk_gm.graph, full_gm.graph)
    _check_no_global_mixer(chunk_gm.graph, data, full_nodes)
    frontier = _frontier(chunk_gm.graph, data)
    counterparts = [_counterpart(n, full_nodes, data) for n in frontier]
    missing = [n.name for n, c in zip(frontier, counterparts) if c is None]
    if missing:
        raise ConversionError(f"the chunk and whole-video graphs differ (no counterpart of {missing[0]} in the "
                              "whole-video graph); the model's code branches on the frame count")
    with torch.no_grad():
        chunk_vals = _table_module(chunk_gm, frontier)(*chunk_inputs)
        full_vals = _table_module(full_gm, counterparts)(*full_inputs)
    tables, table_dims, full_tables = [], [], []
    for node, full, cv, fv in zip(frontier, counterparts, chunk_vals, full_vals):
        fd = frame_dim_between(cv.shape, fv.shape, chunk_frames, frames)
        if fd is None and torch.equal(cv, fv):
            continue  # the same for every chunk: the step computes it itself
        tables.append(node)
        table_dims.append(fd)
        full_tables.append(full)
    module, sites, leaves = _step_graph(chunk_gm, data, tables, lambda n: False)
    full_leaves = next(iter(full_gm.graph.find_nodes(op="output"))).args[0]
    output_dims = [frame_dim_between(c.meta["val"].shape, f.meta["val"].shape, chunk_frames, frames)
                   if isinstance(c, fx.Node) and isinstance(c.meta.get("val"), torch.Tensor) else None
                   for c, f in zip(leaves, full_leaves)]
    in_spec, out_spec = _pytree_specs(chunk_gm)
    return StepProgram(module=module, table_module=_table_module(full_gm, full_tables),
                       input_dims=[place_extras(d, sites) for d in input_dims],
                       table_dims=[place_extras(d, sites) for d in table_dims],
                       output_dims=[place_extras(d, sites) for d in output_dims], sites=sites, in_spec=in_spec,
                       out_spec=out_spec, patch=patch, table_names=[t.name for t in tables])


__all__ = ["FrameDim", "SiteState", "StepProgram", "data_nodes", "frame_dim_of", "frame_symbols", "hybrid_step",
           "mixing_axes", "pair_nodes", "thread_state", "thread_state_matched"]
