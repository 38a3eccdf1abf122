"""infer_input_frames: which inputs of a fixed-shape graph carry the frame axis, from its dataflow.

A fixed-shape export (``FrameAxis.dynamic`` False) has concrete sizes everywhere, so nothing in it
says which dims grow with the video. This pass reads it from the graph: starting from the token
axis of every converted site (``rehyat::hybrid_attention``: dim 2 of q, k, v, fq, fk, laid out
``extra_before + tokens_per_frame * T + extra_after``), it walks the dataflow backwards and, op by
op, maps "this dim holds the frames" onto the op's inputs (a reshape splits or merges it, a
permute moves it, a ``cat`` hands the video piece its frames and the text piece none, a patch
embedding's convolution scales the frames per entry by its stride, a broadcast stops it). What
reaches a placeholder is that input's :class:`FrameDim`; an input it never reaches does not depend
on the frame axis (text, timesteps shared by every frame, fixed-size history latents).

Where the walk cannot map the frames through an op (a frame axis spread over two dims, a
reduction over frames, an op it does not know), the inputs above that op get no role; the result
names them with the op (``unknown``) and ``rc.stream`` refuses before it runs. Model constants
(buffers, parameters) the walk reaches keep their role as a hint (``constants``): a learned table
whose size is the example's frame count is why such a model runs at that length only.

Sizes are in the graph's ``meta["val"]``; ``frames`` is the call's token frame count (taken from
the sites). Python ints of the call (``num_frames``, ``seq_len``) are baked into such graphs; their
role is decided by the caller with chunk traces (``rehyat_compile/stream.py``).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from ..attention_spellings import SDPA_FAMILIES, SdpaCall, bound_arguments, spelling_of
from ..op import HybridCall, is_hybrid_node
from .thread_state import FrameDim, ensure_meta

aten = torch.ops.aten


@dataclass(frozen=True)
class Frames:
    """Frames on ``dim`` of a value: its entries along ``dim`` are ``extra_before`` entries, then
    ``outer`` repeats of [T frames of ``per_frame`` entries], then ``extra_after`` entries (``outer``
    > 1 when a batch-like dim was merged in front of the frames, e.g. ``[B*T, HW, C]``)."""

    dim: int
    per_frame: int
    outer: int = 1
    extra_before: int = 0
    extra_after: int = 0

    def __post_init__(self):
        # a data-dependent count of entries behind the frames is kept as None: the frames sit at
        # extra_before + [0, per_frame * T) whatever follows them
        for name in ("extra_before", "extra_after"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int):
                value = sympy.sympify(value)
                object.__setattr__(self, name, int(value) if value.is_number else None)

    def moved(self, dim: int) -> "Frames":
        return Frames(dim, self.per_frame, self.outer, self.extra_before, self.extra_after)

    @property
    def plain(self) -> bool:
        return self.outer == 1 and not self.extra_before and not self.extra_after


@dataclass(frozen=True)
class InputFrames:
    """The pass's result: ``dims`` one :class:`FrameDim` or None per placeholder (graph order);
    ``unknown`` (placeholder name, why) for inputs whose role the walk could not derive;
    ``constants`` (attribute target, Frames) for model constants the frame axis reaches."""

    names: tuple[str, ...]
    dims: tuple[FrameDim | None, ...]
    unknown: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, Frames], ...]

    def dim_of(self, name: str) -> FrameDim | None:
        return self.dims[self.names.index(name)]


class _Opaque(Exception):
    """The frames cannot be mapped through this op onto its inputs."""


class _Walk:
    """What one walk reads besides the graph: the call's token ``frames`` and ``sizes`` (values of
    the graph's size symbols at this call, for a graph exported with the frame count symbolic)."""

    def __init__(self, frames: int, sizes: dict | None = None):
        self.frames, self.sizes = frames, dict(sizes or {})

    def shape(self, value) -> tuple | None:
        """A node's (or value's) sizes: ints; sympy expressions where a size is data-dependent (an
        unmasked text length)."""
        val = value.meta.get("val") if isinstance(value, fx.Node) else value
        if isinstance(val, torch.Tensor):
            return tuple(x if isinstance(x, int) else self._size(x.node.expr) for x in val.shape)
        return None

    def _size(self, expr):
        if self.sizes and expr.free_symbols & self.sizes.keys():
            expr = expr.subs(self.sizes)
        return int(expr) if expr.is_number else expr


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ---------------------------------------------------------------------------------------------
# Reshapes: frames in a mixed-radix digit of a group of merged / split dims
# ---------------------------------------------------------------------------------------------

