"""HybridModel: stands in for the original, owns trainable phi, re-exports, exposes sites and taps."""
import pytest
import torch
from torch import nn

import rehyat_compile as rc

from .test_find_attention import VideoAttention, _video


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = VideoAttention("sdpa"), VideoAttention("matmul-mul")
        self.config = {"in_channels": 16}

    def forward(self, x):
        return self.b(self.a(x))


def test_hybrid_is_trainable_passes_attributes_and_tags_sites():
    model = TwoLayers().eval()
    x = _video()
    hybrid = rc.transform(model, (x,), chunk_frames=2, overlap_frames=1)
    assert hybrid.config == {"in_channels": 16} and hybrid.dtype == torch.float32
    assert sorted(hybrid.feature_maps) == ["a", "b"]
    assert all(p.requires_grad for p in hybrid.feature_maps.parameters())
    names = set(hybrid.state_dict())
    assert "feature_maps.a.phi_q.w1" in names and "original.a.qkv.weight" in names
    hybrid(x).sum().backward()
    assert hybrid.feature_maps["a"].phi_k.w1.grad is not None
    gm = hybrid.graph_module(x)
    sites = [n.meta["rehyat_site"] for n in gm.graph.nodes if n.target == torch.ops.rehyat.hybrid_attention.default]
    assert sites == ["a", "b"]
    taps = hybrid.site_tensors(x)
    assert set(taps) == {"a", "b"} and taps["a"]["q"].shape == (1, 2, 16, 8)
    assert hybrid.conversion["layers"] == ["a", "b"]
    site = hybrid.sites[0]
    assert (site.chunk_frames, site.overlap_frames, site.causal, site.tokens_per_frame) == (2, 1, True, 4)
    assert (site.extra_before, site.extra_after, site.heads, site.kv_heads) == (0, 0, 2, 2)
    sibling = hybrid.with_options(chunk_frames=4)
    assert sibling.feature_maps is hybrid.feature_maps and sibling.sites[0].chunk_frames == 4


def test_layers_selects_sites_and_lazy_transform_traces_on_first_call():
    model = TwoLayers().eval()
    x = _video()
    lazy = rc.transform(model, layers=["b"], chunk_frames=2)
    assert lazy.sites == []
    with torch.no_grad():
        lazy(x)
    assert [s.name for s in lazy.sites] == ["b"] and list(lazy.feature_maps) == ["b"]
    with pytest.raises(ValueError, match="names no attention site"):
        rc.transform(model, (x,), layers=["nope"])


def test_hybrid_reexports_and_runs_other_frame_counts():
    model = TwoLayers().eval()
    hybrid = rc.transform(model, (_video(4),), chunk_frames=2, overlap_frames=1)
    ep = torch.export.export(hybrid, (_video(4),))
    ops = [n for n in ep.graph.nodes if n.target == torch.ops.rehyat.hybrid_attention.default]
    assert len(ops) == 2
    with torch.no_grad():
        assert torch.allclose(ep.module()(_video(4)), hybrid(_video(4)), atol=1e-5)
        assert hybrid(_video(6)).shape == (1, 16, 6, 2, 2)  # same graph, symbolic frames
