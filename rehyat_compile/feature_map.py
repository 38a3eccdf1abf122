"""Learnable feature maps phi_q, phi_k of ReHyAt (docs/hybrid_attention.md "Feature maps")."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ShapeError

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "identity": lambda x: x}
POSITIVE = {"softplus": F.softplus, "relu": F.relu,
            # softmax-mimicking (Hedgehog's maps are exp(xW) normalised; the op normalises itself)
            "exp": lambda u: torch.exp(u.clamp(max=30.0))}


class FeatureMap(nn.Module):
    """Per-head two-layer MLP on the head vector, batched over heads as one matmul.

    ``[B, H, N, D] -> [B, H, N, F]``: hidden = act(x W1_h + b1_h); u = hidden W2_h + b2_h; u is split
    into ``degree`` equal parts, part p (1-based) is made non-negative (softplus by default) and
    raised to the power p; the parts are concatenated. ``feature_dim`` must be a multiple of degree.

    Initialisation: W1 ~ N(0, 1/D) and W2 ~ N(0, 1/hidden) (LeCun normal, so pre-activations are
    O(1) whatever the head size), b1 = 0, and b2 = ``init_bias`` (-3): softplus(-3) ~ 0.05 makes
    every linear-attention weight phi_q . phi_k start small, so a freshly converted layer is
    dominated by its softmax window and distillation grows the long-range part from there.
    """

    def __init__(self, heads: int, head_dim: int, feature_dim: int = 64, hidden: int | None = None,
                 degree: int = 2, activation: str = "gelu", positive: str = "softplus",
                 init_bias: float = -3.0):
        super().__init__()
        for name, value in (("heads", heads), ("head_dim", head_dim), ("feature_dim", feature_dim),
                            ("degree", degree)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hidden = head_dim if hidden is None else hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int or None, got {hidden!r}")
        if feature_dim % degree:
            raise ValueError(f"feature_dim ({feature_dim}) must be a multiple of degree ({degree})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if positive not in POSITIVE:
            raise ValueError(f"positive must be one of {sorted(POSITIVE)}, got {positive!r}")
        self.heads, self.head_dim, self.feature_dim = heads, head_dim, feature_dim
        self.hidden, self.degree, self.activation, self.positive = hidden, degree, activation, positive
        self.w1 = nn.Parameter(torch.randn(heads, head_dim, hidden) / math.sqrt(head_dim))
        self.b1 = nn.Parameter(torch.zeros(heads, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(heads, hidden, feature_dim) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.full((heads, 1, feature_dim), float(init_bias)))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
                f"hidden={self.hidden}, degree={self.degree}, activation={self.activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.heads or x.shape[-1] != self.head_dim:
            raise ShapeError(f"FeatureMap input must be [B, H={self.heads}, N, D={self.head_dim}], "
                             f"got {tuple(x.shape)}")
        if x.device.type == "cuda" and torch.compiler.is_dynamo_compiling() and not self._needs_grad(x):
            # torch.compile: one opaque node (``rehyat::feature_map``) that runs the fused kernel, instead
            # of the PyTorch form Inductor would lower to two bmm and element-wise kernels
            return torch.ops.rehyat.feature_map(x, self.w1, self.b1, self.w2, self.b2, self.activation,
                                                self.positive, self.degree)
        if x.device.type == "cuda":  # the fused Triton kernel (kernels/triton_feature_map.py) where it applies
            from .kernels import fused_feature_map_unavailable
            if fused_feature_map_unavailable(self, x) is None:
                from .kernels.triton_feature_map import feature_map_fused
                return feature_map_fused(self, x)
        return self.forward_torch(x)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The map in PyTorch ops (any device, autograd): the reference of the fused kernel."""
        return feature_map_torch(x, self.w1, self.b1, self.w2, self.b2, self.activation, self.positive, self.degree)


def feature_map_torch(x, w1, b1, w2, b2, activation: str, positive: str, degree: int) -> torch.Tensor:
    """:class:`FeatureMap`'s function of its weights, in PyTorch ops."""
    out_dtype = torch.promote_types(x.dtype, w1.dtype)
    h = ACTIVATIONS[activation](x.to(w1.dtype) @ w1 + b1)
    u = POSITIVE[positive](h @ w2 + b2)
    parts = u.chunk(degree, dim=-1)
    return torch.cat([part ** (p + 1) for p, part in enumerate(parts)], dim=-1).to(out_dtype)


class FeatureMapWeights(NamedTuple):
    """A :class:`FeatureMap`'s weights and options as plain values: what the custom op receives, with
    the attributes the fused kernel reads from a module."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    activation: str
    positive: str
    degree: int

    @property
    def hidden(self) -> int:
        return self.w1.shape[-1]

    @property
    def feature_dim(self) -> int:
        return self.w2.shape[-1]

    def parameters(self):
        return iter((self.w1, self.b1, self.w2, self.b2))


@torch.library.custom_op("rehyat::feature_map", mutates_args=())
def _feature_map_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    activation: str, positive: str, degree: int) -> torch.Tensor:
    """``FeatureMap`` under torch.compile (no gradients): the fused kernel where it applies, else the
    PyTorch form. Traced graphs hold one node; the fake below gives its shape."""
    weights = FeatureMapWeights(w1, b1, w2, b2, activation, positive, degree)
    if x.device.type == "cuda":
        from .kernels import fused_feature_map_unavailable
        if fused_feature_map_unavailable(weights, x) is None:
            from .kernels.triton_feature_map import feature_map_fused
            return feature_map_fused(weights, x)
    return feature_map_torch(x, w1, b1, w2, b2, activation, positive, degree).contiguous()


@_feature_map_op.register_fake
def _(x, w1, b1, w2, b2, activation, positive, degree):
    bsz, heads, n, _ = x.shape
    return x.new_empty(bsz, heads, n, w2.shape[-1], dtype=torch.promote_types(x.dtype, w1.dtype))