def _groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair dims of ``a`` and ``b`` (same numel) into minimal groups of equal products, size-1 dims
    left out (they carry no frames)."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        ga, gb, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    raise _Opaque("reshape groups do not close")
                ga.append(ia[i]); pa *= a[ia[i]]; i += 1
            else:
                if j >= len(ib):
                    raise _Opaque("reshape groups do not close")
                gb.append(ib[j]); pb *= b[ib[j]]; j += 1
        groups.append((ga, gb))
    return groups


def _same_dim(dim: int, out_shape, in_shape) -> int | None:
    """The input dim that ``dim`` of a reshape's output is unchanged from (same size, same element
    count in front of it), or None."""
    prefix = sympy.sympify(math.prod(out_shape[:dim]))
    for j, size in enumerate(in_shape):
        if sympy.sympify(size - out_shape[dim]) == 0 and sympy.sympify(math.prod(in_shape[:j]) - prefix) == 0:
            return j
    return None


def _through_reshape(fr: Frames, out_shape, in_shape, frames: int) -> Frames:
    """The input's Frames for a reshape of ``in_shape`` to ``out_shape`` whose output has ``fr``."""
    kept = _same_dim(fr.dim, out_shape, in_shape)
    if kept is not None:
        return fr.moved(kept)
    if not all(isinstance(x, int) for x in (*out_shape, *in_shape)):
        raise _Opaque("a reshape of data-dependent size")
    if math.prod(out_shape) != math.prod(in_shape):
        raise _Opaque("reshape changes the element count")
    for ga, gb in _groups(in_shape, out_shape):
        if fr.dim not in gb:
            continue
        if len(ga) == 1 and len(gb) == 1:
            return fr.moved(ga[0])
        if fr.extra_before or fr.extra_after:
            raise _Opaque("extra tokens inside a merged or split dim")
        pos = gb.index(fr.dim)
        inner = fr.per_frame * math.prod(out_shape[d] for d in gb[pos + 1:])
        outer = fr.outer * math.prod(out_shape[d] for d in gb[:pos])
        for k, d in enumerate(ga):
            after = math.prod(in_shape[e] for e in ga[k + 1:])
            before = math.prod(in_shape[e] for e in ga[:k])
            if inner % after or outer % before:
                continue
            per, out = inner // after, outer // before
            if in_shape[d] == out * frames * per:
                return Frames(d, per, out)
        raise _Opaque("the frames are spread over several dims")
    raise _Opaque("size-1 frame dim")


# ---------------------------------------------------------------------------------------------
# Rules: (node, Frames of its output[s], the walk) -> {input node: Frames}
# ---------------------------------------------------------------------------------------------

def _broadcast(node: fx.Node, fr: Frames, tensors, w: _Walk, out_shape=None) -> dict:
    """Pointwise ops: each tensor input broadcast to the output (``out_shape``, default the node's);
    a size-1 (or missing) dim is shared by every frame, any other size than the output's is opaque."""
    out_shape = w.shape(node) if out_shape is None else out_shape
    rank = len(out_shape)
    found = {}
    for t in tensors:
        shape = w.shape(t)
        if shape is None:
            continue
        d = fr.dim - (rank - len(shape))
        if d < 0 or shape[d] == 1:
            continue
        if shape[d] != out_shape[fr.dim]:
            raise _Opaque("broadcast of a frame dim")
        found[t] = fr.moved(d)
    return found


def _tensor_args(node: fx.Node, w: _Walk) -> list[fx.Node]:
    flat = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
    return [a for a in flat if isinstance(a, fx.Node) and w.shape(a) is not None]


def _rule_permute(node, fr, w):
    x, dims = node.args[0], node.args[1]
    rank = len(w.shape(x))
    return {x: fr.moved(_norm_dim(dims[fr.dim], rank))}


