"""The op on a CUDA device agrees with the CPU definition (skipped without a GPU)."""
import pytest
import torch

import rehyat_compile as rc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("frames,tc,to,extra", [(7, 3, 1, 0), (9, 2, 2, 5), (4, 5, 0, 3)])
def test_cuda_matches_cpu_definition(dtype, tol, causal, frames, tc, to, extra):
    m, h, d, f = 40, 4, 64, 32
    n = extra + frames * m
    gen = torch.Generator().manual_seed(frames * 10 + tc)
    q, k, v = (torch.randn(2, h, n, d, generator=gen).to(dtype) for _ in range(3))
    fq, fk = (torch.rand(2, h, n, f, generator=gen).to(dtype) * 0.2 for _ in range(2))
    layout = dict(tokens_per_frame=m, chunk_frames=tc, overlap_frames=to, causal=causal, extra_before=extra)
    ref = rc.hybrid_attention_reference(*(x.float() for x in (q, k, v, fq, fk)), **layout)
    out = rc.hybrid_attention(*(x.cuda() for x in (q, k, v, fq, fk)), **layout)
    torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)
