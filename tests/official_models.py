"""Tiny video DiTs written the way official research repositories write them (not diffusers):
packed ``[B, L, H, D]`` q/k/v with transposes around SDPA, lists of per-sample videos, a token
count ``seq_len`` the sequence is padded to, padded text with its valid length, a position table
cached by a module-level function. Random weights; used by the streaming tests of input roles
(tests/test_stream_inputs.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

C, DIM, HEADS, TEXT_DIM = 4, 32, 2, 16


class PackedSelfAttention(nn.Module):
    """q, k, v as [B, L, H, D], transposed to [B, H, L, D] around SDPA (as flash-attn users write it);
    ``rope``: [L, D/2] angles applied to q and k, or None."""

    def __init__(self, dim=DIM, heads=HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, rope=None, key_mask=None):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim) for p in (self.q, self.k, self.v))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class PackedCrossAttention(nn.Module):
    """Video queries over text keys [B, Lt, H, D]; ``text_mask`` [B, Lt] marks the valid text."""

    def __init__(self, dim=DIM, heads=HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context, text_mask=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = (p(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2) for p in (self.k, self.v))
        mask = None if text_mask is None else text_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def apply_rope(x, angles):
    """x [B, L, H, D] rotated by ``angles`` [L, D/2] (complex multiplication, as official repos do)."""
    b, n, h, d = x.shape
    z = torch.view_as_complex(x.float().reshape(b, n, h, d // 2, 2))
    rotated = z * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def rope_angles(frames, h, w, dim=DIM // HEADS):
    """[frames*h*w, dim/2] angles: a third of the pairs per axis (time, height, width)."""
    parts = []
    per_axis = dim // 2 // 3
    sizes = (frames, h, w)
    for axis, size in enumerate(sizes):
        n = per_axis if axis < 2 else dim // 2 - 2 * per_axis
        inv = 1.0 / (10000 ** (torch.arange(n, dtype=torch.float32) / n))
        pos = torch.arange(size, dtype=torch.float32)
        shape = [1, 1, 1]
        shape[axis] = size
        grid = (pos[:, None] * inv[None]).view(*shape, n).expand(frames, h, w, n)
        parts.append(grid)
    return torch.cat(parts, -1).reshape(frames * h * w, dim // 2)


class Block(nn.Module):
    def __init__(self, dim=DIM):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.self_attn, self.cross_attn = PackedSelfAttention(dim), PackedCrossAttention(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 2 * dim)

    def forward(self, x, t_emb, context, rope=None, text_mask=None):
        shift, scale = self.modulation(t_emb).unsqueeze(1).chunk(2, dim=-1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale) + shift, rope)
        x = x + self.cross_attn(self.norm2(x), context, text_mask)
        return x + self.ffn(self.norm3(x))


def timestep_embedding(t, dim=DIM):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class ListVideoDiT(nn.Module):
    """Official-Wan style: ``x`` a list of per-sample videos [C, F, H, W]; each is patch-embedded,
    flattened and padded to ``seq_len`` tokens, and the batch is their concatenation. The output is
    the list of per-sample videos."""

    def __init__(self, layers=2, patch=(1, 2, 2), long_video_tokens=None):
        super().__init__()
        self.patch = patch
        self.long_video_tokens = long_video_tokens  # python branch on seq_len (a long-video setting)
        self.patch_embedding = nn.Conv3d(C, DIM, patch, patch)
        self.text_embedding = nn.Linear(TEXT_DIM, DIM)
        self.time_embedding = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(DIM, C * math.prod(patch))

    def forward(self, x: list, t, context, seq_len: int):
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grids = [tuple(u.shape[2:]) for u in x]
        x = [u.flatten(2).transpose(1, 2) for u in x]
        x = torch.cat([torch.cat([u, u.new_zeros(1, seq_len - u.size(1), u.size(2))], dim=1) for u in x])
        t_emb = self.time_embedding(timestep_embedding(t))
        if self.long_video_tokens is not None and seq_len > self.long_video_tokens:
            t_emb = t_emb * 0.5
        context = self.text_embedding(context)
        rope = rope_angles(*grids[0])
        rope = torch.cat([rope, rope.new_zeros(seq_len - rope.shape[0], rope.shape[1])])
        for block in self.blocks:
            x = block(x, t_emb, context, rope)
        x = self.head(x)
        return [self.unpatchify(u[:math.prod(g)], g) for u, g in zip(x, grids)]

    def unpatchify(self, u, grid):
        pt, ph, pw = self.patch
        f, h, w = grid
        u = u.view(f, h, w, pt, ph, pw, C)
        return torch.einsum("fhwpqrc->cfphqwr", u).reshape(C, f * pt, h * ph, w * pw)


def list_video_inputs(frames=5, batch=2, seq_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    videos = [torch.randn(C, frames, 4, 4, generator=g) for _ in range(batch)]
    tokens = frames * 2 * 2
    return (videos, torch.tensor([500.0] * batch), torch.randn(batch, 6, TEXT_DIM, generator=g),
            tokens if seq_len is None else seq_len)


class JointBlock(nn.Module):
    """MMDiT style: video and text tokens in one attention; padded text keys masked out."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.norm_x, self.norm_c = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = PackedSelfAttention(dim)
        self.ffn_x = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ffn_c = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, c, keep):
        n = x.shape[1]
        joint = self.attn(torch.cat([self.norm_x(x), self.norm_c(c)], 1), key_mask=keep)
        x, c = x + joint[:, :n], c + joint[:, n:]
        return x + self.ffn_x(x), c + self.ffn_c(c)


