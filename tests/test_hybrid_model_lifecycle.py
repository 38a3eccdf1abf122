"""HybridModel through a training loop's life: train/eval modes are part of what a graph is traced for,
deep copies (EMA) and pickles work, state dicts load with a clear error before the first trace, and
``layers`` is checked where it is given."""
import copy
import io

import pytest
import torch
from torch import nn

import rehyat_compile as rc
from rehyat_compile.errors import ConversionError

from .test_find_attention import VideoAttention, _video


class AttentionThenDropout(nn.Module):
    """One convertible attention, then dropout on the output (what training mode changes)."""

    def __init__(self):
        super().__init__()
        self.attn = VideoAttention("sdpa")
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.attn(x))


def test_eval_after_a_train_mode_trace_is_deterministic_and_train_after_eval_drops_out():
    x = _video()
    model = AttentionThenDropout().train()
    hybrid = rc.transform(model, (x,), chunk_frames=2, overlap_frames=1)  # traced in train mode
    with torch.no_grad():
        train_a, train_b = hybrid(x), hybrid(x)
        assert not torch.equal(train_a, train_b)  # dropout is live in train mode
        hybrid.eval()
        eval_a, eval_b = hybrid(x), hybrid(x)
        torch.testing.assert_close(eval_a, eval_b, rtol=0, atol=0)
        hybrid.train()
        assert not torch.equal(hybrid(x), hybrid(x))
        hybrid.eval()
        torch.testing.assert_close(hybrid(x), eval_a, rtol=0, atol=0)


def test_deepcopy_gives_an_independent_equal_model():
    x = _video()
    hybrid = rc.transform(AttentionThenDropout().eval(), (x,), chunk_frames=2, overlap_frames=1)
    ema = copy.deepcopy(hybrid)
    with torch.no_grad():
        torch.testing.assert_close(ema(x), hybrid(x))
        next(iter(ema.feature_maps.parameters())).add_(1.0)
        assert not torch.allclose(ema(x), hybrid(x))
    assert ema.plan.options == hybrid.plan.options and ema.original is not hybrid.original


def test_torch_save_and_load_round_trip():
    x = _video()
    hybrid = rc.transform(AttentionThenDropout().eval(), (x,), chunk_frames=2, overlap_frames=1)
    buffer = io.BytesIO()
    torch.save(hybrid, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), hybrid(x))
    assert [s.name for s in loaded.sites] == [s.name for s in hybrid.sites]


def test_load_state_dict_before_the_first_trace_names_the_way_out_and_works_after_one_call():
    x = _video()
    source = rc.transform(AttentionThenDropout().eval(), (x,), chunk_frames=2, overlap_frames=1)
    state = source.state_dict()
    lazy = rc.transform(AttentionThenDropout().eval(), chunk_frames=2, overlap_frames=1)
    with pytest.raises(ConversionError, match="call the model once|Call the model once") as err:
        lazy.load_state_dict(state)
    assert "rc.load_hybrid" in str(err.value)
    with torch.no_grad():
        lazy(x)
        lazy.load_state_dict(state)
        torch.testing.assert_close(lazy(x), source(x))


def test_layers_takes_one_name_as_a_string_and_refuses_an_empty_list():
    x = _video()
    hybrid = rc.transform(AttentionThenDropout().eval(), (x,), layers="attn", chunk_frames=2)
    assert [s.name for s in hybrid.sites] == ["attn"]
    with pytest.raises(ValueError, match=r"layers=\[\] selects no attention site"):
        rc.transform(AttentionThenDropout().eval(), (x,), layers=[])
    with pytest.raises(TypeError, match="layers must be"):
        rc.transform(AttentionThenDropout().eval(), (x,), layers=[3])


@pytest.mark.slow
def test_stream_leaves_the_model_unchanged_also_when_it_traces_chunk_length_inputs():
    """LTX-Video with video_shape: the stream traces chunk-length inputs with another video_shape,
    through HybridModel.graph_module_for, never by editing the model."""
    from tests.models import MODELS
    model, args, kwargs = MODELS["ltx-video"](5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=4, overlap_frames=1, video_shape=(5, 4, 4))
    plan, sites = hybrid.plan, [s.name for s in hybrid.sites]
    attributes = {k: id(v) for k, v in vars(hybrid).items() if k not in ("_programs", "_traces", "_runner")}
    with torch.no_grad():
        streamed = rc.stream(hybrid)(*args, **kwargs)[0]
        torch.testing.assert_close(streamed, hybrid(*args, **kwargs)[0], rtol=1e-4, atol=1e-5)
    assert hybrid.plan is plan and [s.name for s in hybrid.sites] == sites and plan.video_shape == (5, 4, 4)
    assert {k: id(v) for k, v in vars(hybrid).items() if k not in ("_programs", "_traces", "_runner")} == attributes
