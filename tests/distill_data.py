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


class ToyHybrid(torch.nn.Module):
    """Two attention layers written as the rewrite writes them: one hybrid-op call per site, fq and fk
    computed by FeatureMap modules. ``graph_module()`` is its fx graph with the sites tagged, as
    ``HybridModel.graph_module`` gives it; ``ToyTeacher`` is the same model with softmax attention."""

    def __init__(self, dim=16, heads=2, tokens=20, tokens_per_frame=4, feature_dim=8, layers=2):
        super().__init__()
        self.heads, self.tokens, self.dim, self.tpf = heads, tokens, dim, tokens_per_frame
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.phi = torch.nn.ModuleList(rc.FeatureMap(heads, dim // heads, feature_dim) for _ in range(2 * layers))
        self._graph = None

    def heads_first(self, t):
        return t.reshape(1, self.tokens, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x):
        for i, proj in enumerate(self.qkv):
            qkv = proj(x)
            q, k, v = (self.heads_first(qkv[..., j * self.dim:(j + 1) * self.dim]) for j in range(3))
            y = torch.ops.rehyat.hybrid_attention.default(q, k, v, self.phi[2 * i](q), self.phi[2 * i + 1](k),
                                                          self.tpf, 1, 0, True, 0, 0, 0.25)
            x = x + y.transpose(1, 2).reshape(1, self.tokens, self.dim)
        return x

    def graph_module(self, *args, **kwargs):
        if self._graph is None:
            class KeepFeatureMaps(torch.fx.Tracer):
                def is_leaf_module(self, m, name):
                    return isinstance(m, rc.FeatureMap) or super().is_leaf_module(m, name)

            graph = KeepFeatureMaps().trace(self)
            gm = torch.fx.GraphModule(self, graph)
            sites = [n for n in gm.graph.nodes if n.target is torch.ops.rehyat.hybrid_attention.default]
            for i, node in enumerate(sites):
                node.meta["rehyat_site"] = f"layer{i}"
            object.__setattr__(self, "_graph", gm)
        return self._graph


class ToyTeacher(torch.nn.Module):
    def __init__(self, hybrid: ToyHybrid):
        super().__init__()
        self.hybrid = hybrid

    def forward(self, x):
        h = self.hybrid
        for proj in h.qkv:
            qkv = proj(x)
            q, k, v = (h.heads_first(qkv[..., j * h.dim:(j + 1) * h.dim]) for j in range(3))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
            x = x + y.transpose(1, 2).reshape(1, h.tokens, h.dim)
        return x


def toy_setup(seed=0, batches=3):
    torch.manual_seed(seed)
    hybrid = ToyHybrid()
    g = torch.Generator().manual_seed(seed + 1)
    data = [((torch.randn(1, hybrid.tokens, hybrid.dim, generator=g),), {}) for _ in range(batches)]
    return ToyTeacher(hybrid), hybrid, data