def _rule_transpose(node, fr, w):
    x, (a, b) = node.args[0], (node.args[1:3] if len(node.args) == 3 else (0, 1))  # aten.t: dims 0, 1
    rank = len(w.shape(x))
    a, b = _norm_dim(a, rank), _norm_dim(b, rank)
    return {x: fr.moved(b if fr.dim == a else a if fr.dim == b else fr.dim)}


def _rule_reshape_like(node, fr, w):
    x = node.args[0]
    return {x: _through_reshape(fr, w.shape(node), w.shape(x), w.frames)}


def _rule_expand(node, fr, w):
    x = node.args[0]
    shape, out = w.shape(x), w.shape(node)
    d = fr.dim - (len(out) - len(shape))
    if d < 0 or shape[d] == 1:
        return {}
    return {x: fr.moved(d)}


def _rule_slice(node, fr, w):
    x = node.args[0]
    shape = w.shape(x)
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(shape))
    if dim != fr.dim:
        return {x: fr}
    size = shape[dim]
    start = _index(_arg(node, 2, "start"), size, 0)
    end = _index(_arg(node, 3, "end"), size, size)
    if _arg(node, 4, "step") not in (None, 1) or fr.outer != 1:
        raise _Opaque("strided slice of the frame dim")
    return {x: Frames(dim, fr.per_frame, 1, _plus(fr.extra_before, start), _plus(fr.extra_after, size - end))}


def _plus(count, more):
    """count + more, None (data-dependent) when either is."""
    return None if count is None or more is None else count + more


def _arg(node, index, name):
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    if isinstance(value, fx.Node):  # a size computed in the graph
        value = value.meta.get("val")
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _index(i, size, default):
    """A slice bound in [0, size]; negative bounds count from the end (sizes may be expressions)."""
    if i is None:
        return default
    if _le(i, 0) and sympy.sympify(i) != 0:
        i = i + size
    if _le(size, i):
        return size
    return 0 if _le(i, 0) else i


def _rule_select(node, fr, w):
    x, dim = node.args[0], _norm_dim(node.args[1], len(w.shape(node.args[0])))
    return {x: fr.moved(fr.dim + (fr.dim >= dim))}


def _rule_unsqueeze(node, fr, w):
    x, dim = node.args[0], _norm_dim(node.args[1], len(w.shape(node)))
    if fr.dim == dim:
        raise _Opaque("frames on an inserted dim")
    return {x: fr.moved(fr.dim - (fr.dim > dim))}


def _pieces(fr: Frames, sizes: list, owners: list, frames: int) -> dict:
    """Frames of each concatenated piece (or split piece) along the frame dim: ``sizes`` in order."""
    if fr.outer != 1:
        raise _Opaque("concatenation along a merged frame dim")
    video = (fr.extra_before, fr.extra_before + fr.per_frame * frames)
    found, offset = {}, 0
    for owner, size in zip(owners, sizes):
        lo, hi = offset, offset + size
        offset = hi
        if _le(hi, video[0]) or _le(video[1], lo):
            continue  # an extra piece: text, registers, history
        if not (_le(lo, video[0]) or _le(video[0], lo)) or not (_le(hi, video[1]) or _le(video[1], hi)):
            raise _Opaque("a concatenated piece of data-dependent size beside the frames")
        start, stop = (video[0] if _le(lo, video[0]) else lo), (video[1] if _le(video[1], hi) else hi)
        if _not_multiple(start - video[0], fr.per_frame) or _not_multiple(stop - video[0], fr.per_frame):
            raise _Opaque("a concatenated piece starts or ends inside a frame")
        found[owner] = Frames(fr.dim, fr.per_frame, 1, start - lo, hi - stop)
    return found


def _le(a, b) -> bool:
    """a <= b for sizes that may be sympy expressions in data-dependent sizes (each >= 0); False
    when it cannot be decided."""
    diff = sympy.sympify(b - a)
    if diff.is_number:
        return bool(diff >= 0)
    positive = {s: sympy.Symbol(s.name, nonnegative=True, integer=True) for s in diff.free_symbols}
    return bool(diff.subs(positive).is_nonnegative)


def _not_multiple(size, per_frame: int) -> bool:
    size = sympy.sympify(size)
    return not (size.is_number and int(size) % per_frame == 0)


