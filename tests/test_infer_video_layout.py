"""passes/infer_video_layout.py: where the video sits in an attention's token axis
(N = extra_before + T*M + extra_after), read off the graph and never guessed; and whether the video
tokens are frame-major. What cannot be derived is declined with its ``Decline.code``."""
import re
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rehyat_compile.export import FrameAxis, export_video_model
from rehyat_compile.passes import pipeline
from rehyat_compile.passes.infer_video_layout import VideoLayout, frame_major, infer_video_layout, layout_site

C, HEADS, D = 8, 2, 8
RAW_SYMBOL = re.compile(r"\bs\d+\b")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * HEADS * D)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, HEADS * D)


class Video(nn.Module):
    """[B, C, F, 2, 2] -> tokens in ``order`` (``patch`` input frames per token frame) -> optional
    extra tokens ``before`` / ``after`` joined by ``aten.cat`` (``nested``: video and the tokens after
    it are joined first) or by zero ``pad`` -> one self-attention."""

    def __init__(self, order="thw", before=0, after=0, nested=False, pad=0, square=False, patch=1):
        super().__init__()
        torch.manual_seed(1)
        self.attn = Attention()
        self.order, self.nested, self.pad, self.square, self.patch = order, nested, pad, square, patch
        self.config = {"patch_size_t": patch}
        self.before, self.after = nn.Parameter(torch.randn(1, before, C)), nn.Parameter(torch.randn(1, after, C))

    def forward(self, x):
        b, c, f, h, w = x.shape
        if self.patch > 1:
            t = f // self.patch
            tokens = x.reshape(b, c, t, self.patch, h, w).permute(0, 2, 4, 5, 1, 3).reshape(b, t * h * w, -1)[..., :C]
        elif self.order == "thw":
            tokens = x.flatten(2).transpose(1, 2)
        elif self.order == "hwt":
            tokens = x.permute(0, 3, 4, 2, 1).reshape(b, -1, c)
        elif self.order == "htw":
            tokens = x.permute(0, 3, 2, 4, 1).reshape(b, -1, c)
        if self.square:
            tokens = tokens.repeat(1, f, 1)  # N = 4*T*T: not affine in the frames
        if self.pad:
            tokens = F.pad(tokens, (0, 0, self.pad, 0))
        before, after = self.before.expand(b, -1, -1), self.after.expand(b, -1, -1)
        if self.nested:
            pieces = [before, torch.cat([tokens, after], 1)]
        else:
            pieces = [p for p in (before, tokens, after) if p.shape[1]]
        return self.attn(torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0])


def video(frames=3, seed=0):
    return torch.randn(1, C, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=None)
def analysed(frames=3, video_shape=None, **kwargs):
    """The one site of ``Video(**kwargs)`` after canonicalize/find/classify/layout (T symbolic)."""
    model = Video(**kwargs).eval()
    ep, frame_axis = export_video_model(model, (video(frames * model.patch),), video_shape=video_shape)
    assert frame_axis.dynamic
    gm = ep.module()
    result = pipeline.run(pipeline.ANALYSIS, gm, pipeline.PassContext(frame_axis, model))
    [site] = result.sites
    analysed.graphs[site.name, frames, video_shape, tuple(sorted(kwargs.items()))] = gm
    return site, frame_axis


analysed.graphs = {}


@lru_cache(maxsize=None)
def static(frames=3, **kwargs):
    """(the site after find/classify, GraphModule) of ``Video(**kwargs)`` exported with fixed shapes."""
    return static_site(Video(**kwargs), video(frames))


def static_site(model, x):
    ep = torch.export.export(model.eval(), (x,), strict=False)
    gm = ep.module()
    [site] = pipeline.run((pipeline.CANONICALIZE, pipeline.FIND, pipeline.CLASSIFY), gm).sites
    assert site.decline is None
    return site, gm


