"""Fused Triton forward of the chunk-parallel hybrid attention (docs/hybrid_attention.md), for CUDA GPUs.

Three launches:

1. :func:`_frame_states_kernel` -- per latent frame f, ``phi_k(k_f)^T v_f`` (F x D) and
   ``sum phi_k(k_f)`` (F), fp32, written to row f+1 of a state table ``[B*H, T+1, F*D + F]``;
2. :func:`_prefix_sum_kernel`   -- an in-place inclusive scan over the frames, so row f holds the sums
   over frames [0, f) (row 0 stays zero);
3. :func:`_hybrid_fwd_kernel`   -- per block of a chunk's queries: flash-style online softmax over
   the extra tokens plus the chunk's window (exp2, fp32 running max/sum, fp32 accumulator), then in
   the same program ``y = (o + phi_q S_t) / (1 + phi_q z_t)`` with S_t, z_t read from the table:
   causal ``P[w_start]``, non-causal ``P[w_start] + P[T] - P[w_stop]``.

The only temporary is the state table, ``(T+1) * (F*D + F) * 4`` bytes per head (about 2.7% of
q, k, v at M=1560, D=128, F=64). Queries of the extra (non-video) tokens attend to every key with
plain softmax, done by ``F.scaled_dot_product_attention`` into the output's rows.

The main loop reads K/V through TMA tensor descriptors where the strides allow (HOST_TMA, the
default on a GPU), else through masked pointer loads. The readout ``phi_q @ S_t`` is an fp32 dot,
TF32 on tensor cores (relative error ~5e-4, under the bf16/fp16 rounding of the output).

Runs on the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors; Triton >= 3.9 under numpy 2.4)
with small fixed blocks, which is how CI without a GPU checks it.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..attention import resolve_scale

LOG2E = 1.0 / math.log(2.0)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_FEATURE_DIM = 128


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tensors, no compilation)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# Linear-attention states
# ---------------------------------------------------------------------------------------------

@triton.jit
def _frame_states_kernel(FK, V, STATES,
                         s_fk_b, s_fk_h, s_fk_n, s_v_b, s_v_h, s_v_n,
                         n_heads, table_frames, first_row, tokens_per_frame, extra_before, feature_dim,
                         HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    """Program (bh, frame, d-block): STATES[bh, first_row + frame + 1] = (phi_k^T v, sum phi_k) of that
    frame (a table of ``table_frames + 1`` rows per head; ``first_row`` > 0 when frames of another
    source -- a recurrent step's overlap cache -- come first)."""
    bh = tl.program_id(0)
    frame = tl.program_id(1)
    d_block = tl.program_id(2)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_f = tl.arange(0, BLOCK_F)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = offs_f < feature_dim
    token0 = (extra_before + frame * tokens_per_frame).to(tl.int64)
    fk_ptrs = FK + b * s_fk_b + h * s_fk_h + (token0 + offs_t)[None, :] * s_fk_n + offs_f[:, None]
    v_ptrs = V + b * s_v_b + h * s_v_h + (token0 + offs_t)[:, None] * s_v_n + offs_d[None, :]
    s_acc = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    z_acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for t0 in range(0, tokens_per_frame, BLOCK_T):
        t_ok = (t0 + offs_t) < tokens_per_frame
        fk_t = tl.load(fk_ptrs, mask=f_ok[:, None] & t_ok[None, :], other=0.0)      # [BF, BT]
        v_t = tl.load(v_ptrs, mask=t_ok[:, None], other=0.0)                          # [BT, BD]
        # fp32 phi_k (allowed by the op) upcasts v; otherwise both stay 16-bit, fp32 accumulate.
        s_acc = tl.dot(fk_t, v_t.to(fk_t.dtype), s_acc)
        z_acc += tl.sum(fk_t.to(tl.float32), 1)
        fk_ptrs += BLOCK_T * s_fk_n
        v_ptrs += BLOCK_T * s_v_n
    row_width = feature_dim * HEAD_DIM + feature_dim
    row = STATES + (bh.to(tl.int64) * (table_frames + 1) + first_row + frame + 1) * row_width
    tl.store(row + offs_f[:, None] * HEAD_DIM + offs_d[None, :], s_acc, mask=f_ok[:, None])
    if d_block == 0:
        tl.store(row + feature_dim * HEAD_DIM + offs_f, z_acc, mask=f_ok)


@triton.jit
def _prefix_sum_kernel(STATES, frames, row_width, BLOCK: tl.constexpr):
    """In place: STATES[bh, f] <- sum of rows 0..f, for f = 1..frames (row 0: zero, or a carried state)."""
    bh = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < row_width
    ptrs = STATES + bh.to(tl.int64) * (frames + 1) * row_width + cols
    running = tl.load(ptrs, mask=ok, other=0.0)
    ptrs += row_width
    for _ in range(0, frames):
        running += tl.load(ptrs, mask=ok, other=0.0)
        tl.store(ptrs, running, mask=ok)
        ptrs += row_width


def prefix_states(fk, v, *, tokens_per_frame: int, extra_before: int, frames: int, initial=None,
                  cache=None) -> torch.Tensor:
    """fp32 table ``[B*H, frames+1, F*D + F]``: row f holds (S, z) summed over video frames [0, f),
    S flattened row-major (F, D) then z (F), plus ``initial`` = (S [B, H, F, D], z [B, H, F]) when given
    (a carried state: the recurrent step over several chunks). ``cache`` = (phi_k, v) [B, H, C, *]:
    C rows (whole frames) that come before fk, v's video frames (a step's overlap cache, read in
    place); the table then has ``C / tokens_per_frame + frames + 1`` rows."""
    bsz, heads, _, d = v.shape
    feat = fk.shape[-1]
    row_width = feat * d + feat
    cache_frames = 0 if cache is None else cache[1].shape[2] // tokens_per_frame
    table_frames = cache_frames + frames
    states = torch.empty(bsz * heads, table_frames + 1, row_width, device=v.device, dtype=torch.float32)
    if initial is None:
        states[:, 0].zero_()
    else:
        states[:, 0, :feat * d] = initial[0].reshape(bsz * heads, feat * d)
        states[:, 0, feat * d:] = initial[1].reshape(bsz * heads, feat)
    small = interpreting()
    block_f = max(16, triton.next_power_of_2(feat))
    block_d = min(d, 16 if small else 64)
    block_t = 16 if small else 64
    sources = [(fk, v, frames, cache_frames, extra_before)]
    if cache_frames:
        sources.append((*cache, cache_frames, 0, 0))
    for fk_src, v_src, n_frames, first_row, before in sources:
        _frame_states_kernel[(bsz * heads, n_frames, d // block_d)](
            fk_src, v_src, states, *fk_src.stride()[:3], *v_src.stride()[:3],
            heads, table_frames, first_row, tokens_per_frame, before, feat,
            HEAD_DIM=d, BLOCK_F=block_f, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4)
    block = 64 if small else 1024
    _prefix_sum_kernel[(bsz * heads, triton.cdiv(row_width, block))](states, table_frames, row_width, BLOCK=block,
                                                                      num_warps=4)
    return states


# ---------------------------------------------------------------------------------------------
# Windowed softmax + linear readout, fused
# ---------------------------------------------------------------------------------------------

# How the main loop reads K/V blocks (a constexpr of the kernel):
POINTERS = 0        # plain masked loads (any layout; the interpreter's path)
HOST_TMA = 1        # host-built 4-D tensor descriptors [B, H, N, D]: TMA bulk copies on Hopper
DEVICE_TMA = 2      # per-program 2-D descriptors of the head, built in the kernel (needs an allocator)


@triton.jit
def _kv_block(src, b, h, row, s_n, valid, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              KV_MODE: tl.constexpr, MASKED: tl.constexpr):
    """Rows [row, row + BLOCK_N) of one head of K or V as a [BLOCK_N, HEAD_DIM] block. Masked
    blocks read zeros outside ``valid``, so nothing outside the key range (not even a NaN) enters."""
    if KV_MODE == 0:
        rows = (row + tl.arange(0, BLOCK_N)).to(tl.int64)
        ptrs = src + rows[:, None] * s_n + tl.arange(0, HEAD_DIM)[None, :]
        if MASKED:
            block = tl.load(ptrs, mask=valid[:, None], other=0.0)
        else:
            block = tl.load(ptrs)
    else:
        if KV_MODE == 1:
            block = src.load([b, h, row, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            block = src.load([row, 0])
        if MASKED:
            block = tl.where(valid[:, None], block, 0.0)
    return block


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, valid, qk_scale, MASKED: tl.constexpr):
    """One online-softmax update (exp2 domain, fp32 running max m_i and sum l_i)."""
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _attend(acc, l_i, m_i, q, k_src, v_src, b, h, key0, n_keys, s_k_n, s_v_n, qk_scale,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KV_MODE: tl.constexpr):
    """Online softmax of q over keys [key0, key0 + n_keys) of head (b, h) (int32). Full blocks run unmasked;
    the one partial block at the end is masked."""
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    valid = tl.full([BLOCK_N], 1, tl.int1)
    for start in range(0, n_full, BLOCK_N):
        k = _kv_block(k_src, b, h, key0 + start, s_k_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, False)
        v = _kv_block(v_src, b, h, key0 + start, s_v_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, False)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, valid, qk_scale, False)
    if n_full < n_keys:
        valid = (n_full + tl.arange(0, BLOCK_N)) < n_keys
        k = _kv_block(k_src, b, h, key0 + n_full, s_k_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, True)
        v = _kv_block(v_src, b, h, key0 + n_full, s_v_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, True)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, valid, qk_scale, True)
    return acc, l_i, m_i


@triton.jit
def _valid_suffix(valid_ptr, n_keys, BLOCK: tl.constexpr):
    """(first, suffix): the number of cache rows before the first valid one, and whether every row from
    there on is valid (the cache fills from its end, so it always is in a stream)."""
    n_valid = 0
    for start in range(0, n_keys, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        n_valid += tl.sum((tl.load(valid_ptr + offs, mask=offs < n_keys, other=0) != 0).to(tl.int32), 0)
    first = n_keys - n_valid
    tail = 0
    for start in range(first, n_keys, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tail += tl.sum((tl.load(valid_ptr + offs, mask=offs < n_keys, other=0) != 0).to(tl.int32), 0)
    return first, tail == n_valid


@triton.jit
def _attend_valid(acc, l_i, m_i, q, k_src, v_src, b, h, n_keys, s_k_n, s_v_n, valid_ptr, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KV_MODE: tl.constexpr):
    """Online softmax of q over keys [0, n_keys) of head (b, h) whose ``valid_ptr`` entry is nonzero.
    Valid rows that form a suffix (every stream's cache) take :func:`_attend`'s pipelined loop over
    that range; any other mask is applied block by block (a block of only valid keys unmasked, one
    with none skipped)."""
    first, suffix = _valid_suffix(valid_ptr, n_keys, 1024)
    if suffix:
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b, h, first, n_keys - first, s_k_n, s_v_n,
                                qk_scale, BLOCK_N, HEAD_DIM, KV_MODE)
    else:
        for start in range(0, n_keys, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            in_range = offs < n_keys
            valid = in_range & (tl.load(valid_ptr + offs, mask=in_range, other=0) != 0)
            n_valid = tl.sum(valid.to(tl.int32), 0)
            if n_valid == BLOCK_N:
                k = _kv_block(k_src, b, h, start, s_k_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, False)
                v = _kv_block(v_src, b, h, start, s_v_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, False)
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, valid, qk_scale, False)
            elif n_valid > 0:
                k = _kv_block(k_src, b, h, start, s_k_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, True)
                v = _kv_block(v_src, b, h, start, s_v_n, valid, BLOCK_N, HEAD_DIM, KV_MODE, True)
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, valid, qk_scale, True)
    return acc, l_i, m_i


@triton.jit
def _hybrid_fwd_kernel(Q, K, V, FQ, STATES, OUT, KC, VC, VALID,
                       s_q_b, s_q_h, s_q_n, s_k_b, s_k_h, s_k_n, s_v_b, s_v_h, s_v_n,
                       s_fq_b, s_fq_h, s_fq_n, s_o_b, s_o_h, s_o_n,
                       s_kc_b, s_kc_h, s_kc_n, s_vc_b, s_vc_h, s_vc_n,
                       n_heads, n_tokens, frames, tokens_per_frame, chunk_frames, overlap_frames,
                       extra_before, extra_after, feature_dim, qk_scale, first_frame,
                       CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_MODE: tl.constexpr,
                       CACHE: tl.constexpr):
    """Program (query block, bh): BLOCK_M video queries of one chunk -> their rows of OUT.
    K, V (and KC, VC) are tensors (KV_MODE 0, 2) or 4-D tensor descriptors (KV_MODE 1). Chunks start
    at frame ``first_frame`` of the state table; Q, FQ, OUT, K and V hold rows from that frame on.
    CACHE: frames [0, first_frame) are a recurrent step's overlap cache, read in place from KC, VC
    (``first_frame * tokens_per_frame`` rows) with its keys masked by VALID (uint8 per row) where a
    chunk's window reaches them (no extra tokens then)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // n_heads                   # descriptor coordinates are int32
    h32 = bh % n_heads
    b = b32.to(tl.int64)                  # pointer offsets are int64
    h = h32.to(tl.int64)
    blocks_per_chunk = tl.cdiv(chunk_frames * tokens_per_frame, BLOCK_M)
    chunk = pid // blocks_per_chunk
    row0 = (pid % blocks_per_chunk) * BLOCK_M
    f_start = first_frame + chunk * chunk_frames
    f_stop = tl.minimum(f_start + chunk_frames, frames)
    rows_here = (f_stop - f_start) * tokens_per_frame
    # Blocks past a short last chunk have nothing to do.
    if row0 < rows_here:
        offs_m = row0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < rows_here
        tokens = (extra_before + f_start * tokens_per_frame + offs_m).to(tl.int64)
        rows = tokens - first_frame * tokens_per_frame          # the same rows of Q, FQ, OUT, K and V
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * s_q_b + h * s_q_h + rows[:, None] * s_q_n + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        cache_rows = first_frame * tokens_per_frame
        if KV_MODE == 0:
            k_src = K + b * s_k_b + h * s_k_h
            v_src = V + b * s_v_b + h * s_v_h
            kc_src = KC + b * s_kc_b + h * s_kc_h
            vc_src = VC + b * s_vc_b + h * s_vc_h
        elif KV_MODE == 1:
            k_src = K
            v_src = V
            kc_src = KC
            vc_src = VC
        else:
            k_src = tl.make_tensor_descriptor(K + b * s_k_b + h * s_k_h, shape=[n_tokens, HEAD_DIM],
                                              strides=[s_k_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
            v_src = tl.make_tensor_descriptor(V + b * s_v_b + h * s_v_h, shape=[n_tokens, HEAD_DIM],
                                              strides=[s_v_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
            if CACHE:
                kc_src = tl.make_tensor_descriptor(KC + b * s_kc_b + h * s_kc_h, shape=[cache_rows, HEAD_DIM],
                                                   strides=[s_kc_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
                vc_src = tl.make_tensor_descriptor(VC + b * s_vc_b + h * s_vc_h, shape=[cache_rows, HEAD_DIM],
                                                   strides=[s_vc_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
            else:  # unused: no zero-row descriptor is ever built
                kc_src = k_src
                vc_src = v_src

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        w_start = tl.maximum(f_start - overlap_frames, 0)
        if CACHE and w_start < first_frame:
            # the chunk's own frames first (always valid: a finite running max), then the cached ones
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b32, h32, 0,
                                    (f_stop - first_frame) * tokens_per_frame, s_k_n, s_v_n, qk_scale,
                                    BLOCK_N, HEAD_DIM, KV_MODE)
            acc, l_i, m_i = _attend_valid(acc, l_i, m_i, q, kc_src, vc_src, b32, h32, cache_rows,
                                          s_kc_n, s_vc_n, VALID, qk_scale, BLOCK_N, HEAD_DIM, KV_MODE)
        else:
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b32, h32,
                                    extra_before + (w_start - first_frame) * tokens_per_frame,
                                    (f_stop - w_start) * tokens_per_frame, s_k_n, s_v_n, qk_scale,
                                    BLOCK_N, HEAD_DIM, KV_MODE)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b32, h32, 0, extra_before, s_k_n, s_v_n, qk_scale,
                                BLOCK_N, HEAD_DIM, KV_MODE)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, b32, h32, n_tokens - extra_after, extra_after,
                                s_k_n, s_v_n, qk_scale, BLOCK_N, HEAD_DIM, KV_MODE)
        o = acc / l_i[:, None]

        # Linear readout with the chunk's fp32 states: S_t (F x D), z_t (F).
        offs_f = tl.arange(0, BLOCK_F)
        f_ok = offs_f < feature_dim
        fq = tl.load(FQ + b * s_fq_b + h * s_fq_h + rows[:, None] * s_fq_n + offs_f[None, :],
                     mask=row_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
        row_width = feature_dim * HEAD_DIM + feature_dim
        table = STATES + bh.to(tl.int64) * (frames + 1) * row_width
        s_ptrs = table + offs_f[:, None] * HEAD_DIM + offs_d[None, :]
        z_ptrs = table + feature_dim * HEAD_DIM + offs_f
        s = tl.load(s_ptrs + w_start * row_width, mask=f_ok[:, None], other=0.0)
        z = tl.load(z_ptrs + w_start * row_width, mask=f_ok, other=0.0)
        if not CAUSAL:
            # Frames after the window: total minus the prefix up to the window's end.
            s += tl.load(s_ptrs + frames * row_width, mask=f_ok[:, None], other=0.0)
            s -= tl.load(s_ptrs + f_stop * row_width, mask=f_ok[:, None], other=0.0)
            z += tl.load(z_ptrs + frames * row_width, mask=f_ok, other=0.0)
            z -= tl.load(z_ptrs + f_stop * row_width, mask=f_ok, other=0.0)
        num = o + tl.dot(fq, s)
        den = 1.0 + tl.sum(fq * z[None, :], 1)
        y = num / den[:, None]
        tl.store(OUT + b * s_o_b + h * s_o_h + rows[:, None] * s_o_n + offs_d[None, :],
                 y.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def _set_descriptor_blocks(nargs) -> None:
    """Autotune pre-hook: a host descriptor's block is the config's [1, 1, BLOCK_N, D] tile."""
    for name in ("K", "V", "KC", "VC"):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]


_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_descriptor_blocks)
    # The three best of a 21-config sweep on an H200 (Wan2.1 shapes); few, since each compiles.
    for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)]
]
_hybrid_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["HEAD_DIM", "BLOCK_F", "CAUSAL", "KV_MODE", "CACHE"])(
    _hybrid_fwd_kernel)


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiples for every stride but the last."""
    return t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])


