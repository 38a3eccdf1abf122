"""Time and memory of full SDPA, the PyTorch chunk-parallel hybrid and the fused Triton kernel.

Wan2.1-1.3B self-attention shapes: batch 1, 12 heads x 128, 1560 tokens per latent frame, chunk of
3 frames with 1 frame of overlap, 64 features, bf16. Run on a CUDA machine:

    python benchmarks/bench_fused_kernel.py [--frames 6 11 21 41 81 121] [--non-causal] [--sweep]
    python benchmarks/bench_fused_kernel.py --step 21     # the recurrent step beside the parallel op
    python benchmarks/bench_fused_kernel.py --feature-map 4680 32760 48360   # FeatureMap: fused vs PyTorch

Per frame count and implementation: median ms (triton.testing.do_bench, L2 flushed between runs),
peak memory above the inputs (MiB, output included), temporaries (peak minus the output) as % of
q+k+v, TFLOP/s on the implementation's own FLOP count (SDPA 4*N^2*D*B*H, hybrid
``rc.hybrid_attention_flops``), speed-up over SDPA, and the FLOP-ratio bound (SDPA FLOPs / hybrid
FLOPs) that the speed-up approaches when both run at the same rate.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import rehyat_compile as rc
from rehyat_compile.kernels import triton_hybrid

HEADS, HEAD_DIM, TOKENS_PER_FRAME, FEATURES = 12, 128, 1560, 64
CHUNK_FRAMES, OVERLAP_FRAMES = 3, 1
DATASHEET_BF16_TFLOPS = 989.4      # H100/H200 SXM dense bf16
MIB = 2 ** 20


def measured_matmul_tflops() -> float:
    """bf16 8192^3 matrix product on random data: the card's practical dense peak."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192 ** 3 / ms / 1e9