def static_layout(site_and_graph, frames=3, video_shape=None):
    """The layout pass on a static export: the frame count from the input (x, time dim 2) or video_shape."""
    site, gm = site_and_graph
    axis = FrameAxis("x", 2, frames, 1, None, video_shape, "static export", 0)
    return pipeline.run(pipeline.LAYOUT, pipeline.PassResult(gm, (site,)), pipeline.PassContext(axis)).sites[0]


# ---------------------------------------------------------------------------------------------
# symbolic exports: the layout from N(T) and the concatenation that builds the sequence
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, layout, kind", [
    ({}, VideoLayout(4, 3, 0, 0), "self"),
    ({"before": 3}, VideoLayout(4, 3, 3, 0), "joint"),
    ({"after": 5}, VideoLayout(4, 3, 0, 5), "joint"),
    ({"before": 2, "after": 3}, VideoLayout(4, 3, 2, 3), "joint"),
    ({"before": 2, "after": 3, "nested": True}, VideoLayout(4, 3, 2, 3), "joint"),  # cat([text, cat([video, x])])
])
def test_video_and_extra_tokens_joined_by_cat_give_the_layout(kwargs, layout, kind):
    site, _ = analysed(**kwargs)
    assert (site.layout, site.kind, site.decline, site.frame_major) == (layout, kind, None, True)
    assert site.rewritable and site.video == (layout.extra_before, 3, 4)


def test_layout_frames_are_the_example_token_frames_after_the_temporal_patch():
    site, frame_axis = analysed(patch=2)
    assert frame_axis.patch == 2 and frame_axis.size == 6
    assert site.layout == VideoLayout(4, 3, 0, 0) and site.rewritable


def test_infer_video_layout_reads_the_same_layout_from_q_alone():
    site, frame_axis = analysed(before=2, after=3)
    assert infer_video_layout(site.match.q, frame_axis.symbol, 1, 3) == (VideoLayout(4, 3, 2, 3), None)
    # the layout is one of the graph, not of the example: another frame count gives only other frames
    assert infer_video_layout(site.match.q, frame_axis.symbol, 1, 7) == (VideoLayout(4, 7, 2, 3), None)


def test_extra_tokens_not_joined_by_cat_are_declined_layout_unknown():
    site, _ = analysed(pad=2)
    assert site.code == "layout-unknown" and site.layout is None and not site.rewritable
    assert "cannot locate the 4 tokens per frame × T frames of video among the 4 tokens per frame × T frames + 2" \
        in site.reason
    assert not RAW_SYMBOL.search(site.reason)


def test_sequence_not_affine_in_the_frames_is_declined_layout_unknown():
    site, _ = analysed(square=True)
    assert site.code == "layout-unknown" and "is not M * frames + extra" in site.reason
    assert "4·T^2 tokens" in site.reason and not RAW_SYMBOL.search(site.reason)


@pytest.mark.parametrize("order", ["hwt", "htw"])
def test_token_order_with_time_not_slowest_is_declined_not_frame_major(order):
    site, frame_axis = analysed(order=order)
    assert site.code == "not-frame-major" and site.frame_major is False and not site.rewritable
    assert site.layout == VideoLayout(4, 3, 0, 0)  # the layout itself is known; only the order is wrong
    assert frame_major(site.match.q, site.layout, frame_axis.symbol, 1) is False


def test_frame_major_is_verified_true_on_the_merge_that_builds_the_tokens():
    site, frame_axis = analysed()
    assert frame_major(site.match.q, site.layout, frame_axis.symbol, 1) is True


def test_frame_major_cannot_be_checked_for_one_frame_or_one_token_per_frame():
    site, frame_axis = analysed(order="hwt")
    for layout in (VideoLayout(4, 1, 0, 0), VideoLayout(1, 3, 0, 0)):
        assert frame_major(site.match.q, layout, frame_axis.symbol, 1) is None


def test_video_shape_agreeing_with_the_graph_keeps_the_layout():
    site, _ = analysed(before=3, video_shape=(3, 2, 2))
    assert site.layout == VideoLayout(4, 3, 3, 0) and site.rewritable


