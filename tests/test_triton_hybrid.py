"""The fused Triton kernel of rehyat::hybrid_attention against the O(N^2) reference.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) on small
shapes; with one, the same tests run compiled, plus the `gpu` tests at Wan2.1-1.3B sizes.
"""
import importlib
import logging
import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton_hybrid is imported: @triton.jit reads it at decoration.
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import rehyat_compile as rc  # noqa: E402
from rehyat_compile import kernels  # noqa: E402

triton_hybrid = importlib.import_module("rehyat_compile.kernels.triton_hybrid")
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits (3.9.0);
    give it the float32 values, as the GPU's tensor cores do."""
    if not triton_hybrid.interpreting():
        return
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def as_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, as_f32(a), as_f32(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _inputs(bsz, heads, frames, m, d, feat, dtype, feat_dtype=None, extra_before=0, extra_after=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = extra_before + frames * m + extra_after
    q, k, v = (torch.randn(bsz, heads, n, d, generator=gen).to(DEVICE, dtype) for _ in range(3))
    # Feature maps are non-negative (docs/hybrid_attention.md "Decision (positivity)").
    fq, fk = (torch.rand(bsz, heads, n, feat, generator=gen).to(DEVICE, feat_dtype or dtype) for _ in range(2))
    return q, k, v, fq, fk


def _rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _reference64(q, k, v, fq, fk, **layout):
    return rc.hybrid_attention_reference(*(t.double().cpu() for t in (q, k, v, fq, fk)), **layout)


CASES = [
    # dtype, causal, extra_before, extra_after, feature_dim, feature dtype
    (torch.float16, True, 0, 0, 16, None),
    (torch.float16, False, 3, 2, 16, None),
    (torch.bfloat16, True, 3, 0, 8, None),          # F=8 padded to the 16-wide block
    (torch.bfloat16, False, 0, 2, 16, torch.float32),
    (torch.bfloat16, True, 0, 0, 16, None),
]


@pytest.mark.parametrize("dtype,causal,extra_before,extra_after,feat,feat_dtype", CASES)
def test_fused_matches_reference(dtype, causal, extra_before, extra_after, feat, feat_dtype):
    # M=12, Tc=2: 24 queries a chunk (a full and a partial 16-row block in the interpreter), window
    # of 36 keys (a partial key block), 5 frames (a short last chunk).
    layout = dict(tokens_per_frame=12, chunk_frames=2, overlap_frames=1, causal=causal,
                  extra_before=extra_before, extra_after=extra_after)
    q, k, v, fq, fk = _inputs(1, 2, 5, 12, 16, feat, dtype, feat_dtype, extra_before, extra_after)
    out = triton_hybrid.hybrid_attention_fused(q, k, v, fq, fk, scale=0.25, **layout)
    ref = _reference64(q, k, v, fq, fk, **layout)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert _rel_err(out, ref) < (3e-3 if dtype == torch.float16 else 1e-2)


def test_fused_takes_strided_views_and_no_overlap():
    # Diffusers hands attention [B, N, H, D] tensors transposed to [B, H, N, D]: not contiguous.
    layout = dict(tokens_per_frame=8, chunk_frames=2, overlap_frames=0, causal=True)
    q, k, v, fq, fk = (t.transpose(1, 2).contiguous().transpose(1, 2)
                       for t in _inputs(2, 2, 4, 8, 32, 16, torch.float16))
    assert not q.is_contiguous()
    out = triton_hybrid.hybrid_attention_fused(q, k, v, fq, fk, scale=32 ** -0.5, **layout)
    assert _rel_err(out, _reference64(q, k, v, fq, fk, **layout)) < 3e-3


@pytest.mark.parametrize("kv_mode", [triton_hybrid.POINTERS, triton_hybrid.HOST_TMA, triton_hybrid.DEVICE_TMA])
def test_every_kv_load_mode_matches_reference(kv_mode):
    layout = dict(tokens_per_frame=12, chunk_frames=2, overlap_frames=1, causal=False, extra_before=3,
                  extra_after=2)
    q, k, v, fq, fk = _inputs(1, 2, 5, 12, 16, 16, torch.float16, extra_before=3, extra_after=2, seed=1)
    out = triton_hybrid.hybrid_attention_fused(q, k, v, fq, fk, scale=0.25, kv_mode=kv_mode, **layout)
    assert _rel_err(out, _reference64(q, k, v, fq, fk, **layout)) < 3e-3


def test_one_chunk_over_the_video_is_softmax_attention():
    layout = dict(tokens_per_frame=8, chunk_frames=4, overlap_frames=2, causal=True)
    q, k, v, fq, fk = _inputs(1, 1, 3, 8, 16, 16, torch.float16)
    out = triton_hybrid.hybrid_attention_fused(q, k, v, fq, fk, scale=0.25, **layout)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.25, -1) @ v.double()
    assert _rel_err(out, ref) < 3e-3


def test_prefix_states_are_sums_over_earlier_frames():
    q, k, v, fq, fk = _inputs(1, 2, 4, 12, 16, 16, torch.float16, extra_before=5)
    table = triton_hybrid.prefix_states(fk, v, tokens_per_frame=12, extra_before=5, frames=4)
    fk_f = fk[:, :, 5:].double().reshape(1, 2, 4, 12, 16)
    v_f = v[:, :, 5:].double().reshape(1, 2, 4, 12, 16)
    per_frame_s = (fk_f.transpose(-1, -2) @ v_f).flatten(-2)                   # [1,2,4,F*D]
    per_frame = torch.cat([per_frame_s, fk_f.sum(3)], -1).reshape(2, 4, -1)
    expected = torch.cat([torch.zeros(2, 1, per_frame.shape[-1], dtype=torch.float64),
                          per_frame.cumsum(1).cpu()], 1)
    assert table.dtype == torch.float32 and table.shape == expected.shape
    torch.testing.assert_close(table.double().cpu(), expected, rtol=1e-5, atol=1e-4)


def test_unsupported_inputs_name_the_reason(monkeypatch):
    q, k, v, fq, fk = _inputs(1, 1, 2, 4, 16, 16, torch.float16)
    assert kernels.fused_kernel_unavailable(q, k, v, fq, fk) is None
    assert "dtype" in kernels.fused_kernel_unavailable(q.float(), k.float(), v.float(), fq.float(), fk.float())
    q96 = torch.zeros(1, 1, 8, 96, dtype=torch.float16, device=DEVICE)
    assert "head_dim 96" in kernels.fused_kernel_unavailable(q96, q96, q96, fq, fk)
    f256 = torch.zeros(1, 1, 8, 256, dtype=torch.float16, device=DEVICE)
    assert "feature_dim 256" in kernels.fused_kernel_unavailable(q, k, v, f256, f256)
    monkeypatch.setenv("REHYAT_DISABLE_TRITON", "1")
    assert "REHYAT_DISABLE_TRITON" in kernels.fused_kernel_unavailable(q, k, v, fq, fk)


def test_fallback_runs_pytorch_form_with_a_log_line(caplog):
    layout = dict(tokens_per_frame=4, chunk_frames=1, overlap_frames=1, causal=True, extra_before=0,
                  extra_after=0, scale=0.25)
    q, k, v, fq, fk = (t.float() for t in _inputs(1, 1, 3, 4, 16, 16, torch.float16))
    kernels._logged_reasons.discard("dtype torch.float32 (the kernel takes float16/bfloat16 q, k, v)")
    with caplog.at_level(logging.WARNING, logger="rehyat_compile.kernels"):
        out = kernels.hybrid_attention_cuda(q, k, v, fq, fk, *layout.values())
    assert "fused Triton kernel not used (dtype torch.float32" in caplog.text
    torch.testing.assert_close(out, rc.hybrid_attention_chunked(q, k, v, fq, fk, **layout))


def test_op_has_a_cuda_kernel_and_keeps_the_pytorch_path_elsewhere():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rehyat::hybrid_attention", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("rehyat::hybrid_attention", "CPU")


# ---------------------------------------------------------------------------------------------
# On the GPU, at Wan2.1-1.3B attention sizes (12 heads x 128, 1560 tokens a frame, Tc=3, To=1, F=64)
# ---------------------------------------------------------------------------------------------

WAN = dict(tokens_per_frame=1560, chunk_frames=3, overlap_frames=1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,causal,extra_before,extra_after", [
    (torch.bfloat16, True, 0, 0), (torch.bfloat16, False, 0, 0), (torch.float16, True, 0, 0),
    (torch.bfloat16, True, 77, 0), (torch.bfloat16, False, 0, 226)])
