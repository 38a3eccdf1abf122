"""rc.stream on fixed-shape exports: which inputs are chunked comes from the graph
(passes/infer_input_frames.py), python ints that count frames are decided by chunk traces, and what
cannot be derived is refused before anything runs, naming the input. Models written the way official
repositories write them (tests/official_models.py) and the zoo's fixed-shape models."""
import pytest
import torch

import rehyat_compile as rc
from models import MODELS
from official_models import (CachedRopeDiT, ListVideoDiT, PaddedTextJointDiT, _POSITION_CACHE, cached_rope_inputs,
                             list_video_inputs, padded_text_inputs)
from rehyat_compile.passes.thread_state import FrameDim
from rehyat_compile.stream import FrameCount

TOL = dict(rtol=1e-4, atol=1e-5)


def close(a, b):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("frames,chunk_frames,overlap_frames", [(5, 2, 1), (7, 3, 0)])
def test_list_of_per_sample_videos_and_a_token_count_stream(frames, chunk_frames, overlap_frames):
    """Official-Wan style: x is a list of [C, F, H, W] videos, seq_len the token count they are padded to
    (here exactly the video's): each video is chunked along its frame dim, seq_len counts 4 tokens per frame."""
    torch.manual_seed(0)
    model = ListVideoDiT().eval()
    args = list_video_inputs(frames)
    with torch.no_grad():
        hybrid = rc.transform(model, args, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                              video_shape=(frames, 2, 2))
        runner = rc.stream(hybrid)
        close(runner(*args), hybrid(*args))
    dims = runner.program(*args).input_dims
    assert dims == [FrameDim(1, 1), FrameDim(1, 1), None, None, FrameCount(4)]


def test_a_token_count_with_padding_keeps_the_padding_in_every_chunk():
    """seq_len = 20 video tokens + 5 padding: the padding tokens are extra tokens of the self-attention,
    which a causal conversion copies into every chunk, so seq_len counts 4 tokens per frame + 5."""
    torch.manual_seed(0)
    model = ListVideoDiT().eval()
    args = list_video_inputs(5, seq_len=25)
    with torch.no_grad():
        hybrid = rc.transform(model, args, chunk_frames=2, overlap_frames=1, video_shape=(5, 2, 2))
        runner = rc.stream(hybrid)
        close(runner(*args), hybrid(*args))
    assert runner.program(*args).input_dims[-1] == FrameCount(4, 5)


def test_a_token_count_the_code_branches_on_is_refused_naming_it():
    """The model switches a setting when seq_len exceeds 12 tokens: kept, the chunk's padding differs
    from the whole video's; scaled to a chunk, the branch goes the other way. No role fits."""
    torch.manual_seed(0)
    model = ListVideoDiT(long_video_tokens=12).eval()
    args = list_video_inputs(5)
    with torch.no_grad():
        hybrid = rc.transform(model, args, chunk_frames=2, overlap_frames=1, video_shape=(5, 2, 2))
        with pytest.raises(rc.ConversionError, match=r"int inputs seq_len=20"):
            rc.stream(hybrid)(*args)


def test_padded_text_joint_model_is_causal_and_exact_with_one_chunk():
    """Text padded to 8 tokens (5 valid) joined with the video, its length max_seqlen = 4*T + 8 given as
    an int: streamed (the converted joint model runs as its stream) at Tc=2, To=1; one chunk equals the
    original; the last frame does not reach frame 0; max_seqlen counts 4 tokens per frame plus 8."""
    torch.manual_seed(0)
    model = PaddedTextJointDiT().eval()
    args = padded_text_inputs(5)
    with torch.no_grad():
        exact = rc.transform(model, args, chunk_frames=5, overlap_frames=1)
        close(exact(*args), model(*args))
        hybrid = rc.transform(model, args, chunk_frames=2, overlap_frames=1)
        out = hybrid(*args)
        runner = rc.stream(hybrid)
        close(runner(*args), out)
        changed = (args[0].clone(),) + args[1:]
        changed[0][:, :, -1] += 1.0
        later = hybrid(*changed)
    assert runner.program(*args).input_dims == [FrameDim(2, 1), None, None, FrameCount(4, 8)]
    torch.testing.assert_close(later[:, :, :2], out[:, :, :2], rtol=0, atol=1e-6)
    assert (later[:, :, -1] - out[:, :, -1]).abs().max() > 1e-3


