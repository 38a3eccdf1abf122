"""The ReHyAt hybrid attention, in the three forms docs/hybrid_attention.md defines.

* :func:`hybrid_attention_reference` -- the O(N^2) masked definition (short, obviously right);
* :func:`hybrid_attention_chunked`   -- the chunk-parallel form, O(N) memory for fixed chunk size;
* :func:`hybrid_attention_step`      -- the recurrent form, one chunk at a time with a fixed state.

All tensors are ``[B, H, N, D]`` (q, k, v) and ``[B, H, N, F]`` (feature-mapped q and k), with
``N = extra_before + frames * tokens_per_frame + extra_after``. The softmax stabiliser is the
row's log-sum-exp over its window (docs/hybrid_attention.md "Decision (stabiliser)"), so the softmax part is a
normalised attention output ``o`` and ``y = (o + phi_q S) / (1 + phi_q z)``. The linear part is
accumulated in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import ShapeError


@dataclass(frozen=True)
class HybridLayout:
    """Where the video sits in the token axis, and how it is chunked (units: frames, tokens)."""

    tokens_per_frame: int
    chunk_frames: int
    overlap_frames: int
    causal: bool = True
    extra_before: int = 0
    extra_after: int = 0

    @property
    def extra(self) -> int:
        return self.extra_before + self.extra_after

    def frames(self, n_tokens) -> int:
        return (n_tokens - self.extra) // self.tokens_per_frame

    def window(self, chunk: int, frames: int) -> tuple[int, int]:
        """Softmax window of chunk ``chunk``: frames [start, stop)."""
        start = max(chunk * self.chunk_frames - self.overlap_frames, 0)
        return start, min((chunk + 1) * self.chunk_frames, frames)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def make_layout(tokens_per_frame, chunk_frames, overlap_frames, causal=True, extra_before=0,
                extra_after=0) -> HybridLayout:
    """Validate the layout arguments and bundle them."""
    _check_int("tokens_per_frame", tokens_per_frame, 1)
    _check_int("chunk_frames", chunk_frames, 1)
    _check_int("overlap_frames", overlap_frames, 0)
    _check_int("extra_before", extra_before, 0)
    _check_int("extra_after", extra_after, 0)
    if overlap_frames > chunk_frames:
        raise ValueError(f"overlap_frames must be <= chunk_frames ({chunk_frames}), got {overlap_frames}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return HybridLayout(tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before, extra_after)


def validate_inputs(q, k, v, fq, fk, layout: HybridLayout, *, whole_video: bool = True) -> None:
    """Raise TypeError/ValueError naming the argument when the inputs do not fit the op."""
    for name, t in (("q", q), ("k", k), ("v", v), ("fq", fq), ("fk", fk)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(f"{name} must be 4-D [B, H, N, {'F' if name.startswith('f') else 'D'}], "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ShapeError(f"{name} must have q's shape {tuple(q.shape)} [B, H, N, D], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if fq.shape[:3] != q.shape[:3]:
        raise ShapeError(f"fq must be [B, H, N, F] with B, H, N = {tuple(q.shape[:3])}, got {tuple(fq.shape)}")
    if fk.shape != fq.shape:
        raise ShapeError(f"fk must have fq's shape {tuple(fq.shape)} (same feature dim F), got {tuple(fk.shape)}")
    for name, t in (("fq", fq), ("fk", fk)):
        if t.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"{name} must have q's dtype {q.dtype} or float32, got {t.dtype}")
    n = q.shape[2]
    video = n - layout.extra
    if whole_video:
        if video <= 0 or video % layout.tokens_per_frame != 0:
            raise ShapeError(
                f"token count N={n} of q must be extra_before + frames * tokens_per_frame + extra_after "
                f"= {layout.extra_before} + frames * {layout.tokens_per_frame} + {layout.extra_after} with frames >= 1")
    elif video <= 0 or video % layout.tokens_per_frame != 0 or video // layout.tokens_per_frame > layout.chunk_frames:
        raise ShapeError(
            f"a chunk's token count N={n} of q must be extra_before + frames * tokens_per_frame + extra_after "
            f"= {layout.extra_before} + frames * {layout.tokens_per_frame} + {layout.extra_after} "
            f"with 1 <= frames <= chunk_frames={layout.chunk_frames}")


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or the input's own dtype when it is wider (float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------------------------------------
# Reference: the O(N^2) masked definition
# ---------------------------------------------------------------------------------------------

def token_frames(layout: HybridLayout, n_tokens: int, device=None) -> torch.Tensor:
    """Latent frame of every token; -1 marks extra (non-video) tokens."""
    frames = layout.frames(n_tokens)
    video = torch.arange(frames, device=device).repeat_interleave(layout.tokens_per_frame)
    before = torch.full((layout.extra_before,), -1, device=device, dtype=torch.long)
    after = torch.full((layout.extra_after,), -1, device=device, dtype=torch.long)
    return torch.cat([before, video, after])


def attention_masks(layout: HybridLayout, n_tokens: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [N, N] masks (softmax window, linear set) of the parallel form."""
    frame = token_frames(layout, n_tokens, device)
    is_video = frame >= 0
    chunk = torch.div(frame.clamp(min=0), layout.chunk_frames, rounding_mode="floor")
    win_start = (chunk * layout.chunk_frames - layout.overlap_frames).clamp(min=0)
    win_stop = (chunk + 1) * layout.chunk_frames
    kf = frame[None, :]
    in_window = (kf >= win_start[:, None]) & (kf < win_stop[:, None])
    video_pair = is_video[:, None] & is_video[None, :]
    window = (video_pair & in_window) | ~is_video[None, :] | ~is_video[:, None]
    if layout.causal:
        linear = video_pair & (kf < win_start[:, None])
    else:
        linear = video_pair & ~in_window
    return window, linear


