"""The fused Triton feature map against FeatureMap.forward_torch (interpreter on CPU, compiled on a GPU)."""
import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported: @triton.jit reads it
pytest.importorskip("triton")

from rehyat_compile.feature_map import FeatureMap  # noqa: E402
from test_triton_hybrid import interpreter_bf16_dot  # noqa: E402,F401  (autouse fixture)

triton_feature_map = importlib.import_module("rehyat_compile.kernels.triton_feature_map")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("activation,positive,degree,hidden,feat", [
    ("gelu", "softplus", 2, 16, 16), ("relu", "relu", 1, 32, 16), ("silu", "exp", 2, 16, 32),
    ("identity", "softplus", 4, 24, 16)])   # hidden 24: a masked (padded) hidden block
@pytest.mark.parametrize("tokens", [20, 70])   # 70: 5 blocks over 2 programs a head, the last one partial
def test_fused_feature_map_equals_torch_form(activation, positive, degree, hidden, feat, tokens):
    torch.manual_seed(0)
    fmap = FeatureMap(2, 16, feat, hidden=hidden, degree=degree, activation=activation, positive=positive,
                      init_bias=0.0).to(DEVICE, torch.float16)
    x = torch.randn(1, tokens, 2, 16, device=DEVICE, dtype=torch.float16).transpose(1, 2)   # [B,N,H,D] memory
    with torch.no_grad():
        got = triton_feature_map.feature_map_fused(fmap, x)
        ref = fmap.forward_torch(x.float()) if DEVICE == "cpu" else fmap.float().forward_torch(x.float())
    assert got.shape == (1, 2, tokens, feat) and got.dtype == torch.float16
    assert (got >= 0).all()
    assert _rel(got, ref) < 5e-3


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_feature_map_dispatches_to_fused_without_gradients():
    fmap = FeatureMap(12, 128, 64).to("cuda", torch.bfloat16)
    x = torch.randn(1, 12, 4680, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = fmap(x)
        ref = fmap.forward_torch(x)
    assert _rel(fused, ref) < 1e-2
    y = fmap(x.requires_grad_())          # with gradients: the PyTorch form, which autograd can follow
    assert y.grad_fn is not None
