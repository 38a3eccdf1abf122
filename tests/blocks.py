"""A small hand-written hybrid transformer block (and its recurrent step form) for backend tests.

Tokens are ``frames * tokens_per_frame`` video tokens of width ``dim``: [B, N, dim] -> [B, N, dim].
"""
from __future__ import annotations

import torch
from torch import nn

import rehyat_compile as rc


class HybridBlock(nn.Module):
    """Pre-norm block: q/k/v projections -> FeatureMap -> rc.hybrid_attention -> output
    projection, then an MLP. Layout: ``tokens_per_frame`` tokens per latent frame, Tc/To frames."""

    def __init__(self, dim=16, heads=2, feature_dim=8, tokens_per_frame=4, chunk_frames=2, overlap_frames=1):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.layout = dict(tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames,
                           overlap_frames=overlap_frames)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        self.phi_q = rc.FeatureMap(heads, self.head_dim, feature_dim)
        self.phi_k = rc.FeatureMap(heads, self.head_dim, feature_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def heads_of(self, x):
        """[B, N, dim] -> [B, H, N, D]."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project(self, x):
        h = self.norm1(x)
        q, k, v = (self.heads_of(f(h)) for f in (self.to_q, self.to_k, self.to_v))
        return q, k, v, self.phi_q(q), self.phi_k(k)

    def finish(self, x, attn):
        x = x + self.to_out(attn.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))

    def forward(self, x):
        q, k, v, fq, fk = self.project(x)
        return self.finish(x, rc.hybrid_attention(q, k, v, fq, fk, **self.layout))


class HybridBlockStep(nn.Module):
    """The block's recurrent step: (chunk tokens, *state) -> (chunk output, *next state), the state
    being the five HybridState tensors as explicit inputs and outputs (left out for the first chunk)."""

    state_names = rc.HybridState._fields

    def __init__(self, block: HybridBlock):
        super().__init__()
        self.block = block
        self.chunk_frames = block.layout["chunk_frames"]

    def forward(self, x, *state):
        q, k, v, fq, fk = self.block.project(x)
        state = rc.HybridState(*state) if state else None
        attn, new = rc.hybrid_attention_step(q, k, v, fq, fk, state, **self.block.layout)
        return (self.block.finish(x, attn), *new)


def block_and_input(frames=5, seed=0):
    torch.manual_seed(seed)
    block = HybridBlock().eval()
    x = torch.randn(1, frames * block.layout["tokens_per_frame"], 16)
    return block, x


def steady_state(block: HybridBlock, x):
    """A state after the first chunk (overlap filled), so step inputs have their steady shapes."""
    tc, m = block.layout["chunk_frames"], block.layout["tokens_per_frame"]
    q, k, v, fq, fk = block.project(x[:, : tc * m])
    _, state = rc.hybrid_attention_step(q, k, v, fq, fk, None, **block.layout)
    return tuple(state)


class HybridAttentionOnly(nn.Module):
    """Just the hybrid op on projected inputs (few kernels: for slow code generators)."""

    def __init__(self, dim=16, heads=2, feature_dim=8, tokens_per_frame=4, chunk_frames=2, overlap_frames=1):
        super().__init__()
        self.block = HybridBlock(dim, heads, feature_dim, tokens_per_frame, chunk_frames, overlap_frames)

    def forward(self, x):
        b = self.block
        q, k, v = (b.heads_of(f(x)) for f in (b.to_q, b.to_k, b.to_v))
        return rc.hybrid_attention(q, k, v, torch.relu(q), torch.relu(k), **b.layout)
