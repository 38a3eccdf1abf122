"""The fused Triton recurrent step against the PyTorch step (rc.attention.hybrid_attention_step_torch).

Without a GPU the kernels run in Triton's interpreter on tiny shapes; with one, the same tests run
compiled, plus `gpu` tests at Wan2.1-1.3B sizes and the dispatch of rc.hybrid_attention_step.
"""
import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton_step is imported: @triton.jit reads it
pytest.importorskip("triton")

import rehyat_compile as rc  # noqa: E402
from rehyat_compile.attention import hybrid_attention_step_torch  # noqa: E402
from test_triton_hybrid import interpreter_bf16_dot  # noqa: E402,F401  (autouse fixture)

triton_step = importlib.import_module("rehyat_compile.kernels.triton_step")
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _chunks(frame_counts, m, heads, d, feat, dtype, extra_before=0, extra_after=0, strided=False, seed=0):
    """One (q, k, v, fq, fk) per chunk of the given frame counts; strided: [B, N, H, D] memory."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for frames in frame_counts:
        n = extra_before + frames * m + extra_after
        qkv = [torch.randn(1, heads, n, d, generator=gen) for _ in range(3)]
        feats = [torch.rand(1, heads, n, feat, generator=gen) for _ in range(2)]
        tensors = [t.to(DEVICE, dtype) for t in qkv + feats]
        if strided:
            tensors = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors]
        out.append(tensors)
    return out


def _run(step, chunks, **layout):
    """Outputs and states of ``step`` over consecutive chunks, from the initial state."""
    state, outs, states = None, [], []
    for tensors in chunks:
        y, state = step(*tensors, state, **layout)
        outs.append(y)
        states.append(state)
    return outs, states


def _fused(q, k, v, fq, fk, state, *, tokens_per_frame, chunk_frames, overlap_frames, extra_before=0,
           extra_after=0, scale=None):
    if state is None:
        state = rc.attention.initial_state(k, v, fk, overlap_frames * tokens_per_frame)
    return triton_step.hybrid_attention_step_fused(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                                   chunk_frames=chunk_frames, extra_before=extra_before,
                                                   extra_after=extra_after, scale=scale)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_same_steps(frame_counts, *, m=8, heads=2, d=16, feat=16, dtype=torch.float16, tc=2, to=1,
                       extra_before=0, extra_after=0, strided=False, tol=3e-3):
    layout = dict(tokens_per_frame=m, chunk_frames=tc, overlap_frames=to, extra_before=extra_before,
                  extra_after=extra_after, scale=0.25)
    chunks = _chunks(frame_counts, m, heads, d, feat, dtype, extra_before, extra_after, strided)
    ref_y, ref_s = _run(hybrid_attention_step_torch, chunks, **layout)
    got_y, got_s = _run(_fused, chunks, **layout)
    for (a, sa), (b, sb) in zip(zip(got_y, got_s), zip(ref_y, ref_s)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) < tol
        assert type(sa) is type(sb)
        for name, x, y in zip(rc.HybridState._fields, sa, sb):
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert _rel(x, y) < 1e-5 if name in ("s", "z") else torch.equal(x.cpu(), y.cpu()), name


def test_fused_step_equals_torch_step_over_chunks_with_an_invalid_first_overlap():
    # 3 chunks of 2 frames (16 queries, 24 window keys: partial blocks), last one short (1 frame)
    _assert_same_steps([2, 2, 1])


def test_fused_step_equals_torch_step_when_overlap_blocks_are_whole():
    # M=16, To=1: the cache is one whole 16-key block (the interpreter's), skipped while invalid, then unmasked
    _assert_same_steps([2, 2, 2], m=16)


def test_fused_step_equals_torch_step_with_extra_tokens_before_and_after():
    _assert_same_steps([2, 2], extra_before=3, extra_after=2)


def test_fused_step_equals_torch_step_when_the_last_chunk_is_shorter_than_the_overlap():
    # Tc=3, To=2: the last chunk (1 frame) leaves part of the old overlap in the new one
    _assert_same_steps([3, 1], tc=3, to=2, m=4)


@pytest.mark.parametrize("valid", [
    torch.arange(16) >= 5,          # a suffix that is not the whole cache (the pipelined path from row 5)
    torch.arange(16) % 3 != 1,      # scattered rows (no stream makes these: the block-by-block path)
], ids=["suffix", "scattered"])
def test_fused_step_applies_a_hand_made_cache_mask(valid):
    layout = dict(tokens_per_frame=8, chunk_frames=2, overlap_frames=2, scale=0.25)
    [chunk] = _chunks([2], 8, 2, 16, 16, torch.float16)
    q, k, v, fq, fk = chunk
    gen = torch.Generator().manual_seed(3)
    state = rc.attention.initial_state(k, v, fk, 16)
    state = state._replace(s=torch.rand(state.s.shape, generator=gen).to(DEVICE),
                           z=torch.rand(state.z.shape, generator=gen).to(DEVICE),
                           k_overlap=torch.randn(state.k_overlap.shape, generator=gen).to(DEVICE, k.dtype),
                           v_overlap=torch.randn(state.v_overlap.shape, generator=gen).to(DEVICE, v.dtype),
                           overlap_valid=valid.to(DEVICE))
    got, _ = _fused(*chunk, state, **layout)
    ref, _ = hybrid_attention_step_torch(*chunk, state, **layout)
    assert _rel(got, ref) < 3e-3


def test_fused_step_reads_strided_bnhd_views_and_returns_one():
    layout = dict(tokens_per_frame=8, chunk_frames=2, overlap_frames=1, scale=0.25)
    chunks = _chunks([2, 2], 8, 2, 16, 16, torch.float16, strided=True)
    assert not chunks[0][0].is_contiguous()
    got_y, _ = _run(_fused, chunks, **layout)
    ref_y, _ = _run(hybrid_attention_step_torch, chunks, **layout)
    assert all(_rel(a, b) < 3e-3 for a, b in zip(got_y, ref_y))
    # the output is [B, N, H, D] memory: the model's transpose(1, 2).reshape after attention is free
    assert got_y[0].transpose(1, 2).is_contiguous()


def test_fused_step_takes_no_overlap_and_bf16():
    _assert_same_steps([2, 2], to=0, dtype=torch.bfloat16, tol=1e-2)


def test_step_on_cpu_is_the_torch_form():
    layout = dict(tokens_per_frame=4, chunk_frames=2, overlap_frames=1, scale=0.25)
    chunks = [[t.cpu() for t in c] for c in _chunks([2], 4, 1, 16, 16, torch.float32)]
    y, state = rc.hybrid_attention_step(*chunks[0], None, **layout)
    y_ref, state_ref = hybrid_attention_step_torch(*chunks[0], None, **layout)
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(state, state_ref))


# ---------------------------------------------------------------------------------------------
# On the GPU, at Wan2.1-1.3B sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("extra_before,extra_after", [(0, 0), (77, 0), (0, 226)])
def test_cuda_step_dispatches_to_fused_and_matches_fp32_torch_step_at_wan_size(extra_before, extra_after):
    layout = dict(tokens_per_frame=1560, chunk_frames=3, overlap_frames=1, extra_before=extra_before,
                  extra_after=extra_after)
    chunks = _chunks([3, 3, 3, 2], 1560, 12, 128, 64, torch.bfloat16, extra_before, extra_after, strided=True)
    with torch.no_grad():
        got_y, got_s = _run(rc.hybrid_attention_step, chunks, **layout)
        ref_y, ref_s = _run(hybrid_attention_step_torch, [[t.float() for t in c] for c in chunks], **layout)
    assert got_y[0].transpose(1, 2).is_contiguous()  # the fused kernel's output layout: it ran
    for a, b in zip(got_y, ref_y):
        assert _rel(a, b) < 1e-2
    assert _rel(got_s[-1].s, ref_s[-1].s) < 1e-3 and _rel(got_s[-1].z, ref_s[-1].z) < 1e-3


@pytest.mark.gpu
@gpu
def test_cuda_step_with_gradients_takes_the_torch_form():
    layout = dict(tokens_per_frame=16, chunk_frames=2, overlap_frames=1)
    q, k, v, fq, fk = (t.float().requires_grad_() for t in _chunks([2], 16, 2, 64, 32, torch.float32)[0])
    y, _ = rc.hybrid_attention_step(q, k, v, fq, fk, None, **layout)
    y.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# every case makes several calls, so later ones start from a nonzero carried S, z and a valid cache;
# the last call ends on a short chunk in (10, 3, 1, 2) and (7, 3, 2, 2)
@pytest.mark.parametrize("frames,tc,to,groups", [(9, 2, 1, 2), (10, 3, 1, 2), (8, 2, 0, 3), (7, 1, 1, 2), (7, 3, 2, 2)])
def test_several_chunks_in_one_launch_equal_the_torch_steps(frames, tc, to, groups):
    """triton_step.hybrid_attention_steps_fused (the chunk-parallel kernel from a carried state, the cache
    masked while invalid) against rc.attention.hybrid_attention_steps in PyTorch ops, over consecutive
    calls of `groups` chunks: the first from the initial state, later ones from a carried, valid one."""
    from rehyat_compile.attention import hybrid_attention_steps
    m = 8
    layout = dict(tokens_per_frame=m, chunk_frames=tc, overlap_frames=to, scale=0.25)
    [video] = _chunks([frames], m, 2, 16, 16, torch.float16, strided=True)
    ref_state, got_state = None, None
    for start in range(0, frames, groups * tc):
        rows = slice(start * m, min(start + groups * tc, frames) * m)
        part = [t[:, :, rows] for t in video]
        with torch.no_grad():
            ref_y, ref_state = hybrid_attention_steps(*(t.cpu().float() for t in part), ref_state and
                                                      rc.HybridState(*(t.cpu() for t in ref_state)), **layout)
            if got_state is None:
                got_state = rc.attention.initial_state(part[1], part[2], part[4], to * m)
            got_y, got_state = triton_step.hybrid_attention_steps_fused(*part, got_state, **layout)
        assert got_y.shape == part[0].shape and got_y.transpose(1, 2).is_contiguous()
        assert _rel(got_y, ref_y) < 3e-3
        for name, x, y in zip(rc.HybridState._fields, got_state, ref_state):
            assert x.shape == y.shape, name
            assert _rel(x.float(), y.float()) < (1e-4 if name in ("s", "z") else 3e-3), name
    assert type(got_state) is type(ref_state)   # a short last chunk marks the state final


@pytest.mark.parametrize("to", [0, 1, 2])
@pytest.mark.parametrize("kv_mode", ["POINTERS", "HOST_TMA", "DEVICE_TMA"])
def test_several_chunks_read_the_cache_in_every_key_load_mode(kv_mode, to):
    """The grouped launch reads the overlap cache as its own K/V source: through pointers, host TMA
    descriptors or in-kernel ones, and with no cache at all (To = 0: no zero-row descriptor)."""
    from rehyat_compile.attention import hybrid_attention_steps
    from rehyat_compile.kernels import triton_hybrid
    m, tc = 8, 2
    layout = dict(tokens_per_frame=m, chunk_frames=tc, overlap_frames=to, scale=0.25)
    [video] = _chunks([8], m, 2, 16, 16, torch.float16)
    first, second = ([t[:, :, rows] for t in video] for rows in (slice(0, 4 * m), slice(4 * m, 8 * m)))
    with torch.no_grad():
        _, ref_state = hybrid_attention_steps(*(t.cpu().float() for t in first), None, **layout)
        ref_y, _ = hybrid_attention_steps(*(t.cpu().float() for t in second), ref_state, **layout)
        state = rc.attention.initial_state(first[1], first[2], first[4], to * m)
        _, state = triton_step.hybrid_attention_steps_fused(*first, state, **layout,
                                                            kv_mode=getattr(triton_hybrid, kv_mode))
        got_y, _ = triton_step.hybrid_attention_steps_fused(*second, state, **layout,
                                                            kv_mode=getattr(triton_hybrid, kv_mode))
    assert _rel(got_y, ref_y) < 3e-3
