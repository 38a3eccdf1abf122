"""infer_input_frames: which inputs of a fixed-shape converted graph carry the frame axis, read from
the dataflow into the sites' token axes -- never from sizes. Each case gives sizes that a rule by
sizes would get wrong (a per-frame input whose size equals another dim, text that divides by the
frame count), and the negative cases must name the input and the op that blocks the walk."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import rehyat_compile as rc
from rehyat_compile.passes import pipeline
from rehyat_compile.passes.infer_input_frames import infer_input_frames
from rehyat_compile.passes.thread_state import FrameDim

HEADS, D, C = 2, 8, 16


def attend(proj, tokens):
    """Self-attention with packed [B, L, H, D] q/k/v, transposed around SDPA."""
    b, n, _ = tokens.shape
    q, k, v = (t.reshape(b, n, HEADS, D) for t in proj(tokens).chunk(3, -1))
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return tokens + out.transpose(1, 2).reshape(b, n, C)


class PerFrameInputs(nn.Module):
    """Video [B, C, T*pt, H, W] patched in time by ``pt``; a per-frame timestep [B, T]; frame indices
    [T] into a learned table; text joined before or after; ``int(T)`` makes the export static."""

    def __init__(self, patch_t=1, text_first=True, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.patch_t, self.text_first = patch_t, text_first
        self.config = {"patch_size_t": patch_t}  # where the export reads the temporal patch
        self.embed = nn.Conv3d(C, C, (patch_t, 1, 1), (patch_t, 1, 1))
        self.time = nn.Linear(1, C)
        self.frame_table = nn.Embedding(64, C)
        self.text = nn.Linear(12, C)
        self.layers = nn.ModuleList(nn.Linear(C, 3 * C) for _ in range(layers))

    def forward(self, x, timestep, frame_index, text):
        b, c, f, h, w = x.shape
        frames = int(f) // self.patch_t
        video = self.embed(x)                                                    # [B, C, T, H, W]
        video = video + self.time(timestep[..., None].float()).permute(0, 2, 1)[..., None, None]
        video = video + self.frame_table(frame_index).t()[None, :, :, None, None]
        video = video.flatten(2).transpose(1, 2)                                 # [B, T*H*W, C]
        words = self.text(text)
        tokens = torch.cat([words, video] if self.text_first else [video, words], 1)
        for proj in self.layers:
            tokens = attend(proj, tokens)
        n = frames * h * w
        out = tokens[:, -n:] if self.text_first else tokens[:, :n]
        return out.transpose(1, 2).reshape(b, c, frames, h, w)


def per_frame_inputs(frames, patch_t=1, text_tokens=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, C, frames * patch_t, 2, 3, generator=g), torch.rand(1, frames, generator=g) * 1000,
            torch.arange(frames), torch.randn(1, text_tokens, 12, generator=g))


def roles(model, args, **kw):
    hybrid = rc.transform(model.eval(), args, chunk_frames=2, overlap_frames=1, causal=False, **kw)
    gm = hybrid.graph_module(*args)
    assert not hybrid.plan.frame_axis.dynamic, "the test models export with a fixed frame count"
    return infer_input_frames(gm), gm


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("patch_t", [1, 2])
def test_per_frame_inputs_are_found_through_the_dataflow(patch_t, text_first):
    # 10 text tokens + 6 * 5 video tokens = 40: divisible by the 5 frames, and the timestep has 5
    # entries like the frame dim: neither size decides anything here
    result, _ = roles(PerFrameInputs(patch_t, text_first), per_frame_inputs(5, patch_t))
    assert result.unknown == ()
    assert result.dims == (FrameDim(2, patch_t), FrameDim(1, 1), FrameDim(0, 1), None)


def test_a_graph_pass_of_the_stream_variant_in_pipeline_order():
    names = [p.name for p in pipeline.VARIANTS["stream"]]
    assert names.index("infer_input_frames") < names.index("thread_state_matched")
    model, args = PerFrameInputs(), per_frame_inputs(4)
    hybrid = rc.transform(model.eval(), args, chunk_frames=2, overlap_frames=1, causal=False)
    ctx = pipeline.PassContext(hybrid.plan.frame_axis, settings={"frames": 4})
    result = pipeline.run(pipeline.INFER_INPUT_FRAMES, hybrid.graph_module(*args), ctx)
    assert result.artifacts["input_frames"].dim_of("timestep") == FrameDim(1, 1)


class ListOfVideos(nn.Module):
    """A list of per-sample videos [C, T, H, W], each embedded, then stacked into the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(C, C)
        self.layer = nn.Linear(C, 3 * C)

    def forward(self, videos: list):
        frames = int(videos[0].shape[1])
        tokens = torch.cat([self.embed(v.flatten(1).t())[None] for v in videos])   # [B, T*H*W, C]
        tokens = attend(self.layer, tokens)
        return [t.t().reshape(C, frames, *videos[0].shape[2:]) for t in tokens]


