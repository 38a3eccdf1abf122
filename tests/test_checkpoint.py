"""save_hybrid / load_hybrid: exact round trip, clear errors for another architecture."""
import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.errors import ConversionError
from tests.models import make_wan_t2v


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, args, kwargs = make_wan_t2v(frames=4)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1, feature_dim=8)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for distillation: weights unlike a fresh init
        for p in hybrid.feature_maps.parameters():
            p.add_(0.5 * torch.randn_like(p))
    path = rc.save_hybrid(hybrid, tmp_path_factory.mktemp("ckpt") / "wan.safetensors")
    with torch.no_grad():
        expected = hybrid(*args, **kwargs)
    return path, args, kwargs, expected, hybrid


def test_load_reproduces_outputs_exactly(saved):
    path, args, kwargs, expected, hybrid = saved
    fresh, _, _ = make_wan_t2v(frames=4)
    loaded = rc.load_hybrid(fresh, path)  # lazy: converted on the first call, weights already in place
    with torch.no_grad():
        out = loaded(*args, **kwargs)
    assert torch.equal(out[0], expected[0])
    assert loaded.conversion["chunk_frames"] == 2 and loaded.conversion["layers"] == hybrid.conversion["layers"]
    for (k, a), (_, b) in zip(sorted(hybrid.feature_maps.state_dict().items()),
                              sorted(loaded.feature_maps.state_dict().items())):
        assert torch.equal(a, b), k


def test_load_into_another_architecture_names_the_difference(saved):
    path = saved[0]
    from diffusers import WanTransformer3DModel
    wider = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=64)
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn1.*other parameters"):
        rc.load_hybrid(wider, path)
    with pytest.raises(ConversionError, match="model class is"):
        rc.load_hybrid(torch.nn.Linear(3, 3), path)


def test_bad_paths_and_unconverted_hybrids_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        rc.load_hybrid(torch.nn.Linear(3, 3), tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a rehyat-compile hybrid checkpoint"):
        rc.load_hybrid(torch.nn.Linear(3, 3), tmp_path / "other.safetensors")
    model, _, _ = make_wan_t2v(frames=4)
    with pytest.raises(ValueError, match="call it once"):
        rc.save_hybrid(rc.transform(model), tmp_path / "x.safetensors")
