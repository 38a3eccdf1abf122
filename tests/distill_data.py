"""Synthetic sites for the distillation tests: structured teacher activations, fresh feature maps."""
from __future__ import annotations

import torch

import rehyat_compile as rc
from rehyat_compile.distill import SiteSample, SiteSpec, structured_attention_inputs, teacher_attention


def site_problem(name, *, heads=2, head_dim=8, frames=6, tokens_per_frame=4, chunk_frames=1, overlap_frames=0,
                 n_samples=2, seed=0, feature_dim=16):
    """(spec, samples, (phi_q, phi_k)) for one synthetic site."""
    spec = SiteSpec(name, rc.attention.make_layout(tokens_per_frame, chunk_frames, overlap_frames), None)
    samples = []
    for i in range(n_samples):
        q, k, v = structured_attention_inputs(1, heads, frames, tokens_per_frame, head_dim, seed=seed * 100 + i)
        samples.append(SiteSample(q, k, v, teacher_attention(q, k, v)))
    torch.manual_seed(seed)
    maps = (rc.FeatureMap(heads, head_dim, feature_dim), rc.FeatureMap(heads, head_dim, feature_dim))
    return spec, samples, maps


def site_problems(names, **kw):
    specs, samples, maps = {}, {}, {}
    for i, name in enumerate(names):
        specs[name], samples[name], maps[name] = site_problem(name, seed=i, **kw)
    return specs, samples, maps