def _rule_cat(node, fr, w):
    tensors = [t for t in node.args[0] if w.shape(t) is not None and w.shape(t) != (0,)]
    rank = len(w.shape(node))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
    if dim != fr.dim:
        return {t: fr for t in tensors}
    return _pieces(fr, [w.shape(t)[dim] for t in tensors], tensors, w.frames)


def _rule_stack(node, fr, w):
    tensors = node.args[0]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(w.shape(node)))
    if fr.dim == dim:
        raise _Opaque("frames on a stacked dim")
    return {t: fr.moved(fr.dim - (fr.dim > dim)) for t in tensors}


def _rule_matmul(node, fr, w):
    """mm / bmm / matmul / linear / addmm / baddbmm: rows and batch dims from the left operand,
    columns from the right (weights: not inputs)."""
    target = node.target
    if target in (aten.linear.default,):
        x = node.args[0]
        if fr.dim == len(w.shape(node)) - 1:  # the output features come from the weight
            return {}
        return {x: fr}
    if target in (aten.addmm.default, aten.baddbmm.default):
        bias, a, b = node.args[0], node.args[1], node.args[2]
        found = _broadcast(node, fr, [bias], w)
    else:
        a, b = node.args[0], node.args[1]
        found = {}
    out_rank = len(w.shape(node))
    sa, sb = w.shape(a), w.shape(b)
    if fr.dim == out_rank - 1:
        found[b] = fr.moved(len(sb) - 1)
    elif fr.dim == out_rank - 2:
        found[a] = fr.moved(len(sa) - 2)
    else:  # a batch dim, broadcast from both
        for t, s in ((a, sa), (b, sb)):
            d = fr.dim - (out_rank - len(s))
            if d >= 0 and s[d] != 1:
                found[t] = fr.moved(d)
    return found


def _rule_conv(node, fr, w):
    """Convolutions (patch embeddings): a spatial frame dim maps through a kernel equal to its
    stride, no padding; the batch dim passes."""
    a = bound_arguments(node)
    x, weight = a["input"], a["weight"]
    if fr.dim == 0:
        return {x: fr}
    if fr.dim == 1:
        return {}
    k = fr.dim - 2
    kernel = w.shape(weight)[2 + k]
    stride, padding, dilation = (_per_dim(a.get(name, default), k) for name, default in
                                 (("stride", 1), ("padding", 0), ("dilation", 1)))
    if a.get("transposed"):
        raise _Opaque("transposed convolution over frames")
    if kernel != stride or padding or dilation != 1 or not fr.plain:
        raise _Opaque("a convolution that mixes neighbouring frames")
    return {x: Frames(fr.dim, fr.per_frame * stride)}


def _per_dim(value, k):
    if isinstance(value, str):
        raise _Opaque(f"padding={value!r} over frames")
    if isinstance(value, (list, tuple)):
        return value[k] if len(value) > k else value[0]
    return value


def _rule_reduce(node, fr, w):
    x = node.args[0]
    rank = len(w.shape(x))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(_norm_dim(d, rank) for d in dims)
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if keep:
        if fr.dim in dims:
            raise _Opaque("a reduction over frames")
        return {x: fr}
    kept = [d for d in range(rank) if d not in dims]
    return {x: fr.moved(kept[fr.dim])}


def _rule_norm(node, fr, w):
    """layer_norm / rms_norm over the trailing ``normalized_shape`` dims."""
    x = node.args[0]
    normalized = len(node.args[1])
    if fr.dim >= len(w.shape(x)) - normalized:
        raise _Opaque("a normalisation over frames")
    return {x: fr}


def _rule_group_norm(node, fr, w):
    x = node.args[0]
    if fr.dim != 0:
        raise _Opaque("a group normalisation over frames")
    return {x: fr}


def _rule_softmax(node, fr, w):
    x = node.args[0]
    if _norm_dim(node.args[1], len(w.shape(x))) == fr.dim:
        raise _Opaque("a softmax over frames")
    return {x: fr}


def _rule_index_select(node, fr, w):
    x, dim, index = node.args[0], node.args[1], node.args[2]
    dim = _norm_dim(dim, len(w.shape(x)))
    if fr.dim == dim:
        return {index: fr.moved(0)}
    return {x: fr}