def test_op_on_cuda_matches_fp32_chunked_at_wan_size(dtype, causal, extra_before, extra_after):
    layout = dict(WAN, causal=causal, extra_before=extra_before, extra_after=extra_after)
    q, k, v, fq, fk = _inputs(1, 12, 8, 1560, 128, 64, dtype, extra_before=extra_before,
                              extra_after=extra_after)
    out = rc.hybrid_attention(q, k, v, fq, fk, **layout)                      # dispatches to the kernel
    ref = rc.hybrid_attention_chunked(*(t.float() for t in (q, k, v, fq, fk)), **layout)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < (3e-3 if dtype == torch.float16 else 1e-2)


@pytest.mark.gpu
@gpu
def test_gradients_flow_through_the_cuda_op():
    layout = dict(tokens_per_frame=64, chunk_frames=2, overlap_frames=1, causal=True)
    leaves = [t.requires_grad_() for t in _inputs(1, 2, 5, 64, 64, 32, torch.float32)]
    halves = [t.detach().bfloat16().requires_grad_() for t in leaves]
    out = rc.hybrid_attention(*halves, **layout)
    out.float().square().sum().backward()
    ref = rc.hybrid_attention_reference(*leaves, **layout)
    ref.square().sum().backward()
    for half, leaf in zip(halves, leaves):
        assert _rel_err(half.grad, leaf.grad) < 3e-2

