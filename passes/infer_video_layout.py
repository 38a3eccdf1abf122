"""Where the video sits in an attention's token axis: N = extra_before + T*M + extra_after.

Symbolic export: N is a sympy expression in the input frame symbol ``s`` (token frames
T = s / patch); evaluating N at T = 2, 3, 4 gives M = N(3) - N(2) (checked against N(4) - N(3)) and
the extra count E = N(2) - 2M, which may itself be symbolic (data-dependent text length, Mochi).
Static export: T and M come from the user's ``video_shape=(frames, h, w)``, else T from the input
and M from the concatenation below. The video offset (extra_before) is read off the ``aten.cat`` that
builds the sequence: walking up from q, the nearest cat whose output is N long on its cat dim and
has one piece of T*M tokens; the pieces before it are extra_before. The layout is declined with a
reason when any of this does not hold (never guessed).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import sympy
import torch
from torch import fx

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


def _find_sequence_cat(q: fx.Node, n, is_video, limit: int = 400, norm=lambda e: e):
    """Nearest ``aten.cat`` above q with output length n on its dim and a video piece; (cat, pieces).
    ``norm`` rewrites size expressions in token frames before comparing (s -> patch * t)."""
    seen, queue = {q}, deque([q])
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node.op == "call_function" and node.target == aten.cat.default:
            pieces = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and len(pieces) >= 2:
                dim %= val.dim()
                if sympy.simplify(norm(as_expr(val.shape[dim])) - n) == 0:
                    sizes = [norm(as_expr(p.meta["val"].shape[dim])) for p in pieces]
                    if any(is_video(s) for s in sizes):
                        return node, sizes
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None, None


def _offset(q: fx.Node, n, video_tokens, extra, norm=lambda e: e) -> tuple[int | None, str]:
    """extra_before, or (None, reason)."""
    if extra == 0:
        return 0, ""

    def is_video(size):
        return sympy.simplify(size - video_tokens) == 0

    cat, sizes = _find_sequence_cat(q, n, is_video, norm=norm)
    if cat is None:
        return None, (f"cannot locate the {video_tokens} video tokens among the {n} tokens: no concatenation "
                      f"builds the sequence (pass video_shape=(frames, h, w) or check the model)")
    index = next(i for i, s in enumerate(sizes) if is_video(s))
    before = sympy.simplify(sum(sizes[:index], sympy.Integer(0)))
    if not before.is_Integer:
        return None, f"the tokens before the video ({before}) vary with the input; only a fixed offset is supported"
    return int(before), ""


def _symbolic_layout(q: fx.Node, n, symbol, patch: int, frames: int, video_shape):
    t = sympy.Symbol("t", integer=True, positive=True)

    def norm(e):
        return sympy.simplify(e.subs(symbol, patch * t))

    values = [sympy.simplify(n.subs(symbol, patch * k)) for k in (2, 3, 4)]
    m = sympy.simplify(values[1] - values[0])
    if not m.is_Integer or sympy.simplify(values[2] - values[1] - m) != 0 or m <= 0:
        return None, f"sequence length {n} is not M * frames + extra in the frames"
    m = int(m)
    extra = sympy.simplify(values[0] - 2 * m)
    if video_shape is not None and (video_shape[0] != frames or video_shape[1] * video_shape[2] != m):
        return None, (f"video_shape={tuple(video_shape)} disagrees with the exported graph: {frames} frames of "
                      f"{m} tokens (sequence {n})")
    before, reason = _offset(q, norm(n), m * t, extra, norm)
    if reason:
        return None, reason
    after = sympy.simplify(extra - before)
    if after.is_Integer and after < 0:
        return None, f"video offset {before} exceeds the {extra} extra tokens"
    return VideoLayout(m, frames, before, int(after) if after.is_Integer else None), ""


def _static_layout(q: fx.Node, n: int, frames: int | None, video_shape):
    if video_shape is not None:
        frames, m = video_shape[0], video_shape[1] * video_shape[2]
        video = frames * m
        if video > n:
            return None, (f"video_shape={tuple(video_shape)} gives {video} video tokens but the attention has only "
                          f"{n} tokens")
        before, reason = _offset(q, sympy.Integer(n), sympy.Integer(video), n - video)
        if reason:
            return None, reason
        return VideoLayout(m, frames, before, n - video - before), ""
    if frames is None:
        return None, "static export without a frame axis: pass video_shape=(frames, h, w)"
    # no video_shape: the video is the concatenated piece divisible by the frame count (or all of N)
    if n % frames == 0:
        candidates = [n]
    else:
        cat, sizes = _find_sequence_cat(q, sympy.Integer(n), lambda s: int(s) % frames == 0 and int(s) > 0)
        candidates = [] if cat is None else [int(s) for s in sizes if int(s) % frames == 0 and int(s) > 0]
    if not candidates:
        return None, (f"static export: cannot split the {n} tokens into {frames} frames; "
                      f"pass video_shape=(frames, h, w)")
    video = max(candidates)
    before, reason = _offset(q, sympy.Integer(n), sympy.Integer(video), n - video)
    if reason:
        return None, reason
    return VideoLayout(video // frames, frames, before, n - video - before), ""


def infer_video_layout(q: fx.Node, symbol, patch: int, frames: int | None, video_shape=None):
    """(VideoLayout, "") or (None, reason) for the attention whose queries are ``q`` ([.., N, D])."""
    n = as_expr(q.meta["val"].shape[-2])
    if symbol is not None:
        return _symbolic_layout(q, n, symbol, patch, frames, video_shape)
    return _static_layout(q, int(n), frames, video_shape)