def make_inputs(frames: int, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = frames * TOKENS_PER_FRAME
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    fq, fk = (torch.rand(1, HEADS, n, FEATURES, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v, fq, fk


def peak_mib(fn) -> float:
    """Peak allocated memory of one call above what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / MIB


def measure(fn):
    """(median ms, peak MiB) or None when it does not fit in GPU memory."""
    try:
        mem = peak_mib(fn)
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return ms, mem


def run_table(frame_counts, causal: bool) -> None:
    layout = dict(tokens_per_frame=TOKENS_PER_FRAME, chunk_frames=CHUNK_FRAMES, overlap_frames=OVERLAP_FRAMES,
                  causal=causal)
    peak = measured_matmul_tflops()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"bf16 dense peak: datasheet {DATASHEET_BF16_TFLOPS:.0f} TFLOP/s, measured 8192^3 matmul {peak:.0f} TFLOP/s")
    print(f"shapes: B=1 H={HEADS} D={HEAD_DIM} M={TOKENS_PER_FRAME} Tc={CHUNK_FRAMES} To={OVERLAP_FRAMES} "
          f"F={FEATURES} bf16, causal={causal}")
    header = (f"{'frames':>6} {'N':>7} {'impl':>8} {'ms':>9} {'peakMiB':>8} {'tmp%qkv':>7} {'TFLOP/s':>8} "
              f"{'%peak':>6} {'xSDPA':>6} {'bound':>6} {'relerr':>8}")
    print(header)
    for frames in frame_counts:
        q, k, v, fq, fk = make_inputs(frames)
        n = q.shape[2]
        qkv_mib = 3 * q.numel() * q.element_size() / MIB
        out_mib = q.numel() * q.element_size() / MIB
        sdpa_flops = 4 * n * n * HEAD_DIM * HEADS
        hybrid_flops = rc.hybrid_attention_flops(1, HEADS, n, HEAD_DIM, FEATURES, **layout)
        impls = {
            "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v), sdpa_flops),
            "chunked": (lambda: rc.hybrid_attention_chunked(q, k, v, fq, fk, **layout), hybrid_flops),
            "fused": (lambda: rc.hybrid_attention(q, k, v, fq, fk, **layout), hybrid_flops),
        }
        err = float("nan")
        try:
            ref = rc.hybrid_attention_chunked(q, k, v, fq, fk, **layout).float()
            fused = rc.hybrid_attention(q, k, v, fq, fk, **layout).float()
            err = ((fused - ref).norm() / ref.norm()).item()
            del ref, fused
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        sdpa_ms = None
        for name, (fn, flops) in impls.items():
            got = measure(fn)
            if got is None:
                print(f"{frames:>6} {n:>7} {name:>8} {'out of GPU memory':>30}")
                continue
            ms, mem = got
            sdpa_ms = ms if name == "sdpa" else sdpa_ms
            tflops = flops / ms / 1e9
            speedup = f"{sdpa_ms / ms:6.2f}" if sdpa_ms else f"{'-':>6}"
            print(f"{frames:>6} {n:>7} {name:>8} {ms:9.2f} {mem:8.0f} {100 * (mem - out_mib) / qkv_mib:7.1f} "
                  f"{tflops:8.0f} {100 * tflops / DATASHEET_BF16_TFLOPS:6.1f} {speedup} "
                  f"{sdpa_flops / hybrid_flops:6.2f} {err if name == 'fused' else float('nan'):8.1e}")
        del q, k, v, fq, fk
        torch.cuda.empty_cache()
    print(f"fused config chosen by autotune: {triton_hybrid._hybrid_fwd_tuned.best_config}")


def sweep_configs(frames: int, causal: bool) -> None:
    """ms of the fused kernel's main launch for each K/V load mode and block configuration."""
    layout = dict(tokens_per_frame=TOKENS_PER_FRAME, chunk_frames=CHUNK_FRAMES, overlap_frames=OVERLAP_FRAMES,
                  causal=causal, extra_before=0, extra_after=0, scale=HEAD_DIM ** -0.5)
    q, k, v, fq, fk = make_inputs(frames)
    states = triton_hybrid.prefix_states(fk, v, tokens_per_frame=TOKENS_PER_FRAME, extra_before=0, frames=frames)
    out = torch.empty_like(q)
    flops = rc.hybrid_attention_flops(1, HEADS, q.shape[2], HEAD_DIM, FEATURES, tokens_per_frame=TOKENS_PER_FRAME,
                                      chunk_frames=CHUNK_FRAMES, overlap_frames=OVERLAP_FRAMES, causal=causal)
    ref = rc.hybrid_attention_chunked(q, k, v, fq, fk, **layout).float()
    print(f"config sweep, {frames} frames, causal={causal}: mode BLOCK_M BLOCK_N warps stages -> ms TFLOP/s relerr")
    modes = {"ptr": triton_hybrid.POINTERS, "hosttma": triton_hybrid.HOST_TMA, "devtma": triton_hybrid.DEVICE_TMA}
    for mode_name, (bm, bn, warps, stages) in itertools.product(
            modes, [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)]):
        config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        row = f"  {mode_name:8} {bm:4} {bn:4} {warps:2} {stages:2}"

        def launch():
            triton_hybrid.launch_main_kernel(q, k, v, fq, states, out, **layout, kv_mode=modes[mode_name],
                                             config=config)
        try:
            out.fill_(float("nan"))
            launch()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = do_bench(launch, warmup=25, rep=100, return_mode="median")
        except Exception as exc:  # out of shared memory / registers, or unsupported here
            print(f"{row} -> failed: {type(exc).__name__} {str(exc)[:80]}")
            continue
        print(f"{row} -> {ms:7.3f} {flops / ms / 1e9:6.0f} {err:8.1e}")
    states_ms = do_bench(lambda: triton_hybrid.prefix_states(fk, v, tokens_per_frame=TOKENS_PER_FRAME,
                                                             extra_before=0, frames=frames),
                         warmup=25, rep=100, return_mode="median")
    print(f"  state table (frame states + prefix scan): {states_ms:.3f} ms")


def step_flops(chunk_tokens: int, window_tokens: int) -> int:
    """Matmul FLOPs of one full step (no extra tokens): softmax over the window, the readout phi_q S
    and z, and the state update phi_k^T v over the chunk's leaving rows."""
    softmax = 4 * HEAD_DIM * chunk_tokens * window_tokens
    linear = 2 * chunk_tokens * FEATURES * (HEAD_DIM + 1) + 2 * chunk_tokens * FEATURES * HEAD_DIM
    return HEADS * (softmax + linear)


def step_table(frames: int) -> None:
    """One full chunk of the recurrent step (its cache of To frames valid) beside the chunk-parallel
    op on a ``frames``-frame video, per chunk: the fused step, its attention launch alone (every block
    configuration), its state launch, the parallel op's time divided by its chunk count, and the
    video's chunks as one ``hybrid_attention_steps`` call (``chunks_per_step``: one parallel launch
    from a state)."""
    from rehyat_compile.kernels import triton_step
    layout = dict(tokens_per_frame=TOKENS_PER_FRAME, chunk_frames=CHUNK_FRAMES, overlap_frames=OVERLAP_FRAMES)
    chunk, window = CHUNK_FRAMES * TOKENS_PER_FRAME, (CHUNK_FRAMES + OVERLAP_FRAMES) * TOKENS_PER_FRAME
    q, k, v, fq, fk = make_inputs(CHUNK_FRAMES)
    overlap = OVERLAP_FRAMES * TOKENS_PER_FRAME
    _, state = rc.hybrid_attention_step(q, k, v, fq, fk, None, **layout)   # a state whose cache is all valid
    assert bool(state.overlap_valid.all())
    scale = HEAD_DIM ** -0.5
    ref, _ = rc.attention.hybrid_attention_step_torch(q, k, v, fq, fk, state, **layout)
    flops = step_flops(chunk, window)
    print(f"recurrent step, one full chunk: {chunk} queries, window {window} keys ({overlap} cached), "
          f"{flops / 1e9:.1f} GFLOP; ms TFLOP/s relerr (vs the PyTorch step)")

    def row(name, fn, n_flops, out=None):
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        err = float("nan") if out is None else ((out().float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"  {name:44} {ms:8.3f} {n_flops / ms / 1e9:7.0f} {err:9.1e}")
        return ms

    step = lambda: rc.hybrid_attention_step(q, k, v, fq, fk, state, **layout)  # noqa: E731
    row("fused step (attention + state + cache)", step, flops, lambda: step()[0])
    attn_flops = flops - HEADS * 2 * chunk * FEATURES * HEAD_DIM
    row("  attention launch (autotuned)", lambda: triton_step.step_attention(
        q, k, v, fq, state, extra_before=0, extra_after=0, scale=scale), attn_flops,
        lambda: triton_step.step_attention(q, k, v, fq, state, extra_before=0, extra_after=0, scale=scale))
    print(f"    autotune chose {triton_step._step_attention_tuned.best_config}")
    for bm, bn, warps, stages in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
                                  (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]:
        config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        launch = lambda: triton_step.step_attention(q, k, v, fq, state, extra_before=0, extra_after=0,  # noqa: E731
                                                    scale=scale, config=config)
        try:
            row(f"    BLOCK_M {bm} BLOCK_N {bn} warps {warps} stages {stages}", launch, attn_flops, launch)
        except Exception as exc:  # out of shared memory / registers
            print(f"    BLOCK_M {bm} BLOCK_N {bn} warps {warps} stages {stages}: {type(exc).__name__}")
    row("  state launch (phi_k^T v, sum phi_k)", lambda: triton_step.step_state_sums(
        fk, v, state, extra_before=0, leave=chunk), HEADS * 2 * chunk * FEATURES * HEAD_DIM)
    qp, kp, vp, fqp, fkp = make_inputs(frames)
    chunks = -(-frames // CHUNK_FRAMES)
    par = do_bench(lambda: rc.hybrid_attention(qp, kp, vp, fqp, fkp, **layout), warmup=25, rep=200,
                   return_mode="median")
    par_flops = rc.hybrid_attention_flops(1, HEADS, qp.shape[2], HEAD_DIM, FEATURES, **layout)
    print(f"  {'parallel op, ' + str(frames) + ' frames, per chunk (' + str(chunks) + ' chunks)':44} "
          f"{par / chunks:8.3f} {par_flops / par / 1e9:7.0f}")
    # all the video's chunks as one recurrent call from the initial state: the grouped step's one launch
    grouped = lambda: rc.attention.hybrid_attention_steps(qp, kp, vp, fqp, fkp, None, **layout)  # noqa: E731
    ms = do_bench(grouped, warmup=25, rep=200, return_mode="median")
    ref_par = rc.hybrid_attention(qp, kp, vp, fqp, fkp, **layout).float()
    err = ((grouped()[0].float() - ref_par).norm() / ref_par.norm()).item()
    print(f"  {'several chunks per step, ' + str(chunks) + ' in one call, per chunk':44} {ms / chunks:8.3f} "
          f"{par_flops / ms / 1e9:7.0f} {err:9.1e} (vs the parallel op)")


def feature_map_table(token_counts) -> None:
    """FeatureMap (Wan2.1 shapes: 12 heads, D 128, hidden 128, 64 features, gelu, softplus, degree 2) on
    the model's ``[B, N, H, D]`` memory: the fused kernel beside the PyTorch form, side by side, with
    the rate its bytes (x read, features written) would take at the card's copy bandwidth."""
    torch.manual_seed(0)
    fmap = rc.FeatureMap(HEADS, HEAD_DIM, FEATURES).to("cuda", torch.bfloat16)
    from rehyat_compile.kernels.triton_feature_map import feature_map_fused
    big = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    copy_gbs = 2 * big.numel() / do_bench(lambda: big.clone(), warmup=10, rep=100, return_mode="median") / 1e6
    del big
    print(f"device {torch.cuda.get_device_name()}; copy bandwidth (1 GiB clone, read + write) {copy_gbs:.0f} GB/s")
    print(f"{'tokens':>7} {'torch us':>9} {'fused us':>9} {'x torch':>8} {'fused GB/s':>11} {'bytes us':>9} {'relerr':>8}")
    with torch.no_grad():
        for n in token_counts:
            x = torch.randn(1, n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            torch_us = 1e3 * do_bench(lambda: fmap.forward_torch(x), warmup=25, rep=200, return_mode="median")
            fused_us = 1e3 * do_bench(lambda: feature_map_fused(fmap, x), warmup=25, rep=200, return_mode="median")
            nbytes = x.numel() * 2 + n * HEADS * FEATURES * 2
            ref = fmap.float().forward_torch(x.float())
            fmap.to(torch.bfloat16)
            err = ((feature_map_fused(fmap, x).float() - ref).norm() / ref.norm()).item()
            print(f"{n:7d} {torch_us:9.1f} {fused_us:9.1f} {torch_us / fused_us:8.2f} {nbytes / fused_us / 1e3:11.0f} "
                  f"{nbytes / copy_gbs / 1e3:9.1f} {err:8.1e}")
    from rehyat_compile.kernels.triton_feature_map import _feature_map_tuned
    print("autotune picks (key -> config):")
    for key, config in _feature_map_tuned.cache.items():
        print(f"  {key} -> {config}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[6, 11, 21, 41, 81, 121])
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--sweep", type=int, default=0, metavar="FRAMES",
                        help="also time every block configuration of the fused kernel at this frame count")
    parser.add_argument("--step", type=int, default=0, metavar="FRAMES",
                        help="only the recurrent step: one chunk beside the parallel op on this many frames")
    parser.add_argument("--feature-map", type=int, nargs="+", default=None, metavar="TOKENS",
                        help="only FeatureMap: the fused kernel beside the PyTorch form at these token counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if args.feature_map:
        feature_map_table(args.feature_map)
        return
    if args.step:
        step_table(args.step)
        return
    if args.sweep:
        sweep_configs(args.sweep, not args.non_causal)
    run_table(args.frames, not args.non_causal)


if __name__ == "__main__":
    main()
