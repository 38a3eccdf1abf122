"""Fused Triton forward of one recurrent step, ``rc.hybrid_attention_step`` (docs/hybrid_attention.md,
"Recurrent (chunk-wise RNN) form"), for CUDA GPUs.

Two launches per step and converted layer:

1. :func:`_step_attention_kernel` -- per block of the chunk's queries (extra tokens included):
   flash-style online softmax over the chunk's own keys, its extra tokens and the overlap cache
   (masked by ``overlap_valid``), then in the same program ``y = (o + phi_q S) / (1 + phi_q z)``
   with the carried fp32 S, z. K/V come through TMA descriptors where the strides allow, so the
   model's ``[B, N, H, D]`` tensors (seen as ``[B, H, N, D]`` views) are read in place; the output is
   written into ``[B, N, H, D]`` memory and returned as a ``[B, H, N, D]`` view, so the model's
   ``transpose(1, 2).reshape`` after attention is free.
2. :func:`_step_state_kernel` -- the frames leaving the window (window rows ``[0, Lc)`` of
   ``[overlap cache, chunk frames]``) added to S and z: ``phi_k^T v`` on tensor cores (16-bit operands,
   fp32 accumulation), split over rows and summed with fp32 atomics.

The new overlap cache is the window's last ``To*M`` rows (a slice copy). The PyTorch form beside it
is :func:`rehyat_compile.attention.hybrid_attention_step_torch`; tests compare the two.

Several chunks in one call (``rc.stream(..., chunks_per_step=G)``) take
:func:`hybrid_attention_steps_fused` instead: the chunk-parallel kernel of ``triton_hybrid.py`` run
from the carried state, one launch per layer for all G chunks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..attention import HybridState, _after_chunk
from .triton_hybrid import (HOST_TMA, LOG2E, POINTERS, _attend, _attend_valid, _last_dim_contiguous, _tma_ready,
                            interpreting, unsupported_reason)


@triton.jit
def _step_attention_kernel(Q, K, V, FQ, KO, VO, VALID, S, Z, OUT,
                           s_q_b, s_q_h, s_q_n, s_k_b, s_k_h, s_k_n, s_v_b, s_v_h, s_v_n,
                           s_fq_b, s_fq_h, s_fq_n, s_ko_b, s_ko_h, s_ko_n, s_vo_b, s_vo_h, s_vo_n,
                           s_o_b, s_o_h, s_o_n,
                           n_heads, n_tokens, extra_before, extra_after, overlap_tokens, feature_dim, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, KV_MODE: tl.constexpr):
    """Program (query block, bh): BLOCK_M of the chunk's queries -> their rows of OUT. S [B*H, F, D]
    and Z [B*H, F] are contiguous fp32."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // n_heads
    h32 = bh % n_heads
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_tokens
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_q_b + h * s_q_h + rows[:, None] * s_q_n + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if KV_MODE == 0:
        k_src = K + b * s_k_b + h * s_k_h
        v_src = V + b * s_v_b + h * s_v_h
        ko_src = KO + b * s_ko_b + h * s_ko_h
        vo_src = VO + b * s_vo_b + h * s_vo_h
    else:
        k_src, v_src, ko_src, vo_src = K, V, KO, VO

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The chunk's own frames first: always valid, so the running max is finite before masked blocks.
    video = n_tokens - extra_before - extra_after
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b32, h32, extra_before, video, s_k_n, s_v_n, qk_scale,
                            BLOCK_N, HEAD_DIM, KV_MODE)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b32, h32, 0, extra_before, s_k_n, s_v_n, qk_scale,
                            BLOCK_N, HEAD_DIM, KV_MODE)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b32, h32, n_tokens - extra_after, extra_after,
                            s_k_n, s_v_n, qk_scale, BLOCK_N, HEAD_DIM, KV_MODE)
    acc, l_i, m_i = _attend_valid(acc, l_i, m_i, q, ko_src, vo_src, b32, h32, overlap_tokens, s_ko_n, s_vo_n,
                                  VALID, qk_scale, BLOCK_N, HEAD_DIM, KV_MODE)
    o = acc / l_i[:, None]

    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < feature_dim
    fq = tl.load(FQ + b * s_fq_b + h * s_fq_h + rows[:, None] * s_fq_n + offs_f[None, :],
                 mask=row_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
    bh64 = bh.to(tl.int64)
    s = tl.load(S + bh64 * feature_dim * HEAD_DIM + offs_f[:, None] * HEAD_DIM + offs_d[None, :],
                mask=f_ok[:, None], other=0.0)
    z = tl.load(Z + bh64 * feature_dim + offs_f, mask=f_ok, other=0.0)
    y = (o + tl.dot(fq, s)) / (1.0 + tl.sum(fq * z[None, :], 1))[:, None]
    tl.store(OUT + b * s_o_b + h * s_o_h + rows[:, None] * s_o_n + offs_d[None, :], y.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _step_state_kernel(FK, V, FKO, VO, S_OUT, Z_OUT,
                       s_fk_b, s_fk_h, s_fk_n, s_v_b, s_v_h, s_v_n,
                       s_fko_b, s_fko_h, s_fko_n, s_vo_b, s_vo_h, s_vo_n,
                       n_heads, extra_before, leave, overlap_tokens, feature_dim, rows_per_split,
                       HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program (bh, d-block, split): adds sum over window rows r in [split*R, (split+1)*R) ∩ [0, leave) of
    phi_k(k_r) v_r^T to S_OUT and phi_k(k_r) to Z_OUT (fp32 atomics). Window row r is overlap row r
    for r < overlap_tokens, else chunk video row r - overlap_tokens."""
    bh = tl.program_id(0)
    d_block = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_f = tl.arange(0, BLOCK_F)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = offs_f < feature_dim
    s_acc = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    z_acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    row0 = split * rows_per_split
    stop = tl.minimum(row0 + rows_per_split, leave)
    for r0 in range(row0, stop, BLOCK_T):
        r = r0 + offs_t
        r_ok = r < stop
        in_cache = r_ok & (r < overlap_tokens)
        in_chunk = r_ok & (r >= overlap_tokens)
        cache_row = tl.where(in_cache, r, 0).to(tl.int64)
        chunk_row = (extra_before + tl.where(in_chunk, r - overlap_tokens, 0)).to(tl.int64)
        fk_t = tl.load(FKO + b * s_fko_b + h * s_fko_h + cache_row[None, :] * s_fko_n + offs_f[:, None],
                       mask=f_ok[:, None] & in_cache[None, :], other=0.0)
        fk_t += tl.load(FK + b * s_fk_b + h * s_fk_h + chunk_row[None, :] * s_fk_n + offs_f[:, None],
                        mask=f_ok[:, None] & in_chunk[None, :], other=0.0)                   # [BF, BT]
        v_t = tl.load(VO + b * s_vo_b + h * s_vo_h + cache_row[:, None] * s_vo_n + offs_d[None, :],
                      mask=in_cache[:, None], other=0.0)
        v_t += tl.load(V + b * s_v_b + h * s_v_h + chunk_row[:, None] * s_v_n + offs_d[None, :],
                       mask=in_chunk[:, None], other=0.0)                                    # [BT, BD]
        # 16-bit phi_k and v on tensor cores with fp32 accumulation (fp32 phi_k upcasts v).
        s_acc = tl.dot(fk_t, v_t.to(fk_t.dtype), s_acc)
        z_acc += tl.sum(fk_t.to(tl.float32), 1)
    base = bh.to(tl.int64) * feature_dim
    tl.atomic_add(S_OUT + (base + offs_f[:, None]) * HEAD_DIM + offs_d[None, :], s_acc, mask=f_ok[:, None])
    if d_block == 0:
        tl.atomic_add(Z_OUT + base + offs_f, z_acc, mask=f_ok)


_STEP_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)]]


def _set_step_descriptor_blocks(nargs) -> None:
    """Autotune pre-hook: each host descriptor's block is the config's [1, 1, BLOCK_N, D] tile."""
    for name in ("K", "V", "KO", "VO"):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]


_step_attention_tuned = triton.autotune(
    [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_step_descriptor_blocks)
     for c in _STEP_CONFIGS], key=["HEAD_DIM", "BLOCK_F", "KV_MODE"])(_step_attention_kernel)


def step_unsupported_reason(q, k, v, fq, fk, state) -> str | None:
    """Why the fused step cannot run these inputs (None when it can): the parallel kernel's reasons,
    plus a cache dtype that differs from the chunk's."""
    reason = unsupported_reason(q, k, v, fq, fk)
    if reason is not None:
        return reason
    if state.k_overlap.dtype != k.dtype or state.fk_overlap.dtype != fk.dtype or state.s.dtype != torch.float32:
        return "state dtypes differ from the chunk's (fp32 S, z and the chunk's k, v, phi_k dtypes are needed)"
    return None


def _descriptor(t: torch.Tensor, block_n: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, t.shape[-1]])


def step_attention(q, k, v, fq, state: HybridState, *, extra_before: int, extra_after: int, scale: float,
                   config=None) -> torch.Tensor:
    """Launch 1: the chunk's output [B, H, N, D] (a view of [B, N, H, D] memory) in q's dtype."""
    bsz, heads, n, d = q.shape
    feat = fq.shape[-1]
    out = torch.empty(bsz, n, heads, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    ko, vo = state.k_overlap, state.v_overlap
    valid = state.overlap_valid.view(torch.uint8) if state.overlap_valid.numel() else \
        torch.zeros(1, dtype=torch.uint8, device=q.device)
    kv_mode = HOST_TMA if not interpreting() and all(_tma_ready(t) for t in (k, v, ko, vo)) and ko.shape[2] else POINTERS
    srcs = (k, v, ko, vo)
    if kv_mode == HOST_TMA:
        srcs = tuple(_descriptor(t, config.kwargs["BLOCK_N"] if config else 16) for t in srcs)  # autotune: pre-hook
    args = (q, srcs[0], srcs[1], fq, srcs[2], srcs[3], valid, state.s, state.z, out,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *fq.stride()[:3], *ko.stride()[:3], *vo.stride()[:3],
            *out.stride()[:3], heads, n, extra_before, extra_after, ko.shape[2], feat, scale * LOG2E)
    consts = dict(HEAD_DIM=d, BLOCK_F=max(16, triton.next_power_of_2(feat)), KV_MODE=kv_mode)
    if config is None and interpreting():
        config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})
    if config is None:
        _step_attention_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), bsz * heads)](*args, **consts)
    else:
        _step_attention_kernel[(triton.cdiv(n, config.kwargs["BLOCK_M"]), bsz * heads)](
            *args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def step_state_sums(fk, v, state: HybridState, *, extra_before: int, leave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 2: (S, z) plus the sums over the ``leave`` window rows that move into the state (fp32)."""
    bsz, heads, _, d = v.shape
    feat = fk.shape[-1]
    s, z = state.s.clone(), state.z.clone()
    small = interpreting()
    block_d = min(d, 16 if small else 64)
    block_t = 16 if small else 64
    # Enough programs to fill the GPU: ~4 per SM over (heads, d-blocks, splits).
    splits = 1 if small else max(1, min(triton.cdiv(leave, 4 * block_t), 4 * 132 // (bsz * heads * (d // block_d))))
    rows_per_split = triton.cdiv(triton.cdiv(leave, splits), block_t) * block_t
    fko, vo = state.fk_overlap, state.v_overlap
    _step_state_kernel[(bsz * heads, d // block_d, triton.cdiv(leave, rows_per_split))](
        fk, v, fko, vo, s, z, *fk.stride()[:3], *v.stride()[:3], *fko.stride()[:3], *vo.stride()[:3],
        heads, extra_before, leave, fko.shape[2], feat, rows_per_split,
        HEAD_DIM=d, BLOCK_F=max(16, triton.next_power_of_2(feat)), BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4)
    return s, z


def _window_tail(cache: torch.Tensor, video: torch.Tensor, keep: int) -> torch.Tensor:
    """The last ``keep`` rows of [cache, video] along dim 2, as a new contiguous tensor (never ``video``
    itself: a chunk of exactly ``keep`` rows in contiguous memory -- what Inductor hands the step --
    would otherwise come back as the input, which a custom op must not return)."""
    if video.shape[2] >= keep:
        return video[:, :, video.shape[2] - keep:].clone(memory_format=torch.contiguous_format)
    return torch.cat([cache[:, :, video.shape[2]:], video], dim=2)


def _next_cache(state: HybridState, k, v, fk) -> tuple:
    """(k, v, phi_k overlap caches, overlap_valid) after a step over these video rows: the last
    ``To*M`` rows of [cache, rows], valid where they exist."""
    rows, keep = k.shape[2], state.k_overlap.shape[2]
    valid = state.overlap_valid
    new_valid = valid.new_ones(keep) if rows >= keep else torch.cat([valid[rows:], valid.new_ones(rows)])
    return (*(_window_tail(c, x, keep) for c, x in ((state.k_overlap, k), (state.v_overlap, v),
                                                     (state.fk_overlap, fk))), new_valid)


def hybrid_attention_step_fused(q, k, v, fq, fk, state: HybridState, *, tokens_per_frame: int, chunk_frames: int,
                                extra_before: int, extra_after: int, scale: float):
    """The function of :func:`rehyat_compile.attention.hybrid_attention_step_torch` for validated inputs
    and state (``step_unsupported_reason`` None): returns (y [B, H, N, D] in q's dtype, next state)."""
    n = q.shape[2]
    video = n - extra_before - extra_after
    q, k, v, fq, fk = (_last_dim_contiguous(t) for t in (q, k, v, fq, fk))
    state = HybridState(state.s.contiguous(), state.z.contiguous(), *(_last_dim_contiguous(t) for t in state[2:5]),
                        state.overlap_valid.contiguous())
    y = step_attention(q, k, v, fq, state, extra_before=extra_before, extra_after=extra_after, scale=scale)
    s, z = step_state_sums(fk, v, state, extra_before=extra_before, leave=video)
    body = slice(extra_before, extra_before + video)
    new_state = HybridState(s, z, *_next_cache(state, k[:, :, body], v[:, :, body], fk[:, :, body]))
    return y, _after_chunk(new_state, video // tokens_per_frame, chunk_frames)


def hybrid_attention_steps_fused(q, k, v, fq, fk, state: HybridState, *, tokens_per_frame: int, chunk_frames: int,
                                 overlap_frames: int, scale: float, kv_mode: int | None = None):
    """Several consecutive chunks in one call (:func:`rehyat_compile.attention.hybrid_attention_steps`,
    no extra tokens) on the chunk-parallel kernel: keys [overlap cache, the call's frames] read in place
    from the two sources (no copy), the prefix-state table starting from the carried S, z and the
    cache's frames, chunks from the cache's end, the first chunk's window reading the cache through
    its valid mask. The new S, z are the table's row of
    the frames that leave the window, the new cache the last ``To`` frames. One launch per layer at the
    parallel kernel's rate, instead of one step launch per chunk. Returns (y [B, H, N, D] -- a view of
    [B, N, H, D] memory -- in q's dtype, the state after the last chunk). ``kv_mode``: how the kernel
    reads keys, cache included (``launch_main_kernel``'s; None picks)."""
    from .triton_hybrid import launch_main_kernel, prefix_states
    m = tokens_per_frame
    cache_rows = state.k_overlap.shape[2]
    n = q.shape[2]
    q, k, v, fq, fk = (_last_dim_contiguous(t) for t in (q, k, v, fq, fk))
    k_cache, v_cache, fk_cache = (_last_dim_contiguous(t) for t in state[2:5])
    table = prefix_states(fk, v, tokens_per_frame=m, extra_before=0, frames=n // m, initial=(state.s, state.z),
                          cache=(fk_cache, v_cache))
    bsz, heads, _, d = q.shape
    out = torch.empty(bsz, n, heads, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    launch_main_kernel(q, k, v, fq, table, out, tokens_per_frame=m, chunk_frames=chunk_frames,
                       overlap_frames=overlap_frames, causal=True, extra_before=0, extra_after=0, scale=scale,
                       cache=(k_cache, v_cache, state.overlap_valid), kv_mode=kv_mode)
    feat = fk.shape[-1]
    # row r sums the table's first r frames ([cache, frames]); all but the last To (the new cache) leave
    leave = table[:, n // m]
    s = leave[:, :feat * d].reshape(state.s.shape).clone()
    z = leave[:, feat * d:].reshape(state.z.shape).clone()
    new_state = HybridState(s, z, *_next_cache(state, k, v, fk))
    last = (n // m) % chunk_frames or chunk_frames
    return out, _after_chunk(new_state, last, chunk_frames)
