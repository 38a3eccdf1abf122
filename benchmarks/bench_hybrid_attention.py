"""rc.hybrid_attention vs F.scaled_dot_product_attention at Wan2.1-1.3B attention shapes.

Prints, per number of latent frames, the time and peak extra memory of both, measured side by
side in one run, their ratio, and the FLOP ratio that bounds the speed-up.

    python benchmarks/bench_hybrid_attention.py                      # GPU, Wan2.1-1.3B shapes
    python benchmarks/bench_hybrid_attention.py --device cpu --tokens-per-frame 64 --heads 2 \
        --frames 6 11 21 --dtype float32                                 # a small CPU run
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import rehyat_compile as rc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[6, 11, 21, 41, 81])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens-per-frame", type=int, default=1560, help="Wan2.1 480x832: 30x52 patches")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--overlap-frames", type=int, default=1)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def timed(fn, device, repeats):
    """Median seconds of fn() after one warm-up, and the peak bytes it allocated on the device."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    h, d, m, f = args.heads, args.head_dim, args.tokens_per_frame, args.features
    layout = dict(tokens_per_frame=m, chunk_frames=args.chunk_frames, overlap_frames=args.overlap_frames)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {args.dtype}, {h} heads x {d}, {m} tokens/frame, Tc={args.chunk_frames}, "
          f"To={args.overlap_frames}, F={f}")
    print(f"{'frames':>6} {'tokens':>7} {'sdpa ms':>9} {'hybrid ms':>9} {'speed-up':>8} {'flop ratio':>10} "
          f"{'sdpa TF/s':>9} {'hyb TF/s':>9} {'sdpa MiB':>9} {'hyb MiB':>9} {'qkv MiB':>8}")
    for frames in args.frames:
        n = frames * m
        q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dtype) for _ in range(3))
        fq, fk = (torch.rand(1, h, n, f, device=device, dtype=dtype) * 0.1 for _ in range(2))
        with torch.no_grad():
            t_sdpa, mem_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v), device, args.repeats)
            t_hyb, mem_hyb = timed(lambda: rc.hybrid_attention(q, k, v, fq, fk, **layout), device, args.repeats)
        flops_sdpa = 4 * h * n * n * d
        flops_hyb = rc.hybrid_attention_flops(1, h, n, d, f, **layout)
        mib = 2**20
        print(f"{frames:>6} {n:>7} {t_sdpa * 1e3:>9.2f} {t_hyb * 1e3:>9.2f} {t_sdpa / t_hyb:>8.2f} "
              f"{flops_sdpa / flops_hyb:>10.2f} {flops_sdpa / t_sdpa / 1e12:>9.1f} {flops_hyb / t_hyb / 1e12:>9.1f} "
              f"{mem_sdpa / mib:>9.0f} {mem_hyb / mib:>9.0f} {3 * q.numel() * q.element_size() / mib:>8.0f}")
        del q, k, v, fq, fk
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