def hybrid_attention_reference(q, k, v, fq, fk, *, tokens_per_frame, chunk_frames, overlap_frames,
                               causal=True, extra_before=0, extra_after=0, scale=None):
    """The definition: masked softmax over the window plus masked linear attention, O(N^2)."""
    layout = make_layout(tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before, extra_after)
    validate_inputs(q, k, v, fq, fk, layout)
    scale = resolve_scale(scale, q.shape[-1])
    window, linear = attention_masks(layout, q.shape[2], q.device)
    scores = (q.to(_acc(q)) @ k.to(_acc(q)).transpose(-1, -2)) * scale
    o = torch.softmax(scores.masked_fill(~window, float("-inf")), dim=-1) @ v.to(_acc(q))
    lin = (fq.to(_acc(q)) @ fk.to(_acc(q)).transpose(-1, -2)) * linear
    y = (o + lin @ v.to(_acc(q))) / (1.0 + lin.sum(-1, keepdim=True))
    return y.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Chunk-parallel form
# ---------------------------------------------------------------------------------------------

def _split_tokens(t, layout: HybridLayout):
    """[B,H,N,X] -> (extra_before, video [B,H,T*M,X], extra_after)."""
    n = t.shape[2]
    a, b = layout.extra_before, n - layout.extra_after
    return t[:, :, :a], t[:, :, a:b], t[:, :, b:]


def _frames_padded(t, m: int, front: int, total: int):
    """Video tokens [B,H,T*M,X] -> frames [B,H,total,M,X] with `front` zero frames before."""
    bsz, heads, _, width = t.shape
    frames = t.reshape(bsz, heads, -1, m, width)
    back = total - front - frames.shape[2]
    return F.pad(frames, (0, 0, 0, 0, front, back))


def _exclusive_prefix(x, dim: int, prefix: str):
    """Sum over earlier entries along dim (exclusive). 'matmul' avoids cumsum for backends."""
    if prefix == "cumsum":
        return torch.cumsum(x, dim=dim) - x
    n = x.shape[dim]
    lower = torch.ones(n, n, dtype=x.dtype, device=x.device).tril(-1)
    moved = x.movedim(dim, -1)
    return (moved @ lower.T).movedim(-1, dim)


def _segment_states(fk_video, v_video, layout: HybridLayout, n_seg: int, shift: int):
    """Per-segment S [B,H,n_seg,F,D] and z [B,H,n_seg,F] in fp32; segment s holds frames
    [s*Tc - shift, (s+1)*Tc - shift)."""
    tc, m = layout.chunk_frames, layout.tokens_per_frame
    total = n_seg * tc
    fk_f = _frames_padded(fk_video.to(_acc(v_video)), m, shift, total)
    v_f = _frames_padded(v_video.to(_acc(v_video)), m, shift, total)
    bsz, heads = fk_f.shape[:2]
    fk_s = fk_f.reshape(bsz, heads, n_seg, tc * m, -1)
    v_s = v_f.reshape(bsz, heads, n_seg, tc * m, -1)
    return fk_s.transpose(-1, -2) @ v_s, fk_s.sum(3)


