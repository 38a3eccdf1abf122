"""GPU kernels for ``rehyat::hybrid_attention``.

:func:`hybrid_attention_cuda` is the op's CUDA implementation (registered in ``op.py``). It imports
Triton only on the first CUDA call, and falls back to the chunk-parallel
PyTorch form -- with one log line per distinct reason -- where the fused kernel does not apply
(Triton missing, dtype, head dim, feature dim, or ``REHYAT_DISABLE_TRITON=1``). Autograd is the op's
own: the backward recomputes through the PyTorch chunked form, so distillation works either way.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from ..attention import hybrid_attention_chunked

logger = logging.getLogger(__name__)
_logged_reasons: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("rehyat::hybrid_attention on CUDA: fused Triton kernel not used (%s); "
                       "running the chunk-parallel PyTorch form", reason)


def fused_kernel_unavailable(q, k, v, fq, fk) -> str | None:
    """Why the fused kernel will not run these inputs, or None when it will."""
    if os.environ.get("REHYAT_DISABLE_TRITON", "0") not in ("", "0"):
        return "REHYAT_DISABLE_TRITON is set"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from .triton_hybrid import unsupported_reason
    return unsupported_reason(q, k, v, fq, fk)


def hybrid_attention_cuda(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal,
                          extra_before, extra_after, scale):
    """CUDA implementation of the op: the fused Triton kernel, or the PyTorch form with a log line."""
    layout = dict(tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                  causal=causal, extra_before=extra_before, extra_after=extra_after, scale=scale)
    reason = fused_kernel_unavailable(q, k, v, fq, fk)
    if reason is not None:
        _log_fallback_once(reason)
        return hybrid_attention_chunked(q, k, v, fq, fk, validate=False, **layout).contiguous()
    from .triton_hybrid import hybrid_attention_fused
    return hybrid_attention_fused(q, k, v, fq, fk, **layout)