@pytest.mark.parametrize("video_shape", [(3, 3, 3), (5, 2, 2)])
def test_video_shape_disagreeing_with_the_graph_is_declined_layout_unknown(video_shape):
    site, _ = analysed(video_shape=video_shape)
    assert site.code == "layout-unknown" and f"video_shape={video_shape} disagrees" in site.reason
    assert "3 frames of 4 tokens" in site.reason and not RAW_SYMBOL.search(site.reason)


def test_layout_pass_leaves_declined_sites_as_they_were():
    site, frame_axis = analysed(pad=2)
    gm = analysed.graphs[site.name, 3, None, (("pad", 2),)]
    declined = site.declined("cross-attention", "decided earlier")
    again = pipeline.run(pipeline.LAYOUT, pipeline.PassResult(gm, (declined,)), pipeline.PassContext(frame_axis))
    assert again.sites == (declined,)


# ---------------------------------------------------------------------------------------------
# static exports: T from the input or video_shape, M from the concatenation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, video_shape, layout", [
    ({}, None, VideoLayout(4, 3, 0, 0)),
    ({}, (3, 2, 2), VideoLayout(4, 3, 0, 0)),
    ({"before": 2}, None, VideoLayout(4, 3, 2, 0)),              # 14 tokens: the 12-token piece is the video
    ({"before": 3, "after": 1}, None, VideoLayout(4, 3, 3, 1)),
    ({"before": 3}, (3, 2, 2), VideoLayout(4, 3, 3, 0)),
])
def test_static_export_layout_from_frames_or_video_shape_and_the_cat(kwargs, video_shape, layout):
    site = static_layout(static(**kwargs), video_shape=video_shape)
    assert site.layout == layout and site.rewritable and site.frame_major is True
    assert site.kind == ("joint" if layout.extra_before or layout.extra_after else "self")


@pytest.mark.parametrize("kwargs, layout", [
    ({"before": 3}, VideoLayout(4, 3, 3, 0)),               # 15 tokens: 3 frames also divide all of N
    ({"after": 6}, VideoLayout(4, 3, 0, 6)),                # 18 tokens, and the text piece (6) divides too
    ({"before": 3, "after": 3}, VideoLayout(4, 3, 3, 3)),
])
def test_static_export_takes_the_piece_the_frame_input_flows_into_not_any_divisible_one(kwargs, layout):
    site = static_layout(static(**kwargs))
    assert site.layout == layout and site.kind == "joint" and site.rewritable


def test_static_export_without_frames_or_video_shape_is_declined_layout_unknown():
    site, _ = static(before=2)
    out = layout_site(site, None, 1, None, None)
    assert out.code == "layout-unknown" and "pass video_shape=(frames, h, w)" in out.reason


def test_static_video_shape_larger_than_the_sequence_is_declined_not_over_video():
    out = static_layout(static(), video_shape=(4, 2, 2))
    assert out.code == "not-over-video" and "12 tokens, fewer than the 16 of video_shape=(4, 2, 2)" in out.reason


def test_static_sequence_the_frames_do_not_divide_is_declined_layout_unknown():
    out = static_layout(static(pad=2))  # 14 tokens, no cat: nothing a multiple of 3 frames
    assert out.code == "layout-unknown" and "cannot split" in out.reason


class PerFrame(nn.Module):
    """Attention over each frame's tokens, frames in the batch: [B*T, 4, C]."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        b, c, t, h, w = x.shape
        return self.attn(x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c))


def test_static_attention_with_frames_in_the_batch_is_declined_factorised():
    out = static_layout(static_site(PerFrame(), video()))
    assert out.code == "factorised" and "(4 tokens)" in out.reason and "batch (3)" in out.reason


class Pretokenised(nn.Module):
    """Takes tokens [B, T*M, C] already patchified (LTX-Video): no merge to check the order on."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, tokens):
        return self.attn(tokens)


def test_pretokenised_static_input_gets_its_layout_from_video_shape_and_frame_major_unknown():
    out = static_layout(static_site(Pretokenised(), torch.randn(1, 12, C)), video_shape=(3, 2, 2))
    assert out.layout == VideoLayout(4, 3, 0, 0) and out.frame_major is None and out.rewritable
