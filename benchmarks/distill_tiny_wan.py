"""Stage-1 distillation of a tiny diffusers Wan2.1 with non-uniform attention, on CPU.

The teacher is ``tests.models.make_wan_t2v`` (2 blocks, 2 heads x 16, 5 latent frames of 16 tokens)
with the q/k RMSNorm gains of every self-attention doubled (logits x4: far from uniform). Converted
with Tc=1, To=0 (feature_dim 64); distilled on latents at ``--train-batches`` noise levels; errors are printed on those
training batches (what distillation minimises) and on 2 held-out batches.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/distill_tiny_wan.py
"""
from __future__ import annotations

import argparse

import torch

import rehyat_compile as rc
from rehyat_compile.distill import output_error, site_errors
from tests.test_distill import noisy_batches, sharpened_wan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sharpen", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--train-batches", type=int, default=3)
    a = p.parse_args()
    model, args, kwargs = sharpened_wan(a.sharpen)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=1, overlap_frames=0, feature_dim=a.feature_dim)
    train = noisy_batches(args, kwargs, [100 + (800 * i) // a.train_batches for i in range(a.train_batches)], seed=7)
    held_out = noisy_batches(args, kwargs, (350, 650), seed=8)

    def model_error(batches):
        with torch.no_grad():
            return output_error([hybrid(*x, **k) for x, k in batches], [model(*x, **k) for x, k in batches])

    held_before, held_model_before = site_errors(hybrid, held_out), model_error(held_out)
    report = rc.distill(model, hybrid, train, steps=a.steps, lr=a.lr, progress=False)
    print("training batches:")
    print(report)
    held_after, held_model_after = site_errors(hybrid, held_out), model_error(held_out)
    print("held-out batches:")
    for name in held_before:
        print(f"  {name:<30} error {held_before[name]:.4f} -> {held_after[name]:.4f}")
    print(f"  whole model output vs teacher: {held_model_before:.4f} -> {held_model_after:.4f}")


if __name__ == "__main__":
    main()
