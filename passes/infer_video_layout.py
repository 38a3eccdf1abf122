"""Where the video sits in an attention's token axis: N = extra_before + T*M + extra_after.

Symbolic export: N is a sympy expression in the input frame symbol ``s`` (token frames
T = s / patch); evaluating N at T = 2, 3, 4 gives M = N(3) - N(2) (checked against N(4) - N(3)) and
the extra count E = N(2) - 2M, which may itself be symbolic (data-dependent text length, Mochi).
Static export: T and M come from the user's ``video_shape=(frames, h, w)``, else T from the input
and M from the concatenation below. The video offset (extra_before) is read off the ``aten.cat`` that
builds the sequence: walking up from q, the nearest cat whose output is N long on its cat dim and
has one piece of T*M tokens; the pieces before it are extra_before. The layout is declined with a
reason when any of this does not hold (never guessed). :func:`layout_site` is the pipeline's
"layout" pass on one site: the layout, then the frame-major check.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from functools import lru_cache

import sympy
import torch
from torch import fx

from ..attention_spellings import spelling_of
from ..declines import Decline, describe_size
from ..site import Site
from .canonicalize import SAME_VALUE
from .classify_attention import as_expr

aten = torch.ops.aten


@dataclass(frozen=True)
class VideoLayout:
    """tokens_per_frame M; frames T of the example input; extra_before (the video offset);
    extra_after: an int, or None when it depends on data (computed in the graph as N - offset - T*M)."""

    tokens_per_frame: int
    frames: int
    extra_before: int
    extra_after: int | None


T = sympy.Symbol("t", integer=True, positive=True)  # token frames after the temporal patch


@lru_cache(maxsize=65536)
def _simplified(expr: sympy.Expr) -> sympy.Expr:
    return expr if expr.is_Integer else sympy.simplify(expr)


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    """a == b as sizes (cached simplify; integers compared directly)."""
    if a.is_Integer and b.is_Integer:
        return a == b
    return _simplified(a - b) == 0


@lru_cache(maxsize=64)
def _normaliser(symbol, patch: int):
    """Size expression in input frames ``symbol`` -> in token frames ``T`` (cached per expression)."""
    if symbol is None:
        return lambda e: e

    @lru_cache(maxsize=65536)
    def norm(e):
        return e if e.is_Integer else _simplified(e.subs(symbol, patch * T))
    return norm


def _cat_pieces(node: fx.Node, n, norm):
    """(pieces, sizes) if ``node`` is an ``aten.cat`` whose output is ``n`` long on its cat dim."""
    if node.op != "call_function" or node.target != aten.cat.default:
        return None
    pieces = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or len(pieces) < 2:
        return None
    dim %= val.dim()
    if not _same(norm(as_expr(val.shape[dim])), n):
        return None
    return pieces, [norm(as_expr(p.meta["val"].shape[dim])) for p in pieces]


def _ancestors(node: fx.Node, limit: int):
    """Nodes above ``node``, nearest first (breadth-first, at most ``limit``)."""
    seen, queue, order = {node}, deque([node]), []
    while queue and len(order) < limit:
        current = queue.popleft()
        order.append(current)
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return order


def _find_video_offset(q: fx.Node, n, is_video, norm=lambda e: e, limit: int = 400, depth: int = 6):
    """Offset of the video piece inside the concatenation(s) that build the n-token sequence above q.

    The nearest ``aten.cat`` with an n-long output is taken; when no piece is the video itself, the
    pieces are searched the same way (history + video packed first, then joined with text: Framepack).
    Returns the offset (sympy) or None."""
    for node in _ancestors(q, limit):
        found = _cat_pieces(node, n, norm)
        if found is None:
            continue
        pieces, sizes = found
        offset = sympy.Integer(0)
        for piece, size in zip(pieces, sizes):
            if is_video(size):
                return offset
            if depth > 1:
                inner = _find_video_offset(piece, size, is_video, norm, limit, depth - 1)
                if inner is not None:
                    return offset + inner
            offset = offset + size
        return None
    return None


def _words(size) -> str:
    """A size in token frames ``T`` (or a number) in words."""
    return describe_size(size, (T,))


def _offset(q: fx.Node, n, video_tokens, extra, norm=lambda e: e) -> tuple[int | None, Decline | None]:
    """(extra_before, None), or (None, decline)."""
    if extra == 0:
        return 0, None

    def is_video(size):
        return _same(size, video_tokens)

    before = _find_video_offset(q, n, is_video, norm)
    if before is None:
        return None, Decline("layout-unknown", f"cannot locate the {_words(video_tokens)} of video among the "
                             f"{_words(n)}: no concatenation builds the sequence (pass video_shape=(frames, h, w) "
                             "or check the model)")
    before = sympy.simplify(before)
    if not before.is_Integer:
        return None, Decline("layout-unknown", f"the tokens before the video ({_words(before)}) vary with the input; "
                             "only a fixed offset is supported")
    return int(before), None


def _symbolic_layout(q: fx.Node, n, symbol, patch: int, frames: int, video_shape):
    t, norm = T, _normaliser(symbol, patch)
    values = [sympy.simplify(n.subs(symbol, patch * k)) for k in (2, 3, 4)]
    m = sympy.simplify(values[1] - values[0])
    if not m.is_Integer or sympy.simplify(values[2] - values[1] - m) != 0 or m <= 0:
        return None, Decline("layout-unknown", f"sequence length {describe_size(n, symbol, patch)} is not "
                             "M * frames + extra in the frames")
    m = int(m)
    extra = sympy.simplify(values[0] - 2 * m)
    if video_shape is not None and (video_shape[0] != frames or video_shape[1] * video_shape[2] != m):
        return None, Decline("layout-unknown", f"video_shape={tuple(video_shape)} disagrees with the exported "
                             f"graph: {frames} frames of {m} tokens (sequence {describe_size(n, symbol, patch)})")
    before, reason = _offset(q, norm(n), m * t, extra, norm)
    if reason:
        return None, reason
    after = sympy.simplify(extra - before)
    if after.is_Integer and after < 0:
        return None, Decline("layout-unknown", f"video offset {before} exceeds the {_words(extra)} of extras")
    return VideoLayout(m, frames, before, int(after) if after.is_Integer else None), None


def _static_layout(q: fx.Node, n, frames: int | None, video_shape, frame_input: fx.Node | None = None,
                   earlier: dict | None = None):
    """Layout of a static export; ``n`` may hold data-dependent symbols (text lengths from masks).
    ``frame_input``: the placeholder of the video input, which tells the video piece of a
    concatenation from the others (:func:`_video_piece`); ``earlier``: {sequence length: (offset,
    video tokens)} of the sites before this one, filled in as they are decided."""
    if video_shape is not None:
        frames, m = video_shape[0], video_shape[1] * video_shape[2]
        video = frames * m
        if n.is_Integer and video > n:
            return None, Decline("not-over-video", f"not over video tokens: {n} tokens, fewer than the {video} of "
                                 f"video_shape={tuple(video_shape)}")
        before, reason = _offset(q, n, sympy.Integer(video), sympy.simplify(n - video))
        if reason:
            return None, reason
        return VideoLayout(m, frames, before, _int_or_none(n - video - before)), None
    if frames is None:
        return None, Decline("layout-unknown", "static export without a frame axis: pass video_shape=(frames, h, w)")
    batch = q.meta["val"].shape[0]
    if n.is_Integer and int(n) % frames and isinstance(batch, int) and batch % frames == 0:
        return None, Decline("factorised", f"factorised spatial-only attention: the sequence ({n} tokens) has no "
                             f"time axis, frames sit in the batch ({batch})")
    if n.is_Integer and int(n) < frames:
        return None, Decline("not-over-video", f"not over video tokens: {n} tokens, fewer than the {frames} frames")
    # no video_shape: the concatenated piece the frame input flows into (dataflow, not divisibility);
    # failing that, all of N, or the concatenated piece divisible by the frame count

    def divisible(size):
        return size.is_Integer and int(size) > 0 and int(size) % frames == 0

    found = _video_piece(q, n, frame_input) if frame_input is not None else None
    if found is not None and divisible(found[1]):
        if earlier is not None:
            earlier[n] = found
    elif earlier and n in earlier:
        # after text and video have mixed (a feed-forward over the joint sequence), the dataflow no
        # longer tells them apart: the sequence of this length is laid out as an earlier site's was
        found = earlier[n]
    if found is not None and divisible(found[1]):
        before, video = found
        return VideoLayout(int(video) // frames, frames, int(before), _int_or_none(n - video - before)), None
    if divisible(n):
        video = int(n)
    else:
        video = _largest_divisible_piece(q, n, divisible)
        if video is None:
            return None, Decline("layout-unknown", f"static export: cannot split the {_words(n)} into {frames} "
                                 "frames; pass video_shape=(frames, h, w)")
    before, reason = _offset(q, n, sympy.Integer(video), sympy.simplify(n - video))
    if reason:
        return None, reason
    return VideoLayout(video // frames, frames, before, _int_or_none(n - video - before)), None


def _consumes_attention(node: fx.Node) -> bool:
    """An attention output: an attention kernel of the spelling table, or ``p @ v`` after a softmax."""
    spelling = spelling_of(node)
    if spelling is not None and spelling.family != "softmax":
        return True
    if node.op == "call_function" and node.target == aten.matmul.default and isinstance(node.args[0], fx.Node):
        p = node.args[0]
        while p.op == "call_function" and p.target in SAME_VALUE and isinstance(p.args[0], fx.Node):
            p = p.args[0]
        return (s := spelling_of(p)) is not None and s.family == "softmax"
    return False


def _size(node: fx.Node, dim: int):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return as_expr(val.shape[dim]) if isinstance(val, torch.Tensor) and -val.dim() <= dim < val.dim() else None


def _parents_in_range(node: fx.Node, window):
    """(parent, window) pairs of ``node``: ``window`` = (dim, start, stop) restricts which entries of
    ``node`` along ``dim`` are asked about. A slice narrows it, a cat along that dim keeps only the pieces
    inside it, an elementwise op passes it to its full-size inputs; any other op asks about everything."""
    target = node.target if node.op == "call_function" else None
    val = node.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    if target == aten.slice.Tensor and rank is not None:
        src, dim, start, stop = (list(node.args) + [0, None, None])[:4]
        dim %= rank
        size = _size(src, dim)
        if stop is None or (isinstance(stop, int) and size is not None and size.is_Integer and stop > int(size)):
            stop = size
        static = isinstance(start, int) and isinstance(stop, (int, sympy.Integer)) and start >= 0
        if static and (len(node.args) < 5 or node.args[4] == 1):
            if window is not None and window[0] == dim:
                start, stop = start + window[1], start + window[2]
            elif window is not None:
                return [(src, None)]
            return [(src, (dim, start, int(stop)))]
    if window is not None and target == aten.cat.default:
        dim, lo, hi = window
        pieces = node.args[0]
        if (node.args[1] if len(node.args) > 1 else 0) % rank == dim:
            out, offset = [], 0
            for piece in pieces:
                size = _size(piece, dim)
                if size is None or not size.is_Integer:
                    return [(p, None) for p in pieces]
                size = int(size)
                if offset < hi and lo < offset + size:
                    out.append((piece, (dim, max(lo - offset, 0), min(hi - offset, size))))
                offset += size
            return out
    if window is not None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        dim = window[0]
        out = []
        for parent in node.all_input_nodes:
            pval = parent.meta.get("val")
            aligned = dim - (rank - pval.dim()) if isinstance(pval, torch.Tensor) else -1
            full = aligned >= 0 and _size(parent, aligned) == _size(node, dim)
            out.append((parent, (aligned, window[1], window[2]) if full else None))
        return out
    return [(p, None) for p in node.all_input_nodes]


def reaches_without_attention(node: fx.Node, source, limit: int = 4000) -> bool:
    """Whether ``source`` (a node, or a tuple of nodes: any of them) flows into ``node`` on a path that
    passes through no attention: the video reaches its own tokens through the patch embedding (and
    every residual after it), text tokens reach the video only through a joint attention. Token ranges
    are followed through slices of concatenations (text sliced back off a joint [text, video] sequence
    does not reach the video)."""
    sources = source if isinstance(source, tuple) else (source,)
    seen, stack = {(node, None)}, [(node, None)]
    while stack and len(seen) < limit:
        current, window = stack.pop()
        if any(current is s for s in sources):
            return True
        if _consumes_attention(current):
            continue
        for parent, sub in _parents_in_range(current, window):
            if (parent, sub) not in seen:
                seen.add((parent, sub))
                stack.append((parent, sub))
    return False


def _video_piece(q: fx.Node, n, frame_input: fx.Node, depth: int = 6):
    """(offset, size) of the one piece of the concatenation(s) building the n-token sequence above q
    that the frame input flows into without attention, or None when not exactly one does."""
    for node in _ancestors(q, 400):
        found = _cat_pieces(node, n, lambda e: e)
        if found is None:
            continue
        hits, offset = [], sympy.Integer(0)
        for piece, size in zip(*found):
            if reaches_without_attention(piece, frame_input):
                inner = _video_piece(piece, size, frame_input, depth - 1) if depth > 1 else None
                hits.append((offset + inner[0], inner[1]) if inner is not None else (offset, size))
            offset = offset + size
        return hits[0] if len(hits) == 1 else None
    return None


def _largest_divisible_piece(q: fx.Node, n, divisible, depth: int = 6):
    """Size of the largest concatenated piece (searched as in :func:`_find_video_offset`) that
    ``divisible`` accepts, or None."""
    best = None
    for node in _ancestors(q, 400):
        found = _cat_pieces(node, n, lambda e: e)
        if found is None:
            continue
        for piece, size in zip(*found):
            if divisible(size):
                best = max(best or 0, int(size))
            elif depth > 1:
                inner = _largest_divisible_piece(piece, size, divisible, depth - 1)
                if inner is not None:
                    best = max(best or 0, inner)
        return best
    return None


def _int_or_none(expr):
    expr = sympy.simplify(expr)
    return int(expr) if expr.is_Integer else None


def infer_video_layout(q: fx.Node, symbol, patch: int, frames: int | None, video_shape=None,
                       frame_input: fx.Node | None = None, earlier: dict | None = None):
    """(VideoLayout, None) or (None, Decline) for the attention whose queries are ``q`` ([.., N, D]);
    ``frame_input``: the video input's placeholder (static exports read the video piece from it)."""
    n = as_expr(q.meta["val"].shape[-2])
    if symbol is not None:
        return _symbolic_layout(q, n, symbol, patch, frames, video_shape)
    return _static_layout(q, n, frames, video_shape, frame_input, earlier)


