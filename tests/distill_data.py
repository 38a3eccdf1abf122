"""Synthetic teacher activations for the distillation tests: structured, not white noise.

q and k share a low-rank smooth positional signal (so a token attends most to tokens at nearby
frames and positions, as video DiTs do) plus a per-token content part; ``sharpness`` scales q,
making attention peaky (far from uniform). The teacher output is full softmax attention.
"""
from __future__ import annotations

import math

import torch

import rehyat_compile as rc
from rehyat_compile.distill import SiteSample, SiteSpec, teacher_attention


def structured_qkv(batch, heads, frames, tokens_per_frame, head_dim, *, rank=4, sharpness=3.0, seed=0,
                   extra=0):
    g = torch.Generator().manual_seed(seed)
    n = frames * tokens_per_frame + extra
    pos = torch.arange(n, dtype=torch.float32) / tokens_per_frame  # in frames
    freqs = torch.rand(rank, generator=g) * math.pi / 2
    phases = torch.rand(rank, generator=g) * 2 * math.pi
    basis = torch.cat([torch.cos(pos[:, None] * freqs + phases), torch.sin(pos[:, None] * freqs + phases)], dim=1)
    mix_q = torch.randn(heads, 2 * rank, head_dim, generator=g)
    mix_k = mix_q + 0.3 * torch.randn(heads, 2 * rank, head_dim, generator=g)
    content = torch.randn(batch, heads, n, rank, generator=g) @ torch.randn(heads, rank, head_dim, generator=g)
    q = sharpness * (basis @ mix_q / math.sqrt(2 * rank) + 0.5 * content / math.sqrt(rank))
    k = basis @ mix_k / math.sqrt(2 * rank) + 0.5 * content / math.sqrt(rank)
    v = torch.randn(batch, heads, n, head_dim, generator=g)
    return q, k, v


def site_problem(name, *, heads=2, head_dim=8, frames=6, tokens_per_frame=4, chunk_frames=1, overlap_frames=0,
                 n_samples=2, seed=0, feature_dim=16):
    """(spec, samples, (phi_q, phi_k)) for one synthetic site."""
    spec = SiteSpec(name, rc.attention.make_layout(tokens_per_frame, chunk_frames, overlap_frames), None)
    samples = []
    for i in range(n_samples):
        q, k, v = structured_qkv(1, heads, frames, tokens_per_frame, head_dim, seed=seed * 100 + i)
        samples.append(SiteSample(q, k, v, teacher_attention(q, k, v)))
    torch.manual_seed(seed)
    maps = (rc.FeatureMap(heads, head_dim, feature_dim), rc.FeatureMap(heads, head_dim, feature_dim))
    return spec, samples, maps


def site_problems(names, **kw):
    specs, samples, maps = {}, {}, {}
    for i, name in enumerate(names):
        specs[name], samples[name], maps[name] = site_problem(name, seed=i, **kw)
    return specs, samples, maps