def _device_descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def launch_main_kernel(q, k, v, fq, states, out, *, tokens_per_frame, chunk_frames, overlap_frames, causal,
                       extra_before, extra_after, scale, kv_mode=None, config=None, cache=None) -> None:
    """Run :func:`_hybrid_fwd_kernel` into ``out``. kv_mode None picks HOST_TMA on a GPU when the
    strides allow it, else POINTERS; config None autotunes (fixed 16x16 blocks when interpreting).
    ``cache`` = (k_cache, v_cache [B, H, C, D], valid bool [C]): C rows (whole frames) of an overlap
    cache before k, v's frames, read in place; the state table starts with the cache's frames, and
    chunks start after them (the recurrent step over several chunks). C = 0 runs as no cache."""
    bsz, heads, _, d = q.shape
    n = k.shape[2]
    feat = fq.shape[-1]
    # an empty cache (overlap_frames = 0) is no cache: no zero-row tensor reaches a TMA descriptor
    k_cache, v_cache, cache_valid = (k, v, None) if cache is None or not cache[2].numel() else cache
    first_frame = 0 if cache_valid is None else cache_valid.numel() // tokens_per_frame
    frames = first_frame + (n - extra_before - extra_after) // tokens_per_frame
    n_chunks = -(-(frames - first_frame) // chunk_frames)
    chunk_rows = chunk_frames * tokens_per_frame
    sources = (k, v, k_cache, v_cache)
    if kv_mode is None:
        kv_mode = HOST_TMA if not interpreting() and all(_tma_ready(t) for t in sources) else POINTERS
    srcs = sources
    if kv_mode == HOST_TMA:
        block_n = config.kwargs["BLOCK_N"] if config else 16
        srcs = tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, d]) for t in sources)
    elif kv_mode == DEVICE_TMA:
        triton.set_allocator(_device_descriptor_scratch)
    has_cache = first_frame > 0
    valid = cache_valid.view(torch.uint8) if has_cache else torch.zeros(1, dtype=torch.uint8, device=q.device)
    args = (q, srcs[0], srcs[1], fq, states, out, srcs[2], srcs[3], valid, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *fq.stride()[:3], *out.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
            heads, n, frames, tokens_per_frame, chunk_frames, overlap_frames,
            extra_before, extra_after, feat, scale * LOG2E, first_frame)
    consts = dict(CAUSAL=causal, HEAD_DIM=d, BLOCK_F=max(16, triton.next_power_of_2(feat)), KV_MODE=kv_mode,
                  CACHE=has_cache)
    if config is None and interpreting():
        config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})
    if config is None:
        def grid(meta):
            return (n_chunks * triton.cdiv(chunk_rows, meta["BLOCK_M"]), bsz * heads)
        _hybrid_fwd_tuned[grid](*args, **consts)
    else:
        grid = (n_chunks * triton.cdiv(chunk_rows, config.kwargs["BLOCK_M"]), bsz * heads)
        _hybrid_fwd_kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps,
                                 num_stages=config.num_stages)