def _rule_embedding(node, fr, w):
    indices = node.args[1]
    if fr.dim == len(w.shape(node)) - 1:  # the embedding's features come from its table
        return {}
    return {indices: fr}


def _rule_index(node, fr, w):
    """``x[idx0, idx1, ...]`` (aten.index.Tensor) with the index tensors leading and adjacent: the
    output's leading dims are the broadcast index shape, then x's remaining dims."""
    x, indices = node.args[0], node.args[1]
    lead = 0
    while lead < len(indices) and indices[lead] is None:
        lead += 1
    used = [i for i in indices if i is not None]
    if any(i is None for i in indices[lead:]):
        raise _Opaque("non-adjacent advanced indexing")
    index_rank = max(len(w.shape(i)) for i in used)
    if fr.dim < lead:
        return {x: fr}
    if fr.dim < lead + index_rank:
        found = {}
        for i in used:
            d = fr.dim - lead - (index_rank - len(w.shape(i)))
            if d >= 0 and w.shape(i)[d] != 1:
                found[i] = fr.moved(d)
        return found
    return {x: fr.moved(fr.dim - index_rank + len(used))}


def _rule_repeat_interleave(node, fr, w):
    """Entry j*r + i of the output is entry j of x: frames made by the repeat leave x shared by every
    frame; frames over whole repeats come from x with fewer entries per frame."""
    x = node.args[0]
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(x, fx.Node) or w.shape(x) is None or not isinstance(repeats, int) or dim is None:
        raise _Opaque("repeat_interleave with tensor repeats or flattening")
    if _norm_dim(dim, len(w.shape(x))) != fr.dim:
        return {x: fr}
    if not fr.plain and (fr.extra_before or fr.extra_after):
        raise _Opaque("repeat_interleave of extra tokens")
    span = w.frames * fr.per_frame
    if repeats % span == 0 and fr.outer == w.shape(x)[fr.dim] * repeats // span:
        return {}
    if fr.per_frame % repeats == 0:
        return {x: Frames(fr.dim, fr.per_frame // repeats, fr.outer)}
    raise _Opaque("repeat_interleave that splits a frame")


def _rule_repeat(node, fr, w):
    """Entry k*n + j of the output is entry j of x (n = x's size): x holding whole frame spans keeps
    them; an x shorter than one frame is shared by every frame."""
    x, reps = node.args[0], node.args[1]
    lead = len(reps) - len(w.shape(x))
    if fr.dim < lead:
        return {}
    d = fr.dim - lead
    if reps[fr.dim] == 1:
        return {x: fr.moved(d)}
    if fr.extra_before or fr.extra_after:
        raise _Opaque("repeat of extra tokens")
    size, span = w.shape(x)[d], w.frames * fr.per_frame
    if size % span == 0:
        return {x: Frames(d, fr.per_frame, size // span)}
    if fr.per_frame % size == 0:
        return {}
    raise _Opaque("repeat that splits a frame")


def _rule_reorder(node, fr, w):
    """flip / roll: fine along other dims; along the frames a chunk would read other frames."""
    x = node.args[0]
    dims = node.args[1] if node.target is aten.flip.default else (node.args[2] if len(node.args) > 2 else None)
    dims = list(range(len(w.shape(x)))) if dims is None else [dims] if isinstance(dims, int) else dims
    if fr.dim in [_norm_dim(d, len(w.shape(x))) for d in dims]:
        raise _Opaque("the frames are reordered")
    return {x: fr}


def _rule_view_as_real(node, fr, w):
    x = node.args[0]
    if fr.dim == len(w.shape(node)) - 1:
        raise _Opaque("frames on the real/imaginary dim")
    return {x: fr}


def _rule_view_as_complex(node, fr, w):
    return {node.args[0]: fr}


def _rule_pad(node, fr, w):
    x, pad = node.args[0], node.args[1]
    rank = len(w.shape(x))
    k = rank - 1 - fr.dim  # pad pairs run from the last dim backwards
    if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
        if fr.outer != 1 or fr.extra_after is None or pad[2 * k] > fr.extra_before or pad[2 * k + 1] > fr.extra_after:
            raise _Opaque("padding of the frame dim")
        return {x: Frames(fr.dim, fr.per_frame, 1, fr.extra_before - pad[2 * k], fr.extra_after - pad[2 * k + 1])}
    return {x: fr}


def _rule_attention(node, fr, w):
    """Attention left as softmax (text cross-attention) or converted: query rows keep the frames;
    a converted site's keys and values are seeds of their own."""
    if is_hybrid_node(node):
        call = HybridCall.from_node(node)
        return {call.q: fr, call.fq: fr}
    spelling = spelling_of(node)
    if spelling is None or spelling.family not in SDPA_FAMILIES:
        raise _Opaque("an attention spelling without query rows")
    return {SdpaCall.from_node(node).q: fr}


def _rule_split(node, frs: dict, w):
    """split / split_with_sizes / chunk / unbind: each piece read through getitem."""
    x = node.args[0]
    shape = w.shape(x)
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(shape))
    if node.target is aten.unbind.int:
        dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(shape))
        return _merge_all([{x: fr.moved(fr.dim + (fr.dim >= dim))} for fr in frs.values()])
    values = node.meta["val"]
    sizes = [int(v.shape[dim]) for v in values]
    found = []
    for index, fr in frs.items():
        if fr.dim != dim:
            found.append({x: fr})
            continue
        offset = sum(sizes[:index])
        if fr.outer != 1:
            raise _Opaque("split along a merged frame dim")
        found.append({x: Frames(dim, fr.per_frame, 1, _plus(fr.extra_before, offset),
                                _plus(fr.extra_after, shape[dim] - offset - sizes[index]))})
    return _merge_all(found)


def _merge_all(maps: list[dict]) -> dict:
    out: dict = {}
    for m in maps:
        for k, v in m.items():
            if k in out and out[k] != v:
                raise _Opaque("two different frame layouts of one value")
            out[k] = v
    return out


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.contiguous.default}
_MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.linear.default, aten.addmm.default,
            aten.baddbmm.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.sum.default,
               aten.mean.default, aten.linalg_vector_norm.default, aten.var.correction, aten.std.correction}
