"""transform on real diffusers video transformers (tiny, random weights): exact at Tc >= T, finite and
different with real chunking; SanaVideo (linear attention) declined."""
import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.errors import ConversionError

from models import FRAMES, MODELS

# what inspect must find: (converted self/joint sites, kind of the converted sites)
EXPECTED = {
    "wan2.1-t2v": (2, "self"), "wan2.1-i2v": (2, "self"), "wan-vace": (4, "self"), "skyreels-v2": (2, "self"),
    "helios": (2, "joint"), "cogvideox-1.0": (2, "joint"), "cogvideox-1.5": (2, "joint"),
    "hunyuan-video": (2, "joint"), "mochi": (2, "joint"), "ltx-video": (2, "self"), "allegro": (2, "self"),
    "easyanimate": (2, "joint"), "cosmos": (2, "self"), "chronoedit": (2, "self"), "anyflow": (2, "self"),
    "consisid": (2, "joint"), "hunyuan-video-framepack": (2, "joint"), "motif-video": (2, "joint"),
    "latte": (1, "self"), "kandinsky5": (2, "self"), "ltx2-video": (2, "self"),
}
VIDEO_SHAPE = {"ltx-video": (5, 4, 4), "ltx2-video": (5, 4, 4)}  # LTX takes pre-patchified tokens and ints: static export


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# joint models whose step program cannot be built yet (inputs cut per chunk by size: the streaming issue)
NOT_STREAMING = {"hunyuan-video-framepack"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transform_one_chunk_equals_original_and_chunking_differs(name):
    model, args, kwargs = MODELS[name]()
    with torch.no_grad():
        reference = model(*args, **kwargs)[0]
        whole = rc.transform(model, args, kwargs, video_shape=VIDEO_SHAPE.get(name), frames=FRAMES.get(name),
                             chunk_frames=16, overlap_frames=1)
        count, kind = EXPECTED[name]
        assert len(whole.sites) == count
        assert {s.kind for s in whole.sites} == {kind}
        assert _rel(whole(*args, **kwargs)[0], reference) < 1e-4
        chunked = whole.with_options(chunk_frames=2, overlap_frames=1)  # same export, real chunking
        if name in NOT_STREAMING:  # joint causal conversions run chunk by chunk: refused before running
            with pytest.raises(rc.ConversionError, match="causal=False"):
                chunked(*args, **kwargs)
            chunked = whole.with_options(chunk_frames=2, overlap_frames=1, causal=False)
        out = chunked(*args, **kwargs)[0]
    assert torch.isfinite(out).all()
    assert _rel(out, reference) > 1e-4
    gm = chunked.graph_module(*args, **kwargs)
    ops = [n for n in gm.graph.nodes if n.target == torch.ops.rehyat.hybrid_attention.default]
    assert sorted(n.meta["rehyat_site"] for n in ops) == sorted(s.name for s in chunked.sites)


@pytest.mark.slow
def test_sana_video_linear_attention_is_declined_with_reason():
    model, args, kwargs = MODELS["sana-video"]()
    report = rc.inspect(model, args, kwargs)
    linear = [s for s in report.sites if s.form == "linear-attention"]
    assert len(linear) == 2 and all(not s.rewritable and "linear attention" in s.reason for s in linear)
    assert not report.rewritable
    with pytest.raises(ConversionError, match="no attention site can be converted"):
        rc.transform(model, args, kwargs)


def test_hunyuan_text_refiner_is_not_video_and_key_mask_survives():
    model, args, kwargs = MODELS["hunyuan-video"]()
    report = rc.inspect(model, args, kwargs)
    refiner = [s for s in report.sites if "token_refiner" in s.module]
    assert refiner and all(not s.rewritable and "not over video tokens" in s.reason for s in refiner)
    joint = report.rewritable
    assert [s.video for s in joint] == [(0, 5, 16)] * 2  # text after the video: offset 0, 7 extra after
    assert all(s.layout.extra_after == 7 and s.match.mask is not None for s in joint)


def test_hunyuan_video_1_5_data_dependent_branch_gives_a_clear_export_error():
    """The export itself refuses; rc.inspect / rc.transform then capture it through Dynamo
    (tests/test_dynamo_capture.py)."""
    model, args, kwargs = MODELS["hunyuan-video-1.5"]()
    with pytest.raises(ConversionError, match="cannot be exported with torch.export: GuardOnDataDependentSymNode"):
        rc.export_video_model(model, args, kwargs)


@pytest.mark.slow
def test_bf16_model_converts_with_bf16_feature_maps_and_masked_text():
    model, args, kwargs = MODELS["hunyuan-video"]()
    model = model.to(torch.bfloat16)
    args = tuple(a.to(torch.bfloat16) for a in args)
    kwargs = {n: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for n, v in kwargs.items()}
    with torch.no_grad():
        reference = model(*args, **kwargs)[0].float()
        hybrid = rc.transform(model, args, kwargs, chunk_frames=16)
        out = hybrid(*args, **kwargs)[0]
        chunked = hybrid.with_options(chunk_frames=2)(*args, **kwargs)[0]
    assert out.dtype == torch.bfloat16 and hybrid.feature_maps[hybrid.sites[0].key].phi_q.w1.dtype == torch.bfloat16
    assert _rel(out.float(), reference) < 1e-2 and torch.isfinite(chunked).all()