def _merged_range(node: fx.Node, target_size, norm):
    """(input dims, start, stop) if ``node`` merges input dims [start, stop) into one dim of size
    ``target_size`` (flatten / reshape / view), else None."""
    if node.op != "call_function" or node.target not in (aten.flatten.using_ints, aten.reshape.default,
                                                         aten.view.default, aten._unsafe_view.default):
        return None
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    ins = [norm(as_expr(d)) for d in src.shape]
    outs = [norm(as_expr(d)) for d in out.shape]
    for k, size in enumerate(outs):
        if not _same(size, target_size) or _another_dim_of_size(outs, k, target_size):
            continue
        before = sympy.Mul(*outs[:k])
        # the last matching prefix: size-1 dims before the merge belong to the prefix, not to the merge
        start = next((i for i in reversed(range(len(ins) + 1))
                      if _same(sympy.Mul(*ins[:i]), before)), None)
        if start is None:
            continue
        stop = next((j for j in range(start + 2, len(ins) + 1)
                     if _same(sympy.Mul(*ins[start:j]), target_size)), None)
        if stop is not None:
            return ins, start, stop
    return None


def _another_dim_of_size(sizes: list, k: int, target_size) -> bool:
    """A tensor with the token count in a dim other than ``k`` holds its tokens there, so a merge into
    dim ``k`` is of other axes that only happen to multiply to it (RoPE's real/imaginary pairs
    flattened into the head dim of a tiny model traced at 2 frames): not the merge that builds them."""
    return any(i != k and _same(size, target_size) for i, size in enumerate(sizes))