_RULES = {
    aten.permute.default: _rule_permute,
    aten.transpose.int: _rule_transpose,
    aten.t.default: _rule_transpose,
    aten.expand.default: _rule_expand,
    aten.expand_as.default: _rule_expand,
    aten.slice.Tensor: _rule_slice,
    aten.select.int: _rule_select,
    aten.unsqueeze.default: _rule_unsqueeze,
    aten.cat.default: _rule_cat,
    aten.concat.default: _rule_cat,
    aten.stack.default: _rule_stack,
    aten.convolution.default: _rule_conv,
    aten.conv1d.default: _rule_conv,
    aten.conv2d.default: _rule_conv,
    aten.conv3d.default: _rule_conv,
    aten.layer_norm.default: _rule_norm,
    aten.native_layer_norm.default: _rule_norm,
    aten.rms_norm.default: _rule_norm,
    aten.group_norm.default: _rule_group_norm,
    aten.native_group_norm.default: _rule_group_norm,
    aten._softmax.default: _rule_softmax,
    aten.softmax.int: _rule_softmax,
    aten.log_softmax.int: _rule_softmax,
    aten.index_select.default: _rule_index_select,
    aten.embedding.default: _rule_embedding,
    aten.index.Tensor: _rule_index,
    aten.repeat_interleave.self_int: _rule_repeat_interleave,
    aten.repeat_interleave.self_Tensor: _rule_repeat_interleave,
    aten.repeat.default: _rule_repeat,
    aten.constant_pad_nd.default: _rule_pad,
    aten.view_as_real.default: _rule_view_as_real,
    aten.flip.default: _rule_reorder,
    aten.roll.default: _rule_reorder,
    aten.view_as_complex.default: _rule_view_as_complex,
    aten.pad.default: _rule_pad,
}
_RULES.update({t: _rule_reshape_like for t in _RESHAPES})
_RULES.update({t: _rule_matmul for t in _MATMULS})
_RULES.update({t: _rule_reduce for t in _REDUCTIONS})
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
           aten.tensor_split.sections}
_FACTORIES = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default,
              aten.ones.default, aten.full.default, aten.empty.memory_format, aten.linspace.default,
              aten.scalar_tensor.default}


