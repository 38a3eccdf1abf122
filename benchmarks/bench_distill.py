"""Distillation step time and error curve on one Wan2.1-1.3B-shaped attention layer.

12 heads x 128, 1560 tokens per frame (480x832 video: 60x104 latent, patch 2x2), 21 latent frames
(81 video frames) -> N = 32760 tokens; structured teacher activations (low-rank, frame-local q/k,
``structured_attention_inputs``), teacher output = full softmax attention (SDPA). Trains phi_q, phi_k
(feature_dim 64) with the same trainer ``rc.distill`` uses; prints time per step and the relative
L1 error curve. Needs only rehyat_compile and torch.

    PYTHONPATH=$PWD python benchmarks/bench_distill.py --steps 60 --frames 21
"""
from __future__ import annotations

import argparse
import copy

import torch

import rehyat_compile as rc
from rehyat_compile.attention import make_layout
from rehyat_compile.distill import (SiteSample, SiteSpec, structured_attention_inputs, teacher_attention,
                                    train_feature_maps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens-per-frame", type=int, default=1560)
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--overlap-frames", type=int, default=1)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--samples", type=int, default=2, help="captured batches (e.g. noise levels)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--every", type=int, default=10, help="print the error every this many steps")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    name = "blocks.0.attn1"
    spec = SiteSpec(name, make_layout(a.tokens_per_frame, a.chunk_frames, a.overlap_frames), None)
    samples = []
    for i in range(a.samples):
        q, k, v = structured_attention_inputs(1, a.heads, a.frames, a.tokens_per_frame, a.head_dim, seed=i,
                                              device=device, dtype=dtype)
        samples.append(SiteSample(q, k, v, teacher_attention(q, k, v)))
    torch.manual_seed(0)
    maps = {name: tuple(rc.FeatureMap(a.heads, a.head_dim, a.feature_dim).to(device) for _ in range(2))}
    n = a.frames * a.tokens_per_frame
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}")
    print(f"layer: {a.heads} heads x {a.head_dim}, N = {a.frames} frames x {a.tokens_per_frame} = {n} tokens, "
          f"{a.dtype}; Tc={a.chunk_frames} To={a.overlap_frames} F={a.feature_dim}; {a.samples} samples")
    # warm-up (allocator, kernels) on a copy of the feature maps, then one timed run
    warm = {name: tuple(copy.deepcopy(m) for m in maps[name])}
    train_feature_maps({name: samples}, {name: spec}, warm, steps=2, lr=a.lr, progress=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r = train_feature_maps({name: samples}, {name: spec}, maps, steps=a.steps, lr=a.lr, progress=False,
                           eval_every=a.every)[name]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    for (step, err) in r.error_curve:
        loss = r.loss_curve[step - 1] if step else float("nan")
        print(f"step {step:4d}  relative L1 error {err:.4f}  train loss {loss:.4f}")
    print(f"time per distillation step (phi_q, phi_k forward + hybrid op forward/backward + AdamW, one sample): "
          f"{r.train_seconds / a.steps * 1e3:.1f} ms; peak GPU memory {peak:.1f} GiB")
    print(f"error {r.error_before:.4f} -> {r.error_after:.4f} after {a.steps} steps "
          f"(x{r.error_before / r.error_after:.2f} lower)")


if __name__ == "__main__":
    main()
