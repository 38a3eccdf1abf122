"""The video range of a joint sequence comes from the dataflow (which concatenated piece the video input
flows into), not from divisibility: text lengths that make the whole sequence divide by the frame count,
text before and after the video, and 1-frame traces keep the layout (offset, frames, tokens per frame)."""
import pytest
import torch
from torch import nn

import rehyat_compile as rc

HEADS, D, C, TEXT_IN = 2, 8, 16, 12


class JointStatic(nn.Module):
    """[B, C, T, 2, 3] video (6 tokens per frame) joined with ``text`` tokens before or after it, two
    joint self-attention layers; ``int(T)`` in the code makes torch.export specialise the frame count."""

    def __init__(self, text_tokens, text_first=True, embed_jointly=False):
        super().__init__()
        torch.manual_seed(0)
        self.text_first, self.text_tokens, self.embed_jointly = text_first, text_tokens, embed_jointly
        self.register_buffer("positions", torch.randn(1, 256, C))
        self.patch = nn.Linear(C, C)
        self.text = nn.Linear(TEXT_IN, C)
        self.layers = nn.ModuleList(nn.Linear(C, 3 * C) for _ in range(2))

    def _attend(self, proj, tokens):
        b, n, _ = tokens.shape
        q, k, v = (t.reshape(b, n, HEADS, D).transpose(1, 2) for t in proj(tokens).chunk(3, -1))
        return tokens + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, C)

    def forward(self, x, text):
        b, c, t, h, w = x.shape
        frames = int(t)  # specialises the export: a static layout
        video = self.patch(x.flatten(2).transpose(1, 2)).reshape(b, frames * h * w, c)
        words = self.text(text)
        if self.embed_jointly:  # as CogVideoX: one positional table over [text, video], then split again
            joint = torch.cat([words, video], dim=1)
            joint = joint + self.positions[:, :joint.shape[1]]
            words, video = joint[:, :self.text_tokens], joint[:, self.text_tokens:]
        tokens = torch.cat([words, video] if self.text_first else [video, words], dim=1)
        for proj in self.layers:
            tokens = self._attend(proj, tokens)
        video_out = tokens[:, self.text_tokens:] if self.text_first else tokens[:, :frames * h * w]
        return video_out.transpose(1, 2).reshape(b, c, t, h, w)


def _inputs(frames, text_tokens):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, C, frames, 2, 3, generator=g), torch.randn(1, text_tokens, TEXT_IN, generator=g)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("frames,text_tokens", [(5, 10), (5, 30), (4, 12), (1, 10)])
def test_joint_layout_comes_from_the_video_input_not_from_divisibility(frames, text_tokens, text_first):
    """10 + 6*5 = 40 and 30 + 6*5 = 60 divide by 5 frames (the text too), 12 + 6*4 by 4, and every
    length divides by 1 frame: the layout is still 6 tokens per frame at the text's side."""
    model = JointStatic(text_tokens, text_first).eval()
    x, text = _inputs(frames, text_tokens)
    report = rc.inspect(model, (x, text))
    assert not report.frame_axis.dynamic, "the model is meant to export with a fixed frame count"
    offset = text_tokens if text_first else 0
    assert [(s.video, s.extra_after, s.kind) for s in report.sites] == \
        [((offset, frames, 6), 0 if text_first else text_tokens, "joint")] * 2, str(report)


@pytest.mark.parametrize("frames", [1, 5])
def test_text_sliced_off_a_joint_embedding_is_not_taken_for_video(frames):
    """Text and video embedded as one sequence and split by slices (CogVideoX's patch embedding): the
    text slice does not reach the video input, so the layout holds at 1 frame too."""
    model = JointStatic(10, embed_jointly=True).eval()
    x, text = _inputs(frames, 10)
    report = rc.inspect(model, (x, text))
    assert [s.video for s in report.sites] == [(10, frames, 6)] * 2, str(report)


def test_joint_static_model_converts_exactly_with_one_chunk():
    model = JointStatic(10).eval()
    x, text = _inputs(5, 10)
    with torch.no_grad():
        hybrid = rc.transform(model, (x, text), chunk_frames=8, overlap_frames=1)
        torch.testing.assert_close(hybrid(x, text), model(x, text), rtol=1e-4, atol=1e-5)