def _backward(node: fx.Node, outs: dict, w: _Walk) -> dict:
    """{input node: Frames} for a node whose output(s) hold the frames as ``outs`` ({index: Frames}).
    Raises _Opaque when the op's rule cannot map them."""
    target = node.target
    if target in _SPLITS:
        return _rule_split(node, outs, w)
    if isinstance(node.meta.get("val"), (tuple, list)) and not isinstance(target, torch._ops.OpOverload):
        return _merge_all([_fallback(node, fr, w, node.meta["val"][i]) for i, fr in outs.items()])
    if len(outs) != 1:
        raise _Opaque("several outputs")
    (index, fr), = outs.items()
    if index and target not in (aten.native_layer_norm.default, aten.native_group_norm.default):
        raise _Opaque(f"output {index}")
    if target in _FACTORIES:
        return {}
    if is_hybrid_node(node) or _is_attention(node):
        return _rule_attention(node, fr, w)
    if target is aten.narrow.default:
        x, dim, start, length = node.args[:4]
        return _rule_slice(_SliceView(node, x, dim, start, start + length), fr, w)
    rule = _RULES.get(target)
    if rule is not None:
        return rule(node, fr, w)
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return _broadcast(node, fr, _tensor_args(node, w), w)
    return _fallback(node, fr, w)


class _SliceView:
    """A narrow read as a slice (same rule)."""

    def __init__(self, node, x, dim, start, end):
        self.args, self.kwargs, self.meta = (x, dim, start, end, 1), {}, node.meta


def _is_attention(node: fx.Node) -> bool:
    spelling = spelling_of(node)
    return spelling is not None and spelling.family in SDPA_FAMILIES


def _fallback(node: fx.Node, fr: Frames, w: _Walk, value=None) -> dict:
    """Ops without a rule (type casts, clones, the rewrite's helpers; ``value``: the output when the
    node returns several): one tensor input of the same element count is read as a reshape; else each
    tensor input aligned to the output from the right keeps the frames where its size there equals
    the output's, and is shared by every frame where it is 1; any other size is opaque."""
    out_shape = w.shape(node if value is None else value)
    tensors = _tensor_args(node, w)
    if out_shape is None or not tensors:
        raise _Opaque("no tensor output")
    if len(tensors) == 1 and value is None and w.shape(tensors[0]) != out_shape \
            and math.prod(w.shape(tensors[0])) == math.prod(out_shape):
        return {tensors[0]: _through_reshape(fr, out_shape, w.shape(tensors[0]), w.frames)}
    return _broadcast(node, fr, tensors, w, out_shape)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------

def _is_getitem(node: fx.Node) -> bool:
    """``operator.getitem`` or a helper of the same meaning: an int index into a tuple-valued node."""
    if node.target is operator.getitem:
        return True
    args = node.args
    return (len(args) == 2 and not node.kwargs and isinstance(args[0], fx.Node) and isinstance(args[1], int)
            and isinstance(args[0].meta.get("val"), (tuple, list)))