def test_padded_text_streams_at_other_chunkings_and_lengths():
    torch.manual_seed(0)
    model = PaddedTextJointDiT().eval()
    args = padded_text_inputs(7, valid=3)
    with torch.no_grad():
        hybrid = rc.transform(model, args, chunk_frames=3, overlap_frames=0)
        close(rc.stream(hybrid)(*args), hybrid(*args))
        # the first chunk is the converted model on those frames alone (causal): one chunk, parallel graph
        x, context, text_lens, _ = args
        first = hybrid(x[:, :, :3].contiguous(), context, text_lens, 3 * 4 + 8)
        close(hybrid(*args)[:, :, :3], first)


def test_static_retry_with_a_cached_position_table_inspect_transform_stream_in_one_process():
    """The model reads int(T) (the export specialises: static) and caches its rotary table in a
    module-level dict. Every export empties and restores that cache, so no trace hands a fake tensor
    to the next one or to an eager call."""
    torch.manual_seed(0)
    _POSITION_CACHE.clear()
    model = CachedRopeDiT().eval()
    args = cached_rope_inputs(5)
    with torch.no_grad():
        original = model(*args)                       # fills the cache with the real table
        report = rc.inspect(model, args)
        assert not report.frame_axis.dynamic and "specialises" in report.frame_axis.reason
        assert [s.rewritable for s in report.sites if s.kind == "self"] == [True, True]
        hybrid = rc.transform(model, args, chunk_frames=2, overlap_frames=1)
        out = hybrid(*args)
        close(rc.stream(hybrid)(*args), out)
        close(model(*args), original)                 # eager calls still see real tables
    assert all(not isinstance(v, torch._subclasses.FakeTensor) for v in _POSITION_CACHE.values())
    assert (out - original).abs().max() > 1e-4        # Tc < T: a different function


@pytest.mark.slow
@pytest.mark.parametrize("name", ["anyflow", "kandinsky5", "cosmos"])
def test_zoo_fixed_shape_models_stream_with_roles_from_the_graph(name):
    """AnyFlow's per-frame timesteps [B, T], Kandinsky 5's list of per-axis rope positions, Cosmos'
    learned frame table: fixed-shape exports whose inputs are chunked by what the graph does."""
    model, args, kwargs = MODELS[name]()
    with torch.no_grad():
        hybrid = rc.transform(model.eval(), args, kwargs, chunk_frames=2, overlap_frames=1)
        close(rc.stream(hybrid)(*args, **kwargs), hybrid(*args, **kwargs))


def test_anyflow_per_frame_timesteps_are_chunked():
    model, args, kwargs = MODELS["anyflow"]()
    hybrid = rc.transform(model.eval(), args, kwargs, chunk_frames=2, overlap_frames=1)
    runner = rc.stream(hybrid)
    names = ["hidden_states", "timestep", "r_timestep", "encoder_hidden_states", "return_dict"]
    dims = dict(zip(names, runner.program(*args, **kwargs).input_dims))
    assert dims["timestep"] == dims["r_timestep"] == FrameDim(1, 1) and dims["encoder_hidden_states"] is None


def test_latte_is_refused_naming_its_fixed_length_table():
    model, args, kwargs = MODELS["latte"]()
    hybrid = rc.transform(model.eval(), args, kwargs, chunk_frames=2, overlap_frames=1)
    with pytest.raises(rc.ConversionError, match=r"temp_pos_embed' holds exactly 5 frames"):
        rc.stream(hybrid)(*args, **kwargs)


def test_a_reduction_over_frames_is_refused_naming_the_node():
    """A second video averaged over all its frames conditions every token: no chunk can compute it."""
    from torch import nn

    class PooledReference(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qkv = nn.Linear(8, 24)

        def forward(self, x, reference):
            b, c, f, h, w = x.shape
            frames = int(f)
            tokens = (x + reference.mean(2, keepdim=True) * reference).flatten(2).transpose(1, 2)
            q, k, v = (t.reshape(b, -1, 2, 4).transpose(1, 2) for t in self.qkv(tokens).chunk(3, -1))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
            return out.transpose(1, 2).reshape(b, c, frames, h, w)

    x, ref = torch.randn(1, 8, 4, 2, 2), torch.randn(1, 8, 4, 2, 2)
    hybrid = rc.transform(PooledReference().eval(), (x, ref), chunk_frames=2, overlap_frames=1)
    with pytest.raises(rc.ConversionError, match=r"mean.*reduces over the frame axis"):
        rc.stream(hybrid)(x, ref)