class PaddedTextJointDiT(nn.Module):
    """Joint video+text attention with text padded to a fixed length: ``text_lens`` [B] gives the
    valid text tokens, ``max_seqlen`` the joint sequence length (video + padded text), as varlen
    flash-attention callers pass it."""

    def __init__(self, layers=2):
        super().__init__()
        self.patch_embedding = nn.Conv3d(C, DIM, (1, 2, 2), (1, 2, 2))
        self.text_embedding = nn.Linear(TEXT_DIM, DIM)
        self.blocks = nn.ModuleList(JointBlock() for _ in range(layers))
        self.head = nn.Linear(DIM, C * 4)

    def forward(self, x, context, text_lens, max_seqlen: int):
        b, _, f, h, w = x.shape
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        c = self.text_embedding(context)
        video = x.shape[1]
        position = torch.arange(max_seqlen, device=x.device)[None]
        keep = (position < video) | ((position - video) < text_lens[:, None])
        for block in self.blocks:
            x, c = block(x, c, keep)
        x = self.head(x).view(b, f, h // 2, w // 2, C, 2, 2)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, C, f, h, w)


def padded_text_inputs(frames=5, text=8, valid=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, frames, 4, 4, generator=g)
    context = torch.randn(1, text, TEXT_DIM, generator=g)
    context[:, valid:] = 0
    return (x, context, torch.tensor([valid]), frames * 4 + text)


_POSITION_CACHE: dict = {}


def cached_positions(frames: int, h: int, w: int) -> torch.Tensor:
    """Rotary angles cached per grid, as official repos cache them (a module-level dict)."""
    key = (frames, h, w)
    if key not in _POSITION_CACHE:
        _POSITION_CACHE[key] = rope_angles(frames, h, w)
    return _POSITION_CACHE[key]


class CachedRopeDiT(nn.Module):
    """Reads the frame count as a python int (``int(x.shape[2])``, so the export is static) and takes
    its rotary table from :func:`cached_positions`."""

    def __init__(self, layers=2):
        super().__init__()
        self.patch_embedding = nn.Conv3d(C, DIM, (1, 2, 2), (1, 2, 2))
        self.text_embedding = nn.Linear(TEXT_DIM, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(DIM, C * 4)

    def forward(self, x, t, context):
        b, _, f, h, w = x.shape
        frames = int(f)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        rope = cached_positions(frames, h // 2, w // 2)
        t_emb = timestep_embedding(t)
        context = self.text_embedding(context)
        for block in self.blocks:
            x = block(x, t_emb, context, rope)
        x = self.head(x).view(b, f, h // 2, w // 2, C, 2, 2)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, C, f, h, w)


def cached_rope_inputs(frames=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, C, frames, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 6, TEXT_DIM, generator=g))
