"""One denoising step of diffusers Wan2.1-1.3B: original vs converted vs streamed, side by side.

The model is built from its config with random bf16 weights (no hub): dim 1536, 12 heads x 128,
30 blocks, ffn 8960, text dim 4096, patch 1x2x2, 480x832 video (latent 60x104, 1560 tokens per
latent frame). Converted: every self-attention, Tc=3, To=1. Streamed: the converted model run
chunk by chunk (rc.stream). Prints time per step and peak memory of each, per video length.

    python benchmarks/bench_wan_step.py                       # 81 121 161 321 frames, on the GPU
    python benchmarks/bench_wan_step.py --video-frames 81 --layers 2 --device cpu --height 60 --width 104
"""
from __future__ import annotations

import argparse
import time

import torch

import rehyat_compile as rc

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video-frames", type=int, nargs="+", default=[81, 121, 161, 321],
                   help="pixel frames; latent frames = (f - 1) / 4 + 1")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    p.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--overlap-frames", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-original-above", type=int, default=10**9,
                   help="do not run the original model beyond this many pixel frames")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build_model(layers: int, device):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": layers})
    return model.to(torch.bfloat16).eval()


def inputs(video_frames: int, args, device):
    latent = (video_frames - 1) // 4 + 1
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, 16, latent, args.height, args.width, generator=gen).to(device, torch.bfloat16)
    text = torch.randn(1, args.text_tokens, 4096, generator=gen).to(device, torch.bfloat16)
    return (x,), dict(timestep=torch.tensor([500], device=device), encoder_hidden_states=text, return_dict=False)


def measure(fn, device, repeats):
    """(median seconds, peak bytes above what was allocated before) of fn()."""
    with torch.no_grad():
        out = fn()
        del out
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del out
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args.layers, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    example_args, example_kwargs = inputs(args.video_frames[0], args, device)
    t0 = time.perf_counter()
    hybrid = rc.transform(model, example_args, example_kwargs, chunk_frames=args.chunk_frames,
                          overlap_frames=args.overlap_frames)
    hybrid = hybrid.to(device=device, dtype=torch.bfloat16)
    print(f"transform of {len(hybrid.sites)} sites: {time.perf_counter() - t0:.1f} s")
    runner = rc.stream(hybrid)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gib = 2**30
    print(f"device {name}; Wan2.1-1.3B shapes, {args.layers} blocks, weights {weights / gib:.2f} GiB bf16, "
          f"Tc={args.chunk_frames} To={args.overlap_frames}; peak = GPU memory above weights and inputs")
    print(f"{'frames':>6} {'latent':>6} {'tokens':>7} {'orig ms':>9} {'conv ms':>9} {'strm ms':>9} "
          f"{'conv x':>7} {'strm x':>7} {'orig GiB':>8} {'conv GiB':>8} {'strm GiB':>8} {'strm/wts':>8}")
    for frames in args.video_frames:
        a, kw = inputs(frames, args, device)
        latent = a[0].shape[2]
        tokens = latent * (args.height // 2) * (args.width // 2)
        if frames <= args.skip_original_above:
            t_orig, m_orig = measure(lambda: model(*a, **kw), device, args.repeats)
        else:
            t_orig, m_orig = float("nan"), float("nan")
        t_conv, m_conv = measure(lambda: hybrid(*a, **kw), device, args.repeats)
        t_strm, m_strm = measure(lambda: runner(*a, **kw), device, args.repeats)
        print(f"{frames:>6} {latent:>6} {tokens:>7} {t_orig * 1e3:>9.0f} {t_conv * 1e3:>9.0f} {t_strm * 1e3:>9.0f} "
              f"{t_orig / t_conv:>7.2f} {t_orig / t_strm:>7.2f} {m_orig / gib:>8.2f} {m_conv / gib:>8.2f} "
              f"{m_strm / gib:>8.2f} {m_strm / weights:>8.2f}", flush=True)
        del a, kw


if __name__ == "__main__":
    main()