def test_each_video_of_a_list_gets_its_frame_dim():
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(C, 5, 2, 2, generator=g) for _ in range(3)]
    result, _ = roles(ListOfVideos(), (videos,), video_shape=(5, 2, 2))
    assert result.dims == (FrameDim(1, 1),) * 3 and result.unknown == ()


class ReversedReference(nn.Module):
    """Adds a second video read backwards in time: frame t of the output reads frame T-1-t of
    ``reference``, which no chunk holds; the walk cannot map the frames through the flip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(C, 3 * C)

    def forward(self, x, reference):
        b, c, f, h, w = x.shape
        tokens = (x + reference.flip(2)).flatten(2).transpose(1, 2)
        return attend(self.layer, tokens).transpose(1, 2).reshape(b, c, int(f), h, w)


def test_frames_reordered_leave_the_input_without_a_role_naming_the_op():
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, C, 4, 2, 2, generator=g), torch.randn(1, C, 4, 2, 2, generator=g)
    result, _ = roles(ReversedReference(), (x, ref))
    assert result.dim_of("x") == FrameDim(2, 1)
    (name, why), = result.unknown
    assert name == "reference" and result.dim_of("reference") is None
    assert "flip" in why and "reordered" in why


class LearnedFrameTable(nn.Module):
    """Adds a learned [1, C, T, 1, 1] table of exactly the example's frame count (as Latte does)."""

    def __init__(self, frames):
        super().__init__()
        torch.manual_seed(0)
        self.temporal = nn.Parameter(torch.randn(1, C, frames, 1, 1))
        self.layer = nn.Linear(C, 3 * C)

    def forward(self, x):
        b, c, f, h, w = x.shape
        tokens = (x + self.temporal).flatten(2).transpose(1, 2)
        return attend(self.layer, tokens).transpose(1, 2).reshape(b, c, int(f), h, w)


def test_a_constant_holding_the_frames_is_reported():
    x = torch.randn(1, C, 5, 2, 2)
    result, _ = roles(LearnedFrameTable(5), (x,))
    assert result.dims == (FrameDim(2, 1),)
    assert [(name.split(".")[-1], fr.dim, fr.plain) for name, fr in result.constants] == [("temporal", 2, True)]


class InterleavedBatch(nn.Module):
    """Folds the frames into the batch ([B*T, H*W, C], spatial mixing) and back before the attention
    over the frames: the frame axis passes through a batch-merged dim."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.spatial = nn.Linear(C, C)
        self.layer = nn.Linear(C, 3 * C)

    def forward(self, x):
        b, c, f, h, w = x.shape
        frames = int(f)
        per_frame = x.permute(0, 2, 3, 4, 1).reshape(b * frames, h * w, c)
        per_frame = per_frame + self.spatial(per_frame).mean(1, keepdim=True)
        tokens = per_frame.reshape(b, frames * h * w, c)
        return attend(self.layer, tokens).reshape(b, frames, h, w, c).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("batch", [1, 2])
def test_frames_through_a_batch_merged_dim(batch):
    x = torch.randn(batch, C, 4, 2, 2)
    result, _ = roles(InterleavedBatch(), (x,))
    assert result.dims == (FrameDim(2, 1),) and result.unknown == ()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(2, 6), text_tokens=st.integers(1, 24), text_first=st.booleans(),
       patch_t=st.sampled_from([1, 2]))
def test_roles_do_not_depend_on_the_sizes(frames, text_tokens, text_first, patch_t):
    result, _ = roles(PerFrameInputs(patch_t, text_first, layers=1),
                      per_frame_inputs(frames, patch_t, text_tokens=text_tokens))
    assert result.dims == (FrameDim(2, patch_t), FrameDim(1, 1), FrameDim(0, 1), None)