def _site_frames(graph: fx.Graph, w: _Walk) -> set[int]:
    """Token frame counts of the converted sites whose extra token counts are fixed."""
    counts = set()
    for node in graph.nodes:
        if is_hybrid_node(node):
            call = HybridCall.from_node(node)
            shape = w.shape(call.q)
            if shape and all(isinstance(x, int) for x in (shape[2], call.extra_before, call.extra_after)):
                counts.add((shape[2] - call.extra_before - call.extra_after) // call.tokens_per_frame)
    return counts


def _seeds(graph: fx.Graph, w: _Walk) -> dict:
    """Frames of every converted site's q, k, v, fq, fk (extra tokens counted in the graph are the
    rest of the sequence)."""
    seeds = {}
    for node in graph.nodes:
        if not is_hybrid_node(node):
            continue
        call = HybridCall.from_node(node)
        shape = w.shape(call.q)
        if shape is None or not isinstance(call.extra_before, int):
            continue
        after = call.extra_after if isinstance(call.extra_after, int) else \
            shape[2] - call.extra_before - call.tokens_per_frame * w.frames
        fr = Frames(2, call.tokens_per_frame, 1, call.extra_before, after)
        for t in (call.q, call.k, call.v, call.fq, call.fk):
            seeds.setdefault(t, set()).add(fr)
    return seeds


def infer_input_frames(gm: fx.GraphModule, frames: int | None = None, sizes: dict | None = None) -> InputFrames:
    """Each placeholder's frame dim (:class:`FrameDim` in token frames) in a fixed-shape converted
    graph; ``frames``: the call's token frames (default: read from the sites); ``sizes``: values of
    the graph's size symbols at this call (a graph exported with the frame count symbolic but used
    at one length, as with a fixed-size control video). See the module docstring."""
    ensure_meta(gm)  # the rewrite's helper nodes get their fake values
    w = _Walk(frames, sizes)
    if frames is None:
        counts = _site_frames(gm.graph, w)
        if len(counts) != 1:
            raise ValueError(f"infer_input_frames: pass frames=; the converted sites give {sorted(counts) or 'none'}")
        w.frames = counts.pop()
    seeds = _seeds(gm.graph, w)
    need: dict[fx.Node, dict[int, set]] = {}
    for t, frs in seeds.items():
        need.setdefault(t, {}).setdefault(0, set()).update(frs)
    opaque: dict[fx.Node, str] = {}
    for node in reversed(list(gm.graph.nodes)):
        outs = need.get(node)
        if not outs or node.op != "call_function":
            continue
        if _is_getitem(node):
            src, index = node.args
            for fr in outs.get(0, ()):
                need.setdefault(src, {}).setdefault(index, set()).add(fr)
            continue
        if any(len(frs) > 1 for frs in outs.values()):
            opaque[node] = "two different frame layouts of one value"
            continue
        try:
            found = _backward(node, {i: next(iter(frs)) for i, frs in outs.items()}, w)
        except _Opaque as why:
            opaque[node] = str(why)
            continue
        except (TypeError, IndexError, KeyError, AttributeError, RuntimeError) as exc:  # unexpected form, data-dependent size
            opaque[node] = f"{type(exc).__name__} reading its arguments"
            continue
        for src, fr in found.items():
            if isinstance(src, fx.Node):
                need.setdefault(src, {}).setdefault(0, set()).add(fr)
    return _result(gm, need, opaque)


def _result(gm: fx.GraphModule, need: dict, opaque: dict) -> InputFrames:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    blocked = _upstream_tensor_placeholders(opaque)
    names, dims, unknown = [], [], []
    for ph in placeholders:
        names.append(ph.name)
        frs = need.get(ph, {}).get(0, set())
        fr = next(iter(frs)) if len(frs) == 1 else None
        if ph in blocked:  # part of what it feeds cannot be followed: a chunk of it may be wrong
            op, why = blocked[ph]
            unknown.append((ph.name, f"node {op.name} ({_target_name(op)}), which it reaches: {why}"))
        elif len(frs) > 1:
            unknown.append((ph.name, "its frames reach the sites in two different layouts: "
                            + ", ".join(sorted(_describe(f) for f in frs))))
        elif fr is not None and fr.outer != 1:
            unknown.append((ph.name, f"its frames are interleaved with {fr.outer} entries of another dim"))
        elif fr is not None and (fr.extra_before is None or fr.extra_after is None):
            unknown.append((ph.name, "the count of its entries beside the frames depends on data"))
        ok = fr is not None and not (unknown and unknown[-1][0] == ph.name)
        dims.append(FrameDim(fr.dim, fr.per_frame, fr.extra_before, fr.extra_after) if ok else None)
    constants = tuple((n.target, next(iter(need[n][0]))) for n in gm.graph.find_nodes(op="get_attr")
                      if need.get(n, {}).get(0))
    return InputFrames(tuple(names), tuple(dims), tuple(unknown), constants)


def _upstream_tensor_placeholders(opaque: dict) -> dict:
    """{tensor placeholder: (opaque node, why)} for placeholders feeding an opaque node's tensors."""
    out: dict = {}
    for node, why in opaque.items():
        stack, seen = list(node.all_input_nodes), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                out.setdefault(n, (node, why))
            stack.extend(a for a in n.all_input_nodes)
    return out


def _describe(fr: Frames) -> str:
    return f"dim {fr.dim} ({fr.per_frame} per frame, {fr.extra_before} before, {fr.extra_after} after)"


def _target_name(node: fx.Node) -> str:
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


__all__ = ["Frames", "InputFrames", "infer_input_frames"]
