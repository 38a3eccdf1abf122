"""Every accepted spelling of softmax attention is found and converted exactly (parity at Tc >= T,
one match per spelling), and near misses are reported with a reason, never silently converted."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rehyat_compile as rc
from rehyat_compile.errors import ConversionError

HEADS, D, C = 2, 8, 16


def _heads(x, layout="bhnd"):
    """[B, N, H*D] -> [B, H, N, D] (or [B, N, H, D])."""
    b, n, _ = x.shape
    x = x.reshape(b, n, HEADS, D)
    return x if layout == "bnhd" else x.transpose(1, 2)


def _attend(q, k, v, spelling, text=None):
    """Attention in the named spelling; q, k, v: [B, H, N, D]. Returns [B, H, N, D]."""
    scale = 1 / math.sqrt(D)
    if spelling == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if spelling == "matmul-mul":
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    if spelling == "matmul-div":
        return (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v
    if spelling == "scale-on-q":
        return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1) @ v
    if spelling == "scale-split":
        return torch.softmax((q * scale ** 0.5) @ (k * scale ** 0.5).transpose(-1, -2), dim=-1) @ v
    if spelling == "bmm":
        b, h, n, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
        return torch.bmm(torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * scale, -1), v3).reshape(b, h, n, d)
    if spelling == "baddbmm":
        b, h, n, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
        bias = torch.zeros(b * h, 1, n)
        scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=1.0, alpha=scale)
        return torch.bmm(scores.softmax(-1), v3).reshape(b, h, n, d)
    if spelling == "einsum":
        return torch.einsum("bhnm,bhmd->bhnd", torch.einsum("bhnd,bhmd->bhnm", q, k).mul(scale).softmax(-1), v)
    if spelling == "einsum-bnhd":
        qn, kn, vn = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, H, D] producers
        p = torch.einsum("bnhd,bmhd->bhnm", qn, kn).mul(scale).softmax(-1)
        return torch.einsum("bhnm,bmhd->bnhd", p, vn).transpose(1, 2)
    if spelling == "casts-dropout":
        p = torch.softmax((q @ k.transpose(-1, -2) * scale).float(), dim=-1).to(q.dtype)
        return F.dropout(p, p=0.0, training=False) @ v
    if spelling == "safe-softmax":
        return torch.ops.aten._safe_softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    if spelling in ("additive-mask", "masked-fill", "where-mask"):
        keep = torch.ones(q.shape[2], dtype=torch.bool)
        keep[-3:] = False  # the last 3 keys are masked (extra tokens after the video)
        scores = q @ k.transpose(-1, -2) * scale
        if spelling == "additive-mask":
            scores = scores + torch.zeros(q.shape[2]).masked_fill(~keep, float("-inf"))
        elif spelling == "masked-fill":
            scores = scores.masked_fill(~keep, float("-inf"))
        else:
            scores = torch.where(keep, scores, torch.tensor(float("-inf")))
        return scores.softmax(-1) @ v
    if spelling == "sdpa-gqa":
        return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
    if spelling == "manual-gqa":
        k1, v1 = k[:, :1].repeat_interleave(HEADS, dim=1), v[:, :1].repeat_interleave(HEADS, dim=1)
        return torch.softmax(q @ k1.transpose(-1, -2) * scale, dim=-1) @ v1
    # ---- near misses ----
    if spelling == "softmax-query-axis":
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-2) @ v
    if spelling == "softmax-reused":
        p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        return p @ v + p.mean(-1, keepdim=True)
    if spelling == "cross":
        kt, vt = _heads(text), _heads(text)
        return torch.softmax(q @ kt.transpose(-1, -2) * scale, dim=-1) @ vt
    raise ValueError(spelling)


class VideoAttention(nn.Module):
    """[B, C, T, H, W] -> tokens (frame-major) -> one attention in the given spelling -> back."""

    def __init__(self, spelling, extra=0):
        super().__init__()
        torch.manual_seed(0)
        self.spelling, self.extra = spelling, extra
        self.qkv = nn.Linear(C, 3 * HEADS * D)
        self.out = nn.Linear(HEADS * D, C)
        self.text = nn.Linear(C, HEADS * D)
        self.register_buffer("extra_tokens", torch.randn(1, extra, C) if extra else torch.zeros(1, 0, C))

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        if self.extra:
            tokens = torch.cat([tokens, self.extra_tokens.expand(b, -1, -1)], dim=1)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        text = self.text(self.extra_tokens[:, :3].expand(b, -1, -1)) if self.spelling == "cross" else None
        o = _attend(_heads(q), _heads(k), _heads(v), self.spelling, text)
        o = self.out(o.transpose(1, 2).reshape(b, -1, HEADS * D))[:, : t * h * w]
        return o.transpose(1, 2).reshape(b, c, t, h, w)


def _video(frames=4):
    return torch.randn(1, C, frames, 2, 2, generator=torch.Generator().manual_seed(1))


SPELLINGS = {  # spelling -> (form reported, extra tokens)
    "sdpa": ("sdpa", 0), "matmul-mul": ("matmul-softmax", 0), "matmul-div": ("matmul-softmax", 0),
    "scale-on-q": ("matmul-softmax", 0), "scale-split": ("matmul-softmax", 0), "bmm": ("bmm-softmax", 0),
    "baddbmm": ("baddbmm-softmax", 0), "einsum": ("einsum-softmax", 0), "einsum-bnhd": ("einsum-softmax", 0),
    "casts-dropout": ("matmul-softmax", 0), "safe-softmax": ("matmul-softmax", 0),
    "additive-mask": ("matmul-softmax", 3), "masked-fill": ("matmul-softmax", 3),
    "where-mask": ("matmul-softmax", 3), "sdpa-gqa": ("sdpa", 0), "manual-gqa": ("matmul-softmax", 0),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_is_found_once_and_converts_exactly(spelling):
    form, extra = SPELLINGS[spelling]
    model = VideoAttention(spelling, extra).eval()
    x = _video()
    report = rc.inspect(model, (x,))
    assert [(s.form, s.rewritable) for s in report.sites] == [(form, True)], str(report)
    site = report.sites[0]
    assert site.video == (0, 4, 4) and site.layout.extra_after == extra
    assert math.isclose(site.scale, 1 / math.sqrt(D), rel_tol=1e-6)
    with torch.no_grad():
        reference = model(x)
        hybrid = rc.transform(model, (x,), chunk_frames=4, overlap_frames=1)
        assert ((hybrid(x) - reference).norm() / reference.norm()).item() < 1e-4
        chunked = rc.transform(model, (x,), chunk_frames=2, overlap_frames=1)
        other = chunked(x)
    assert torch.isfinite(other).all() and not torch.allclose(other, reference, atol=1e-5)


@pytest.mark.parametrize("spelling, reason", [
    ("softmax-query-axis", "not the key (last) axis"),
    ("softmax-reused", "reused elsewhere"),
    ("cross", "cross-attention"),
])
def test_near_misses_are_reported_with_a_reason_and_not_converted(spelling, reason):
    model = VideoAttention(spelling).eval()
    report = rc.inspect(model, (_video(),))
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert not site.rewritable and reason in site.reason
    assert reason.split()[0] in str(report)
    with pytest.raises(ConversionError, match="no attention site can be converted"):
        rc.transform(model, (_video(),))


def test_model_without_attention_reports_nothing_and_transform_refuses():
    model = nn.Sequential(nn.Conv3d(C, C, 1), nn.GELU())
    report = rc.inspect(model, (_video(),))
    assert report.sites == [] and "no softmax attention found" in str(report)
    assert report.to_dict()["sites"] == []
    with pytest.raises(ConversionError, match="no attention site"):
        rc.transform(model, (_video(),))


class Unexportable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent python control flow: torch.export cannot trace it
            return x.cpu().numpy()
        return x


def test_unexportable_model_without_attention_gives_a_clear_error():
    """torch.export refuses it; Dynamo captures it (tests/test_dynamo_capture.py), finds no attention."""
    report = rc.inspect(Unexportable(), (_video(),))
    assert report.capture == "dynamo" and report.sites == []
    with pytest.raises(ConversionError, match="no attention site"):
        rc.transform(Unexportable(), (_video(),))


def test_wrong_video_shape_is_declined_with_reason_and_model_left_whole():
    model = VideoAttention("sdpa").eval()
    report = rc.inspect(model, (_video(),), video_shape=(4, 3, 3))
    assert not report.sites[0].rewritable and "video_shape=(4, 3, 3) disagrees" in report.sites[0].reason
    with pytest.raises(ConversionError):
        rc.transform(model, (_video(),), video_shape=(4, 3, 3))
    with pytest.raises(ValueError, match="video_shape"):
        rc.inspect(model, (_video(),), video_shape=(4, 0))


class TimeFastest(VideoAttention):
    """Tokens ordered (h, w, t): time is the fastest axis, so token chunks are not frames."""

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 3, 4, 2, 1).reshape(b, h * w * t, c)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        o = _attend(_heads(q), _heads(k), _heads(v), "sdpa")
        return self.out(o.transpose(1, 2).reshape(b, -1, HEADS * D))


def test_time_fastest_token_order_is_declined_and_frame_major_is_verified():
    report = rc.inspect(TimeFastest("sdpa").eval(), (_video(),))
    assert not report.sites[0].rewritable and "not frame-major" in report.sites[0].reason
    good = rc.inspect(VideoAttention("sdpa").eval(), (_video(),))
    assert good.sites[0].frame_major is True


class FlexVideoAttention(VideoAttention):
    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention
        b, c, t, h, w = x.shape
        q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        o = flex_attention(_heads(q), _heads(k), _heads(v), score_mod=lambda s, b_, h_, qi, ki: s + (qi - ki))
        return self.out(o.transpose(1, 2).reshape(b, -1, HEADS * D)).transpose(1, 2).reshape(b, c, t, h, w)


def test_flex_attention_is_declined_with_reason():
    model = FlexVideoAttention("sdpa").eval().requires_grad_(False)  # CPU flex_attention has no backward
    report = rc.inspect(model, (_video(),))
    assert [(s.form, s.rewritable) for s in report.sites] == [("flex_attention", False)]
    assert "score_mod" in report.sites[0].reason
