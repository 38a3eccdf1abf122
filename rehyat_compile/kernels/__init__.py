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


def _log_fallback_once(reason: str, what: str = "rehyat::hybrid_attention",
                       instead: str = "chunk-parallel PyTorch form") -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("%s on CUDA: fused Triton kernel not used (%s); running the %s", what, reason, instead)


def fused_kernel_unavailable(q, k, v, fq, fk) -> str | None:
    """Why the fused kernel will not run these inputs, or None when it will."""
    if os.environ.get("REHYAT_DISABLE_TRITON", "0") not in ("", "0"):
        return "REHYAT_DISABLE_TRITON is set"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from .triton_hybrid import unsupported_reason
    return unsupported_reason(q, k, v, fq, fk)


def _traced(t: torch.Tensor) -> bool:
    """True under torch.compile, export or make_fx (fake/functional tensors, a proxy mode): the traced
    graph must hold PyTorch ops, never a Triton launch."""
    return (torch.compiler.is_compiling() or type(t) not in (torch.Tensor, torch.nn.Parameter)
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


def fused_step_unavailable(q, k, v, fq, fk, state) -> str | None:
    """Why ``rc.hybrid_attention_step`` will not run the fused Triton step here (None when it will):
    tracing and autograd take the PyTorch form silently; kernel limits are logged once."""
    if _traced(q):
        return "traced"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, fq, fk, *state)):
        return "gradients needed"
    reason = fused_kernel_unavailable(q, k, v, fq, fk)
    if reason is None:
        from .triton_step import step_unsupported_reason
        reason = step_unsupported_reason(q, k, v, fq, fk, state)
    if reason is not None:
        _log_fallback_once(reason, "rc.hybrid_attention_step", "PyTorch step")
    return reason


def fused_feature_map_unavailable(fmap, x) -> str | None:
    """Why a :class:`~rehyat_compile.feature_map.FeatureMap` call will not run the fused Triton kernel
    (None when it will); tracing and autograd take the PyTorch form silently."""
    if _traced(x):
        return "traced"
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in fmap.parameters())):
        return "gradients needed"
    if os.environ.get("REHYAT_DISABLE_TRITON", "0") not in ("", "0"):
        return "REHYAT_DISABLE_TRITON is set"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from .triton_feature_map import feature_map_unsupported_reason
    reason = feature_map_unsupported_reason(fmap, x)
    if reason is not None:
        _log_fallback_once(reason, "FeatureMap", "PyTorch form")
    return reason


def hybrid_attention_cuda(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal,
                          extra_before, extra_after, scale):
    """CUDA implementation of the op: the fused Triton kernel, or the PyTorch form with a log line."""
    layout = dict(tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                  causal=causal, extra_before=extra_before, extra_after=extra_after, scale=scale)
    reason = fused_kernel_unavailable(q, k, v, fq, fk)
    if reason is not None:
        _log_fallback_once(reason)
        from ..op import as_bnhd
        return as_bnhd(hybrid_attention_chunked(q, k, v, fq, fk, validate=False, **layout))
    from .triton_hybrid import hybrid_attention_fused
    return hybrid_attention_fused(q, k, v, fq, fk, **layout)