def unsupported_reason(q, k, v, fq, fk) -> str | None:
    """Why the fused kernel cannot run these inputs (None when it can). Layout validity is the
    op's job; this checks only what the kernel itself needs."""
    if not interpreting() and q.device.type != "cuda":
        return f"inputs are on {q.device.type}, the kernel needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the kernel takes float16/bfloat16 q, k, v)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS})"
    if fq.shape[-1] > MAX_FEATURE_DIM:
        return f"feature_dim {fq.shape[-1]} > {MAX_FEATURE_DIM}"
    return None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def hybrid_attention_fused(q, k, v, fq, fk, *, tokens_per_frame: int, chunk_frames: int,
                           overlap_frames: int, causal: bool = True, extra_before: int = 0,
                           extra_after: int = 0, scale: float | None = None, kv_mode: int | None = None
                           ) -> torch.Tensor:
    """Forward of ``rehyat::hybrid_attention`` with the fused kernel: the function of
    :func:`rehyat_compile.attention.hybrid_attention_chunked`, for inputs the op has validated and
    :func:`unsupported_reason` accepts. Returns [B, H, N, D] in q's dtype, its memory [B, N, H, D].
    ``kv_mode`` (POINTERS, HOST_TMA, DEVICE_TMA) overrides how the main loop reads K and V."""
    scale = resolve_scale(scale, q.shape[-1])
    q, k, v, fq, fk = (_last_dim_contiguous(t) for t in (q, k, v, fq, fk))
    bsz, heads, n, d = q.shape
    frames = (n - extra_before - extra_after) // tokens_per_frame
    states = prefix_states(fk, v, tokens_per_frame=tokens_per_frame, extra_before=extra_before, frames=frames)
    # [B, N, H, D] memory: the model's transpose(1, 2).reshape after attention is then free
    out = torch.empty(bsz, n, heads, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    launch_main_kernel(q, k, v, fq, states, out, tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames,
                       overlap_frames=overlap_frames, causal=causal, extra_before=extra_before,
                       extra_after=extra_after, scale=scale, kv_mode=kv_mode)

    # Extra-token queries: plain softmax over every key.
    if extra_before:
        out[:, :, :extra_before] = F.scaled_dot_product_attention(q[:, :, :extra_before], k, v, scale=scale)
    if extra_after:
        out[:, :, n - extra_after:] = F.scaled_dot_product_attention(q[:, :, n - extra_after:], k, v,
                                                                      scale=scale)
    return out