def linear_states(fk_video, v_video, layout: HybridLayout, frames: int, prefix: str = "cumsum"):
    """S_t, z_t of every chunk t (fp32): the sums of phi_k v^T and phi_k over its linear set."""
    tc, to = layout.chunk_frames, layout.overlap_frames
    n_chunks = -(-frames // tc)
    seg_s, seg_z = _segment_states(fk_video, v_video, layout, n_chunks, to)
    s = _exclusive_prefix(seg_s, 2, prefix)
    z = _exclusive_prefix(seg_z, 2, prefix)
    if not layout.causal:
        # Frames after the window are the whole chunks after t (chunk-aligned partition).
        ch_s, ch_z = _segment_states(fk_video, v_video, layout, n_chunks, 0)
        s = s + _exclusive_prefix(ch_s.flip(2), 2, prefix).flip(2)
        z = z + _exclusive_prefix(ch_z.flip(2), 2, prefix).flip(2)
    return s, z


def _with_extra(window, before, after, groups: int):
    """Prepend the extra tokens [B,H,E,D] to each of `groups` windows [B,H,G,L,D] -> [B,H*G,E+L,D]."""
    bsz, heads = window.shape[:2]
    extra = torch.cat([before, after], dim=2)[:, :, None].expand(-1, -1, groups, -1, -1)
    return torch.cat([extra, window], dim=3).reshape(bsz, heads * groups, -1, window.shape[-1])


def _windowed_softmax_masked(q_video, k, v, layout: HybridLayout, frames, scale: float):
    """Normalised softmax of every chunk's queries over (extra tokens + its window), all chunks in
    one SDPA with a key-padding mask. Traceable with a symbolic frame count (no branches)."""
    tc, to, m = layout.chunk_frames, layout.overlap_frames, layout.tokens_per_frame
    n_chunks = -(-frames // tc)
    kb, k_video, ka = _split_tokens(k, layout)
    vb, v_video, va = _split_tokens(v, layout)
    bsz, heads, _, d = q_video.shape
    qc = _frames_padded(q_video, m, 0, n_chunks * tc).reshape(bsz, heads * n_chunks, tc * m, d)

    def windows(t_video, t_before, t_after):
        fr = _frames_padded(t_video, m, to, to + n_chunks * tc)          # [B,H,To+nC*Tc,M,D]
        win = fr.unfold(2, tc + to, tc)                                  # [B,H,nC,M,D,Tc+To]
        win = win.permute(0, 1, 2, 5, 3, 4).reshape(bsz, heads, n_chunks, (tc + to) * m, d)
        return _with_extra(win, t_before, t_after, n_chunks)

    # Key validity: extra tokens always; window frame f (= t*Tc - To + i) when 0 <= f < frames.
    first = torch.arange(n_chunks, device=q_video.device)[:, None] * tc - to
    frame = first + torch.arange(tc + to, device=q_video.device)[None, :]
    valid = ((frame >= 0) & (frame < frames)).repeat_interleave(m, dim=1)
    valid = torch.cat([valid.new_ones(n_chunks, layout.extra), valid], dim=1)
    mask = valid[None, :, None, :].expand(heads, -1, -1, -1).reshape(1, heads * n_chunks, 1, -1)
    o = F.scaled_dot_product_attention(qc, windows(k_video, kb, ka), windows(v_video, vb, va), attn_mask=mask,
                                       scale=scale)
    return o.reshape(bsz, heads, n_chunks * tc * m, d)[:, :, : frames * m]


def _windowed_softmax_grouped(q_video, k, v, layout: HybridLayout, frames: int, scale: float):
    """Same result as the masked form without a mask or padding (so SDPA can take its flash
    kernel): chunk 0, the complete chunks after it (windows of Tc+To frames), and a short last
    chunk are three groups of equal-size windows."""
    tc, to, m = layout.chunk_frames, layout.overlap_frames, layout.tokens_per_frame
    kb, k_video, ka = _split_tokens(k, layout)
    vb, v_video, va = _split_tokens(v, layout)
    bsz, heads, _, d = q_video.shape
    qf, kf, vf = (t.reshape(bsz, heads, -1, m, t.shape[-1]) for t in (q_video, k_video, v_video))
    full = frames // tc

    def attend(first_chunk, n_chunks, chunk_len, window_start, window_len, step):
        """SDPA for n_chunks chunks of chunk_len frames starting at first_chunk."""
        q0 = first_chunk * tc
        qs = qf[:, :, q0:q0 + n_chunks * chunk_len].reshape(bsz, heads * n_chunks, chunk_len * m, d)

        def windows(t, before, after):
            span = t[:, :, window_start:window_start + (n_chunks - 1) * step + window_len]
            win = span.unfold(2, window_len, step).permute(0, 1, 2, 5, 3, 4)
            return _with_extra(win.reshape(bsz, heads, n_chunks, window_len * m, d), before, after, n_chunks)

        o = F.scaled_dot_product_attention(qs, windows(kf, kb, ka), windows(vf, vb, va), scale=scale)
        return o.reshape(bsz, heads, n_chunks * chunk_len * m, d)

    first_len = min(tc, frames)
    parts = [attend(0, 1, first_len, 0, first_len, tc)]
    if full > 1:
        parts.append(attend(1, full - 1, tc, tc - to, tc + to, tc))
    if frames > tc and frames % tc:
        rem = frames % tc
        parts.append(attend(full, 1, rem, full * tc - to, rem + to, tc))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def hybrid_attention_chunked(q, k, v, fq, fk, *, tokens_per_frame, chunk_frames, overlap_frames,
                             causal=True, extra_before=0, extra_after=0, scale=None, prefix="cumsum",
                             windows="auto", validate=True):
    """Chunk-parallel hybrid attention (pure PyTorch). ``prefix='matmul'`` writes the prefix
    sums over chunks as a lower-triangular matmul, for compilers that cannot lower cumsum.
    ``windows``: 'grouped' (mask-free SDPA per group of equal windows), 'masked' (one SDPA with
    a key mask, branch-free for symbolic shapes) or 'auto' (grouped unless frames is symbolic)."""
    layout = make_layout(tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before, extra_after)
    if validate:
        validate_inputs(q, k, v, fq, fk, layout)
    if windows not in ("auto", "grouped", "masked"):
        raise ValueError(f"windows must be 'auto', 'grouped' or 'masked', got {windows!r}")
    scale = resolve_scale(scale, q.shape[-1])
    n = q.shape[2]
    frames = layout.frames(n)
    tc, m = layout.chunk_frames, layout.tokens_per_frame
    n_chunks = -(-frames // tc)
    bsz, heads, _, d = q.shape

    qb, q_video, qa = _split_tokens(q, layout)
    _, fk_video, _ = _split_tokens(fk, layout)
    _, v_video, _ = _split_tokens(v, layout)
    _, fq_video, _ = _split_tokens(fq, layout)

    # A symbolic frame count (tracing, export) takes the branch-free masked form.
    windowed = _windowed_softmax_grouped if windows == "grouped" or (
        windows == "auto" and isinstance(frames, int)) else _windowed_softmax_masked
    o = windowed(q_video, k, v, layout, frames, scale)                    # [B,H,T*M,D]
    s, z = linear_states(fk_video, v_video, layout, frames, prefix)       # fp32
    fqc = _frames_padded(fq_video.to(_acc(q)), m, 0, n_chunks * tc).reshape(bsz, heads, n_chunks, tc * m, -1)
    num = (fqc @ s).reshape(bsz, heads, n_chunks * tc * m, d)[:, :, : frames * m]
    den = (1.0 + fqc @ z.unsqueeze(-1)).reshape(bsz, heads, n_chunks * tc * m, 1)[:, :, : frames * m]
    y_video = ((o.to(_acc(q)) + num) / den).to(q.dtype)

    parts = []
    if layout.extra_before:
        parts.append(F.scaled_dot_product_attention(qb, k, v, scale=scale))
    parts.append(y_video)
    if layout.extra_after:
        parts.append(F.scaled_dot_product_attention(qa, k, v, scale=scale))
    return torch.cat(parts, dim=2) if len(parts) > 1 else y_video


# ---------------------------------------------------------------------------------------------
# Recurrent form
# ---------------------------------------------------------------------------------------------

class HybridState(NamedTuple):
    """Carried between chunks, per layer; every field has a fixed shape, whatever the frame count.

    s [B,H,F,D] and z [B,H,F] (fp32 or wider): sums of phi_k v^T and phi_k over the frames that
    have left the window. k_overlap, v_overlap [B,H,To*M,D] and fk_overlap [B,H,To*M,F] (input
    dtypes): the last To frames seen, zero before they exist; overlap_valid [To*M] (bool) marks
    which of them exist yet (only the first chunks have fewer than To frames behind them).
    """

    s: torch.Tensor
    z: torch.Tensor
    k_overlap: torch.Tensor
    v_overlap: torch.Tensor
    fk_overlap: torch.Tensor
    overlap_valid: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


class LastChunkState(HybridState):
    """The state after a chunk shorter than ``chunk_frames``: such a chunk can only be the video's
    last (the parallel form starts chunks every ``chunk_frames`` frames), so no step may follow it.

    The mark is the Python type, not a tensor: a chunk's length is a static shape in every traced
    step graph (each is traced for one chunk length), so the graph's state keeps its six fixed-shape
    tensors, and eager callers who hand the state back are refused instead of silently answered."""

    __slots__ = ()


def _after_chunk(state: HybridState, chunk_frames_seen, chunk_frames: int) -> HybridState:
    """``state`` marked as final when the chunk just stepped was short (a static int shape only:
    a symbolic length cannot be compared without a guard, and the stream never traces one)."""
    if isinstance(chunk_frames_seen, int) and chunk_frames_seen < chunk_frames:
        return LastChunkState(*state)
    return state


def initial_state(k, v, fk, overlap_tokens: int) -> HybridState:
    """The state before the first chunk: S = 0, z = 0, an empty (all-invalid) overlap cache."""
    bsz, heads, _, d = k.shape
    feat = fk.shape[-1]
    s = torch.zeros(bsz, heads, feat, d, dtype=_acc(k), device=k.device)
    return HybridState(s, s.new_zeros(bsz, heads, feat), k.new_zeros(bsz, heads, overlap_tokens, d),
                       v.new_zeros(bsz, heads, overlap_tokens, d), fk.new_zeros(bsz, heads, overlap_tokens, feat),
                       torch.zeros(overlap_tokens, dtype=torch.bool, device=k.device))


def _validate_state(state, k, v, fk, overlap_tokens: int) -> None:
    if not isinstance(state, HybridState):
        raise TypeError(f"state must be None or a HybridState, got {type(state).__name__}")
    if isinstance(state, LastChunkState):
        raise ValueError("state comes from a chunk shorter than chunk_frames, which must be the video's last: a "
                         "chunk after it would start where the parallel form has none (a wrong result). Give every "
                         "chunk but the last exactly chunk_frames frames")
    bsz, heads, _, d = k.shape
    feat = fk.shape[-1]
    expected = {"s": (bsz, heads, feat, d), "z": (bsz, heads, feat), "k_overlap": (bsz, heads, overlap_tokens, d),
                "v_overlap": (bsz, heads, overlap_tokens, d), "fk_overlap": (bsz, heads, overlap_tokens, feat),
                "overlap_valid": (overlap_tokens,)}
    for name, shape in expected.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ShapeError(f"state.{name} must have shape {shape} for these inputs and overlap_frames, got {got}")


def _prepare_step(q, k, v, fq, fk, state, tokens_per_frame, chunk_frames, overlap_frames, extra_before, extra_after,
                  scale) -> tuple[HybridLayout, HybridState, float]:
    """(layout, state -- the initial one for None --, scale) of a step call, its inputs validated."""
    layout = make_layout(tokens_per_frame, chunk_frames, overlap_frames, True, extra_before, extra_after)
    validate_inputs(q, k, v, fq, fk, layout, whole_video=False)
    overlap_tokens = layout.overlap_frames * layout.tokens_per_frame
    state = initial_state(k, v, fk, overlap_tokens) if state is None else state
    _validate_state(state, k, v, fk, overlap_tokens)
    return layout, state, resolve_scale(scale, q.shape[-1])


def hybrid_attention_step(q, k, v, fq, fk, state, *, tokens_per_frame, chunk_frames, overlap_frames,
                          extra_before=0, extra_after=0, scale=None):
    """One chunk of the causal recurrent form. Inputs hold [extra_before, this chunk's frames,
    extra_after] tokens; returns (output for those tokens, state for the next chunk). On CUDA (no
    gradient) it runs the fused Triton step (``kernels/triton_step.py``) -- under torch.compile as one
    ``rehyat::hybrid_attention_step`` node (``op.py``) --, elsewhere :func:`hybrid_attention_step_torch`;
    all compute one function."""
    layout, state, scale = _prepare_step(q, k, v, fq, fk, state, tokens_per_frame, chunk_frames, overlap_frames,
                                         extra_before, extra_after, scale)
    # Dynamo only (torch.compile): torch.export here is non-strict and must see PyTorch ops; some
    # releases fold torch.compiler.is_exporting() to True under torch.compile, so it cannot tell them apart.
    if q.device.type == "cuda" and torch.compiler.is_dynamo_compiling():
        from .op import hybrid_attention_step_compiled  # one opaque node for Inductor: the fused step stays
        y, new = hybrid_attention_step_compiled(q, k, v, fq, fk, state, dict(
            tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
            extra_before=extra_before, extra_after=extra_after, scale=scale))
        return y, _after_chunk(new, layout.frames(q.shape[2]), layout.chunk_frames)
    return hybrid_attention_step_eager(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                       chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                       extra_before=extra_before, extra_after=extra_after, scale=scale)


def hybrid_attention_steps(q, k, v, fq, fk, state, *, tokens_per_frame, chunk_frames, overlap_frames,
                           extra_before=0, extra_after=0, scale=None):
    """Consecutive chunks of the causal recurrent form in one call: the inputs hold any number of
    video frames, stepped ``chunk_frames`` at a time by :func:`hybrid_attention_step` (every chunk but
    the last full), each chunk's state fed to the next (on CUDA, no gradient: all of them in one
    chunk-parallel launch from the carried state, ``kernels/triton_step.py``). Returns (output for
    every token, state after the last chunk) -- the same function as stepping chunk by chunk, so a
    streamed model may run several chunks per step program (``rc.stream(..., chunks_per_step=G)``):
    fewer, larger launches for the rest of the model, the carried state of a fixed size. Extra (non-video)
    tokens belong to one chunk each, so they are refused when the call holds several chunks."""
    video = q.shape[2] - extra_before - extra_after      # a SymInt in traced step graphs: // and %, no divmod
    if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1 or video % tokens_per_frame != 0 \
            or video // tokens_per_frame <= chunk_frames:
        return hybrid_attention_step(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                     chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                     extra_before=extra_before, extra_after=extra_after, scale=scale)
    frames, outputs = video // tokens_per_frame, []
    if extra_before or extra_after:
        raise ValueError(f"several chunks in one step ({frames} frames, chunk_frames={chunk_frames}) need "
                         f"extra_before = extra_after = 0, got {extra_before} and {extra_after}: each chunk "
                         "carries its own copy of the extra tokens; step one chunk at a time")
    layout = make_layout(tokens_per_frame, chunk_frames, overlap_frames, True, extra_before, extra_after)
    validate_inputs(q, k, v, fq, fk, layout)                 # any number of frames
    overlap_tokens = layout.overlap_frames * layout.tokens_per_frame
    state = initial_state(k, v, fk, overlap_tokens) if state is None else state
    _validate_state(state, k, v, fk, overlap_tokens)
    if q.device.type == "cuda" and torch.compiler.is_dynamo_compiling():
        # torch.compile: one opaque node that makes the chunk-parallel launch at run time (op.py); traced
        # here, the fused launch would be refused and the chunks stepped one by one
        from .op import hybrid_attention_steps_compiled
        y, new = hybrid_attention_steps_compiled(q, k, v, fq, fk, state, dict(
            tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
            scale=resolve_scale(scale, q.shape[-1])))
        last = frames % chunk_frames or chunk_frames
        return y, _after_chunk(new, last, chunk_frames)
    if q.device.type == "cuda":  # one chunk-parallel launch per call (kernels/triton_step.py)
        from .kernels import fused_step_unavailable
        if fused_step_unavailable(q, k, v, fq, fk, state) is None:
            from .kernels.triton_step import hybrid_attention_steps_fused
            return hybrid_attention_steps_fused(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                                chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                                scale=resolve_scale(scale, q.shape[-1]))
    for start in range(0, frames, chunk_frames):
        rows = slice(start * tokens_per_frame, min(start + chunk_frames, frames) * tokens_per_frame)
        y, state = hybrid_attention_step(q[:, :, rows], k[:, :, rows], v[:, :, rows], fq[:, :, rows],
                                         fk[:, :, rows], state, tokens_per_frame=tokens_per_frame,
                                         chunk_frames=chunk_frames, overlap_frames=overlap_frames, scale=scale)
        outputs.append(y.transpose(1, 2))
    # joined in [B, N, H, D] memory, the layout every step returns (the model's reshape after it is free)
    return torch.cat(outputs, dim=1).transpose(1, 2), state


def hybrid_attention_step_eager(q, k, v, fq, fk, state, *, tokens_per_frame, chunk_frames, overlap_frames,
                                extra_before=0, extra_after=0, scale=None):
    """:func:`hybrid_attention_step` run now: the fused Triton step on CUDA where it applies, else
    :func:`hybrid_attention_step_torch`."""
    layout, state, scale = _prepare_step(q, k, v, fq, fk, state, tokens_per_frame, chunk_frames, overlap_frames,
                                         extra_before, extra_after, scale)
    if q.device.type == "cuda":
        from .kernels import fused_step_unavailable
        if fused_step_unavailable(q, k, v, fq, fk, state) is None:
            from .kernels.triton_step import hybrid_attention_step_fused
            return hybrid_attention_step_fused(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                               chunk_frames=chunk_frames, extra_before=extra_before,
                                               extra_after=extra_after, scale=scale)
    return _step_torch(q, k, v, fq, fk, state, layout, scale)


def hybrid_attention_step_torch(q, k, v, fq, fk, state, *, tokens_per_frame, chunk_frames, overlap_frames,
                                extra_before=0, extra_after=0, scale=None):
    """:func:`hybrid_attention_step` in PyTorch ops on any device: the reference of the fused step."""
    layout, state, scale = _prepare_step(q, k, v, fq, fk, state, tokens_per_frame, chunk_frames, overlap_frames,
                                         extra_before, extra_after, scale)
    return _step_torch(q, k, v, fq, fk, state, layout, scale)


def _step_torch(q, k, v, fq, fk, state: HybridState, layout: HybridLayout, scale: float):
    """The recurrent step on validated inputs and state, in PyTorch ops."""
    overlap_tokens = layout.overlap_frames * layout.tokens_per_frame

    kb, k_video, ka = _split_tokens(k, layout)
    vb, v_video, va = _split_tokens(v, layout)
    _, fk_video, _ = _split_tokens(fk, layout)
    window_k = torch.cat([state.k_overlap, k_video], dim=2)
    window_v = torch.cat([state.v_overlap, v_video], dim=2)
    window_fk = torch.cat([state.fk_overlap, fk_video], dim=2)
    window_valid = torch.cat([state.overlap_valid, state.overlap_valid.new_ones(k_video.shape[2])])

    # Every query of the chunk (extra tokens included) sees extras + window with softmax.
    keys = torch.cat([kb, ka, window_k], dim=2)
    values = torch.cat([vb, va, window_v], dim=2)
    mask = None
    if overlap_tokens:
        mask = torch.cat([window_valid.new_ones(layout.extra), window_valid])[None, :]
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).to(_acc(q))
    fqf = fq.to(_acc(q))
    y = (o + fqf @ state.s) / (1.0 + fqf @ state.z.unsqueeze(-1))

    # Frames leaving the window move into the state (not-yet-existing overlap slots hold zeros and
    # add nothing); the last To frames stay as the overlap.
    leave = k_video.shape[2]
    fk_leave = window_fk[:, :, :leave].to(_acc(q))
    s = state.s + fk_leave.transpose(-1, -2) @ window_v[:, :, :leave].to(_acc(q))
    z = state.z + fk_leave.sum(2)
    new_state = HybridState(s, z, window_k[:, :, leave:], window_v[:, :, leave:], window_fk[:, :, leave:],
                            window_valid[leave:])
    return y.to(q.dtype), _after_chunk(new_state, layout.frames(q.shape[2]), layout.chunk_frames)
