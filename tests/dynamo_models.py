"""Models ``torch.export`` cannot take whole, written the way official research repos write them
(tests/test_dynamo_capture.py converts them through Dynamo capture).

:class:`OfficialStyleDiT` follows the official Wan2.1 code (``wan/modules/model.py``): per-sample
grid sizes built from shapes and read back with ``grid_sizes.tolist()`` inside ``forward``, inside
the rotary embedding and in ``unpatchify``; q, k, v packed as [B, L, H, D] with transposes around
SDPA (its ``flash_attention`` fallback); an ``.item()`` on a shape tensor (Open-Sora's
``height[0].item()``); cross-attention to text.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_params(max_seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[max_seq_len, dim // 2] rotation angles (official ``rope_params``, real instead of complex)."""
    return torch.outer(torch.arange(max_seq_len, dtype=torch.float32),
                       1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_apply(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D], grid_sizes [B, 3] (frames, h, w) -> x rotated per (frame, row, column) axis."""
    n, c = x.size(2), x.size(3) // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        angles = torch.cat([parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                            parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                            parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(seq_len, 1, -1)
        x_i = x[i, :seq_len].reshape(seq_len, n, -1, 2)
        re, im = x_i[..., 0], x_i[..., 1]
        cos, sin = angles.cos(), angles.sin()
        x_i = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(2)
        output.append(torch.cat([x_i, x[i, seq_len:]]))
    return torch.stack(output).float()


def flash_attention(q, k, v):
    """q, k, v [B, L, H, D] -> [B, L, H, D] (the official SDPA fallback: q, k cast to v's dtype,
    transposes around SDPA)."""
    q, k, v = q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, grid_sizes, freqs):
        b, s, n, d = *x.shape[:2], self.heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        x = flash_attention(rope_apply(q, grid_sizes, freqs), rope_apply(k, grid_sizes, freqs), v)
        return self.o(x.flatten(2))


class CrossAttention(SelfAttention):
    def forward(self, x, context):
        b, n, d = x.size(0), self.heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        return self.o(flash_attention(q, k, v).flatten(2))


class JointSelfAttention(SelfAttention):
    """Self-attention over [video tokens, text tokens] (joint attention, HunyuanVideo-style; RoPE on the
    video only); returns the video tokens' output."""

    def forward(self, x, grid_sizes, freqs, context):
        b, s, n, d = *x.shape[:2], self.heads, self.head_dim
        q = rope_apply(self.norm_q(self.q(x)).view(b, s, n, d), grid_sizes, freqs)
        k = rope_apply(self.norm_k(self.k(x)).view(b, s, n, d), grid_sizes, freqs)
        v = self.v(x).view(b, s, n, d)
        qt, kt, vt = (f(context).view(b, -1, n, d) for f in (self.norm_q, self.norm_k, nn.Identity()))
        out = flash_attention(torch.cat([q, qt.float()], 1), torch.cat([k, kt.float()], 1), torch.cat([v, vt], 1))
        return self.o(out[:, :s].flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, joint: bool = False):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.joint = joint
        self.self_attn = (JointSelfAttention if joint else SelfAttention)(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 3, dim) / dim ** 0.5)

    def forward(self, x, e, grid_sizes, freqs, context):
        shift, scale, gate = (self.modulation + e.unsqueeze(1)).chunk(3, dim=1)
        extra = (context,) if self.joint else ()
        x = x + gate * self.self_attn(self.norm1(x) * (1 + scale) + shift, grid_sizes, freqs, *extra)
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x))


class OfficialStyleDiT(nn.Module):
    """x [B, C, F, H, W] (latent video), t [B] (timesteps), context [B, L, text_dim] -> [B, C, F, H, W].
    ``joint=True``: the self-attention runs over [video, text] tokens (extra tokens after the video)."""

    def __init__(self, in_dim: int = 4, dim: int = 32, heads: int = 2, layers: int = 2, text_dim: int = 16,
                 patch_size=(1, 2, 2), joint: bool = False):
        super().__init__()
        self.patch_size, self.in_dim = patch_size, in_dim
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, joint) for _ in range(layers))
        self.head = nn.Linear(dim, in_dim * patch_size[0] * patch_size[1] * patch_size[2])
        d = dim // heads
        self.freqs = torch.cat([rope_params(64, d - 4 * (d // 6)), rope_params(64, 2 * (d // 6)),
                                rope_params(64, 2 * (d // 6))], dim=1)

    def sinusoidal(self, t):
        half = torch.arange(8, dtype=torch.float32, device=t.device)
        angles = t.float()[:, None] * torch.pow(10000.0, -half / 8)[None]
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(self, x, t, context):
        if self.freqs.device != x[0].device:  # as the official Wan2.1 model moves its rope table
            self.freqs = self.freqs.to(x[0].device)
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = torch.cat([u.flatten(2).transpose(1, 2) for u in x])
        frames = grid_sizes[0, 0].item()  # Open-Sora-style read of a shape tensor
        if frames < 1:
            raise ValueError("empty video")
        e = self.time_embedding(self.sinusoidal(t).to(x.dtype))
        context = self.text_embedding(context)
        for block in self.blocks:
            x = block(x, e, grid_sizes, self.freqs, context)
        return self.unpatchify(self.head(x), grid_sizes)

    def unpatchify(self, x, grid_sizes):
        c, out = self.in_dim, []
        for u, v in zip(x, grid_sizes.tolist()):
            u = u[: v[0] * v[1] * v[2]].view(*v, *self.patch_size, c)
            u = torch.einsum("fhwpqrc->cfphqwr", u)
            out.append(u.reshape(c, *[i * j for i, j in zip(v, self.patch_size)]))
        return torch.stack(out)


def make_official_style(frames: int = 5, *, batch: int = 1, seed: int = 0, layers: int = 2, joint: bool = False,
                        text: int = 6):
    """(model, args, kwargs): the official-style DiT (eval, seeded), a [batch, 4, frames, 8, 8] video,
    timesteps and ``text`` tokens of context."""
    torch.manual_seed(seed)
    model = OfficialStyleDiT(layers=layers, joint=joint).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 4, frames, 8, 8, generator=gen)
    return model, (x, torch.full((batch,), 500), torch.randn(batch, text, 16, generator=gen)), {}


class NoAttention(nn.Module):
    """An MLP over video tokens that branches in python on a tensor value (so export fails, as
    HunyuanVideo-1.5's ``if torch.all(image_embeds == 0)``) and has no attention at all."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        if torch.all(x == 0):
            return tokens * 0
        return tokens


class DynamoRefuses(nn.Module):
    """A model neither torch.export nor Dynamo can capture: its code refuses to be traced."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if torch.compiler.is_compiling():
            raise RuntimeError("this forward refuses to be traced")
        return self.proj(x.flatten(2).transpose(1, 2))