def frame_major(q: fx.Node, layout: VideoLayout, symbol, patch: int, limit: int = 600) -> bool | None:
    """Whether the video tokens above q are frame-major (time the slowest of the merged axes).

    Looks for the flatten/reshape that merges (time, h, w) into the T*M video tokens: True when the
    frame axis comes first in the merge, False when it comes later (h-major or w-major: the chunks would
    not be frames), None when no such merge is found (not verifiable, e.g. pre-patchified inputs)."""
    norm = _normaliser(symbol, patch)
    frames = T if symbol is not None else sympy.Integer(layout.frames)
    video = frames * layout.tokens_per_frame
    if layout.frames == 1 or layout.tokens_per_frame == 1:
        return None
    for node in _ancestors(q, limit):
        merged = _merged_range(node, video, norm)
        if merged is None:
            continue
        ins, start, stop = merged
        axes = ins[start:stop]
        if _same(axes[0], frames):
            return True
        if any(_same(a, frames) for a in axes[1:]):
            return False
    return None


def layout_site(site: Site, symbol, patch: int, frames: int | None, video_shape=None,
                frame_input: fx.Node | None = None, earlier: dict | None = None) -> Site:
    """The site with its :class:`VideoLayout` (kind "joint" when it has extra tokens) and whether its
    tokens are frame-major, or declined with the reason."""
    layout, decline = infer_video_layout(site.match.q, symbol, patch, frames, video_shape, frame_input, earlier)
    if decline is not None:
        return replace(site, decline=decline)
    kind = "joint" if (layout.extra_before or layout.extra_after != 0) else "self"
    major = frame_major(site.match.q, layout, symbol, patch)
    site = replace(site, layout=layout, kind=kind, frame_major=major)
    if major is False:
        return site.declined(
            "not-frame-major", "video tokens are not frame-major (time is not the slowest axis of the merge that "
            "builds them): chunks of the token axis would not be frames")
    return site
