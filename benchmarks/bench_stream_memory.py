"""Peak GPU memory of a converted Wan2.1-style DiT: parallel (whole video at once) vs streamed
(``rc.stream``, chunk by chunk with per-layer state), at two video lengths 4x apart.

Model: diffusers ``WanTransformer3DModel`` with Wan2.1-1.3B widths (dim 1536 = 12 heads x 128,
FFN 8960, text dim 4096) but few layers, random weights, bf16; latent 60x104 (480x832 video) ->
1560 tokens per latent frame; 512 text tokens. Peak memory is ``torch.cuda.max_memory_allocated``
during one forward (no grad), reported in MiB as the absolute peak and the peak above what was
allocated before the call (weights, inputs). The streamed form runs twice: position tables computed
on the GPU (the default; since d60a503 kept between calls in host memory, stream.py ``table_home``), and
computed on the host (``table_device="cpu"``); both move one step's slice at a time.

    PYTHONPATH=. python benchmarks/bench_stream_memory.py [--frames 6 24] [--layers 2]
"""
from __future__ import annotations

import argparse
import time

import torch

import rehyat_compile as rc


def make_model(layers: int, device, dtype):
    from rehyat_compile.zoo import make_wan_1_3b
    return make_wan_1_3b(layers=layers, device=device, dtype=dtype)


def inputs(frames: int, device, dtype, height=60, width=104, text=512):
    gen = torch.Generator(device=device).manual_seed(frames)
    latents = torch.randn(1, 16, frames, height, width, generator=gen, device=device, dtype=dtype)
    context = torch.randn(1, text, 4096, generator=gen, device=device, dtype=dtype)
    return (latents,), dict(timestep=torch.tensor([500], device=device), encoder_hidden_states=context,
                            return_dict=False)


def peak_mib(fn) -> tuple[float, float, float]:
    """(absolute peak MiB, peak above the allocation before the call MiB, seconds)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak / 2**20, (peak - before) / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs=2, default=[6, 24], help="two latent frame counts")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--overlap-frames", type=int, default=1)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16

    model = make_model(args.layers, device, dtype)
    ex_args, ex_kwargs = inputs(2, device, dtype)
    t0 = time.perf_counter()
    hybrid = rc.transform(model, ex_args, ex_kwargs, chunk_frames=args.chunk_frames,
                          overlap_frames=args.overlap_frames)
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | transform {time.perf_counter() - t0:.1f}s")
    print(f"model: Wan2.1-style dim 1536 (12x128), {args.layers} layers, bf16, 60x104 latent = 1560 tokens/frame, "
          f"Tc={args.chunk_frames} To={args.overlap_frames}, {len(hybrid.sites)} converted sites")
    streams = {"streamed (tables made on GPU)": rc.stream(hybrid),
               "streamed (tables made on host)": rc.stream(hybrid, table_device="cpu")}

    rows = []
    for frames in args.frames:
        call_args, call_kwargs = inputs(frames, device, dtype)
        runs = {"parallel converted": lambda: hybrid(*call_args, **call_kwargs)}
        runs.update({name: (lambda r=r: r(*call_args, **call_kwargs)) for name, r in streams.items()})
        for name, fn in runs.items():
            fn()  # warm-up: build programs, allocator pools
            rows.append((name, frames) + peak_mib(fn))
        state = streams["streamed (tables on GPU)"].state_nbytes(*call_args, **call_kwargs)
        with torch.no_grad():
            want = runs["parallel converted"]()[0].float()
            got = runs["streamed (tables on host)"]()[0].float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        print(f"frames={frames}: carried state {state / 2**20:.2f} MiB, streamed vs parallel max rel diff {err:.2e} (bf16)")
        del want, got
        del call_args, call_kwargs

    print(f"\n{'form':28s} {'frames':>6s} {'peak MiB':>10s} {'above start MiB':>16s} {'seconds':>8s}")
    for name, frames, peak, above, seconds in rows:
        print(f"{name:28s} {frames:6d} {peak:10.1f} {above:16.1f} {seconds:8.3f}")
    print()
    lo, hi = args.frames
    for name in ["parallel converted", *streams]:
        by = {f: (p, a) for n, f, p, a, _ in rows if n == name}
        print(f"{name:28s} growth {lo}->{hi} frames: peak x{by[hi][0] / by[lo][0]:.3f} "
              f"({(by[hi][0] / by[lo][0] - 1) * 100:+.1f}%), above-start x{by[hi][1] / by[lo][1]:.3f}")


if __name__ == "__main__":
    main()
