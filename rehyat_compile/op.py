"""``rehyat::hybrid_attention`` as a torch.library custom op.

One node in ``torch.export`` graphs, a fake (meta) implementation for symbolic shapes, autograd
through the chunk-parallel PyTorch form, a FLOP formula registered with
``torch.utils.flop_counter`` (the same :func:`hybrid_attention_flops` the cost model uses), and a
decomposition into standard aten ops for backends that cannot take custom ops.
"""
from __future__ import annotations

import sympy
import torch
from torch.utils.flop_counter import register_flop_formula

from .attention import hybrid_attention_chunked, make_layout, resolve_scale, validate_inputs
from .kernels import hybrid_attention_cuda

OP_NAME = "rehyat::hybrid_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def _hybrid_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor,
                         fk: torch.Tensor, tokens_per_frame: int, chunk_frames: int, overlap_frames: int,
                         causal: bool, extra_before: int, extra_after: int, scale: float) -> torch.Tensor:
    out = hybrid_attention_chunked(q, k, v, fq, fk, tokens_per_frame=tokens_per_frame,
                                   chunk_frames=chunk_frames, overlap_frames=overlap_frames, causal=causal,
                                   extra_before=extra_before, extra_after=extra_after, scale=scale,
                                   validate=False)
    return out.contiguous()


@_hybrid_attention_op.register_fake
def _(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before, extra_after,
      scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.layout_args = inputs[5:]


def _backward(ctx, grad):
    tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]
        tpf, tc, to, causal, eb, ea, scale = ctx.layout_args
        out = hybrid_attention_chunked(*leaves, tokens_per_frame=tpf, chunk_frames=tc, overlap_frames=to,
                                       causal=causal, extra_before=eb, extra_after=ea, scale=scale,
                                       validate=False)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
    return tuple(next(grads) if n else None for n in needs) + (None,) * 7


_hybrid_attention_op.register_autograd(_backward, setup_context=_setup_context)
# CUDA: the fused Triton kernel where it applies, else this PyTorch form (kernels/__init__.py).
_hybrid_attention_op.register_kernel("cuda")(hybrid_attention_cuda)


def hybrid_attention(q, k, v, fq, fk, *, tokens_per_frame, chunk_frames, overlap_frames, causal=True,
                     extra_before=0, extra_after=0, scale=None):
    """ReHyAt hybrid attention (REHYAT.md), chunk-parallel. q, k, v: [B,H,N,D]; fq, fk: [B,H,N,F]
    with N = extra_before + frames * tokens_per_frame + extra_after. Returns [B,H,N,D] in q's dtype."""
    layout = make_layout(tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before, extra_after)
    validate_inputs(q, k, v, fq, fk, layout)
    return _hybrid_attention_op(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal,
                                extra_before, extra_after, resolve_scale(scale, q.shape[-1]))


# ---------------------------------------------------------------------------------------------
# FLOP formula: one definition for flop_counter and the cost model
# ---------------------------------------------------------------------------------------------

def _floor_div(a, b):
    return sympy.floor(a / b) if isinstance(a, sympy.Basic) else a // b


def _min(a, b):
    return sympy.Min(a, b) if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic) else min(a, b)


def hybrid_attention_flops(batch, heads, n_tokens, head_dim, feature_dim, *, tokens_per_frame, chunk_frames,
                           overlap_frames, causal=True, extra_before=0, extra_after=0):
    """Matmul FLOPs (a multiply-add is 2) of the hybrid op, counted on the true windows (no padding).

    Softmax: 4*D per (query, key) pair in each video query's window plus extra keys, and for each
    extra query over all N keys. Linear: 2*F*D per video token to build S (twice when non-causal,
    which sums the frames before and after the window separately), 2*F*(D+1) per video token to
    read S and z out. Works on ints or sympy expressions (n_tokens symbolic in frames).
    """
    m, tc, to = tokens_per_frame, chunk_frames, overlap_frames
    extra = extra_before + extra_after
    frames = _floor_div(n_tokens - extra, m)
    full = _floor_div(frames, tc)
    rem = frames - full * tc
    first = _min(tc, frames)
    # sum over chunks of (chunk frames) * (window frames) = sum c_t^2 + To * (frames - c_0)
    pair_frames = full * tc * tc + rem * rem + to * (frames - first)
    video_softmax = 4 * head_dim * (m * m * pair_frames + m * frames * extra)
    extra_softmax = 4 * head_dim * extra * n_tokens
    builds = 1 if causal else 2
    linear = 2 * builds * m * frames * feature_dim * head_dim + 2 * m * frames * feature_dim * (head_dim + 1)
    return batch * heads * (video_softmax + extra_softmax + linear)


@register_flop_formula(torch.ops.rehyat.hybrid_attention)
def _hybrid_attention_flop_formula(q_shape, k_shape, v_shape, fq_shape, fk_shape, tokens_per_frame,
                                   chunk_frames, overlap_frames, causal, extra_before, extra_after, scale,
                                   *args, out_shape=None, **kwargs) -> int:
    bsz, heads, n, d = q_shape
    return hybrid_attention_flops(bsz, heads, n, d, fq_shape[-1], tokens_per_frame=tokens_per_frame,
                                  chunk_frames=chunk_frames, overlap_frames=overlap_frames, causal=causal,
                                  extra_before=extra_before, extra_after=extra_after)


# ---------------------------------------------------------------------------------------------
# Decomposition into standard aten ops
# ---------------------------------------------------------------------------------------------

def decompositions(prefix: str = "cumsum") -> dict:
    """``{op: fn}`` for ``ExportedProgram.run_decompositions``: the custom op becomes the
    chunk-parallel form in aten ops. ``prefix='matmul'`` avoids cumsum (TVM's VM cannot lower it)."""
    if prefix not in ("cumsum", "matmul"):
        raise ValueError(f"prefix must be 'cumsum' or 'matmul', got {prefix!r}")

    def decomposed(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before,
                   extra_after, scale):
        return hybrid_attention_chunked(q, k, v, fq, fk, tokens_per_frame=tokens_per_frame,
                                        chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                        causal=causal, extra_before=extra_before, extra_after=extra_after,
                                        scale=scale, prefix=prefix, validate=False)

    return {torch.ops.rehyat.hybrid_attention.default: decomposed}
