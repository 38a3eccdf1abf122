"""Joint text+video models converted with causal=True are one function with their stream
(docs/hybrid_attention.md, "joint models, causal"): every chunk carries its own copy of the extra
tokens, so the converted model's earlier frames never see later ones, through any number of layers."""
import pytest
import torch

import rehyat_compile as rc

from models import MODELS

# every joint model of rehyat_compile/zoo.py (EXPECTED kind "joint")
JOINT = ["hunyuan-video", "cogvideox-1.0", "cogvideox-1.5", "mochi", "easyanimate", "consisid", "motif-video",
         "helios"]  # and hunyuan-video-framepack: refused, below


def _convert(name, frames, chunk_frames, overlap_frames):
    model, args, kwargs = MODELS[name]()
    patch = rc.export.temporal_patch(model)
    model, args, kwargs = MODELS[name](frames * patch)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=chunk_frames, overlap_frames=overlap_frames)
    return hybrid, args, kwargs, patch


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@pytest.mark.slow
@pytest.mark.parametrize("name", JOINT)
def test_joint_causal_conversion_equals_its_stream_and_ignores_later_frames(name):
    for frames in (5, 7):
        hybrid, args, kwargs, patch = _convert(name, frames, 2, 1)
        for sibling in (hybrid, hybrid.with_options(chunk_frames=3, overlap_frames=0)):
            assert sibling.runs_recurrently(*args, **kwargs)
            with torch.no_grad():
                converted = _first(sibling(*args, **kwargs))
                streamed = _first(rc.stream(sibling)(*args, **kwargs))
            torch.testing.assert_close(streamed, converted, rtol=1e-4, atol=1e-5)
    # causality: the last frame changes, the first chunk's output does not (Tc=2, To=1, 7 frames)
    axis = hybrid.plan.frame_axis
    video = args[0]
    changed = video.clone()
    changed.narrow(axis.dim, video.shape[axis.dim] - patch, patch).add_(1.0)
    with torch.no_grad():
        before = _first(hybrid(*args, **kwargs))
        after = _first(hybrid(changed, *args[1:], **kwargs))
    first_chunk = 2 * patch
    torch.testing.assert_close(after.narrow(axis.dim, 0, first_chunk), before.narrow(axis.dim, 0, first_chunk),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(after, before)


def test_framepack_causal_conversion_is_refused_before_it_runs_naming_the_blocking_node():
    """HunyuanVideo-Framepack concatenates its video and history tokens at sizes computed from data
    (unbacked sizes in the export): which entries are frames cannot be followed through that cat, so
    the causal conversion, which must run chunk by chunk, refuses when called (one chunk still runs)."""
    hybrid, args, kwargs, _ = _convert("hunyuan-video-framepack", 5, 2, 1)
    with torch.no_grad(), pytest.raises(rc.ConversionError, match=r"cat_\d+ \(aten.cat.default\).*data-dependent size"):
        hybrid(*args, **kwargs)
    one_chunk = hybrid.with_options(chunk_frames=5)
    with torch.no_grad():
        assert torch.isfinite(_first(one_chunk(*args, **kwargs))).all()


@pytest.mark.slow
def test_joint_conversion_with_one_chunk_is_the_original_and_non_causal_stays_parallel():
    hybrid, args, kwargs, _ = _convert("cogvideox-1.5", 5, 16, 1)
    with torch.no_grad():
        reference = _first(hybrid.original(*args, **kwargs))
        torch.testing.assert_close(_first(hybrid(*args, **kwargs)), reference, rtol=1e-4, atol=1e-5)
        global_text = hybrid.with_options(chunk_frames=2, causal=False)
        assert not global_text.runs_recurrently(*args, **kwargs)
        assert torch.isfinite(_first(global_text(*args, **kwargs))).all()
