"""Fused Triton forward of :class:`rehyat_compile.feature_map.FeatureMap` for CUDA GPUs: one launch.

Per block of tokens of one head: ``u = pos(act(x W1_h + b1_h) W2_h + b2_h)``, part p of the F outputs
raised to the power p, written once -- instead of ~10 launches with a [B, H, N, hidden] and several
[B, H, N, F] temporaries in memory. Both products run on tensor cores (16-bit operands, fp32
accumulation); the hidden layer and the powers stay in fp32 registers, so the result differs from the
PyTorch form only by that form's 16-bit rounding of its temporaries. x is read by strides (the
model's [B, N, H, D] seen as [B, H, N, D]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_hybrid import SUPPORTED_HEAD_DIMS, interpreting

ACTIVATION_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}
POSITIVE_CODES = {"softplus": 0, "relu": 1, "exp": 2}
MAX_WIDTH = 128


@triton.jit
def _feature_map_kernel(X, W1, B1, W2, B2, OUT, s_x_b, s_x_h, s_x_n, s_o_b, s_o_h, s_o_n,
                        n_heads, n_tokens, hidden, feature_dim, size_class,
                        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
                        BLOCK_T: tl.constexpr, DEGREE: tl.constexpr, ACT: tl.constexpr, POS: tl.constexpr,
                        PROGRAMS_PER_SM: tl.constexpr):
    """Program (p, bh) of a (P, B*H) grid: token blocks p, p + P, p + 2P, ... of head bh -> their OUT
    rows. The head's weights are loaded once per program and the blocks' loads pipelined across the
    loop (a persistent program per share of the head, not one program per block: each block alone is
    too little work to hide its load latency). W1 [H, D, hidden], B1 [H, hidden], W2 [H, hidden, F],
    B2 [H, F] contiguous. ``size_class`` (the token count's bit length) is only the autotune key: a
    step's 4,680 tokens and a whole video's 32,760 want different grids."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, BLOCK_F)
    h_ok = offs_h < hidden
    f_ok = offs_f < feature_dim
    w1 = tl.load(W1 + h * HEAD_DIM * hidden + offs_d[:, None] * hidden + offs_h[None, :], mask=h_ok[None, :],
                 other=0.0)
    b1 = tl.load(B1 + h * hidden + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    w2 = tl.load(W2 + h * hidden * feature_dim + offs_h[:, None] * feature_dim + offs_f[None, :],
                 mask=h_ok[:, None] & f_ok[None, :], other=0.0)
    b2 = tl.load(B2 + h * feature_dim + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    power = (offs_f // (feature_dim // DEGREE) + 1)[None, :]   # part p (1-based) of the features
    x_base = X + b * s_x_b + h * s_x_h
    o_base = OUT + b * s_o_b + h * s_o_h
    for block in tl.range(pid, tl.cdiv(n_tokens, BLOCK_T), n_programs):
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_tokens
        x = tl.load(x_base + rows.to(tl.int64)[:, None] * s_x_n + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        a = tl.dot(x.to(w1.dtype), w1) + b1[None, :]
        if ACT == 1:
            a = tl.maximum(a, 0.0)
        elif ACT == 2:
            a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
        elif ACT == 3:
            a = a / (1.0 + tl.exp(-a))
        u = tl.dot(a.to(w2.dtype), w2) + b2[None, :]
        if POS == 0:
            u = tl.where(u > 20.0, u, tl.log(1.0 + tl.exp(tl.minimum(u, 20.0))))   # softplus, threshold 20
        elif POS == 1:
            u = tl.maximum(u, 0.0)
        else:
            u = tl.exp(tl.minimum(u, 30.0))
        y = u
        for p in tl.static_range(1, DEGREE):
            y = tl.where(power > p, y * u, y)
        tl.store(o_base + rows.to(tl.int64)[:, None] * s_o_n + offs_f[None, :], y.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & f_ok[None, :])


def feature_map_unsupported_reason(fmap, x: torch.Tensor) -> str | None:
    """Why the fused feature map cannot run (None when it can)."""
    if not interpreting() and x.device.type != "cuda":
        return f"input on {x.device.type}"
    if fmap.w1.dtype not in (torch.float16, torch.bfloat16) or x.dtype not in (torch.float16, torch.bfloat16):
        return f"dtypes {x.dtype} / {fmap.w1.dtype} (16-bit input and weights)"
    if x.shape[-1] not in SUPPORTED_HEAD_DIMS or fmap.hidden > MAX_WIDTH or fmap.feature_dim > MAX_WIDTH:
        return f"head dim {x.shape[-1]}, hidden {fmap.hidden}, features {fmap.feature_dim}"
    if fmap.activation not in ACTIVATION_CODES or fmap.positive not in POSITIVE_CODES:
        return f"activation {fmap.activation} / {fmap.positive}"
    return None


# Token block x programs per SM x warps x stages. History (Wan2.1 shapes, 32760 tokens, H200): one
# fixed config (64 tokens, 4 warps, one program per block) 204 us a call; autotuned, one program per
# block, 186 us (benchmarks/results/wan_step_profile_h200.txt): 5x the time its 150 MB take at memory speed.
_CONFIGS = [triton.Config({"BLOCK_T": t, "PROGRAMS_PER_SM": p}, num_warps=w, num_stages=st)
            for t, p, w, st in [(64, 4, 4, 3), (128, 2, 4, 3), (128, 2, 8, 3), (128, 4, 8, 2), (64, 8, 4, 4),
                                (32, 8, 4, 4)]]
_feature_map_tuned = triton.autotune(_CONFIGS, key=["HEAD_DIM", "BLOCK_H", "BLOCK_F", "DEGREE", "ACT", "POS",
                                                    "size_class"])(_feature_map_kernel)


def programs_per_head(n_tokens: int, block_t: int, bh: int, sm_count: int, programs_per_sm: int) -> int:
    """Programs per (batch, head) of the persistent grid: enough for ``programs_per_sm`` on every SM,
    never more than the head has token blocks."""
    return max(1, min(triton.cdiv(n_tokens, block_t), triton.cdiv(sm_count * programs_per_sm, bh)))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def feature_map_fused(fmap, x: torch.Tensor) -> torch.Tensor:
    """``fmap(x)`` in one launch, for inputs ``feature_map_unsupported_reason`` accepts (autotuned token
    block and persistent grid on a GPU; 16-token blocks, two programs a head, in the interpreter)."""
    bsz, heads, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out_dtype = torch.promote_types(x.dtype, fmap.w1.dtype)
    out = torch.empty(bsz, heads, n, fmap.feature_dim, device=x.device, dtype=out_dtype)
    w1, w2 = fmap.w1.contiguous(), fmap.w2.contiguous()
    args = (x, w1, fmap.b1.contiguous(), w2, fmap.b2.contiguous(), out, *x.stride()[:3], *out.stride()[:3],
            heads, n, fmap.hidden, fmap.feature_dim, n.bit_length())
    consts = dict(HEAD_DIM=d, BLOCK_H=max(16, triton.next_power_of_2(fmap.hidden)),
                  BLOCK_F=max(16, triton.next_power_of_2(fmap.feature_dim)), DEGREE=fmap.degree,
                  ACT=ACTIVATION_CODES[fmap.activation], POS=POSITIVE_CODES[fmap.positive])
    if interpreting():   # 2 programs a head: the loop over a program's blocks runs more than once
        _feature_map_kernel[(min(2, triton.cdiv(n, 16)), bsz * heads)](*args, **consts, BLOCK_T=16,
                                                                        PROGRAMS_PER_SM=1, num_warps=4)
    else:
        sms = _sm_count(x.device)
        _feature_map_tuned[lambda meta: (programs_per_head(n, meta["BLOCK_T"], bsz * heads, sms,
                                                           meta["PROGRAMS_PER_SM"]), bsz * heads)](*args, **consts)
    return out
