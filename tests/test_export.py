"""export_video_model: which input dim is time, symbolic when the code allows, static fallback with reason."""
import pytest
import torch
from torch import nn

from rehyat_compile.errors import ConversionError
from rehyat_compile.export import export_video_model, find_frame_input


class Configured(nn.Module):
    def __init__(self, in_channels=4, specialise=False):
        super().__init__()
        self.config = {"in_channels": in_channels, "patch_size": (1, 2, 2)}
        self.specialise = specialise

    def forward(self, hidden_states, scale=1.0):
        if self.specialise and hidden_states.shape[2] == 5:  # python branch on the frame count
            return hidden_states * 2
        return hidden_states.flatten(2).softmax(-1) * scale


def test_time_dim_rules():
    model = Configured()
    assert find_frame_input(model, (torch.zeros(1, 4, 5, 2, 2),), {})[::2] == ("hidden_states", 2)
    assert find_frame_input(model, (torch.zeros(1, 5, 4, 2, 2),), {})[2] == 1      # [B, T, C, H, W]
    assert find_frame_input(model, (torch.zeros(1, 5, 2, 2, 4),), {})[2] == 1      # [B, T, H, W, C]
    assert find_frame_input(model, (torch.zeros(1, 4, 5, 2, 2),), {}, frames=3)[2] == 3
    assert find_frame_input(model, (), {"hidden_states": torch.zeros(3, 7)}, frames=("hidden_states", 0))[2] == 0
    assert find_frame_input(model, (torch.zeros(3, 7),), {}) is None
    with pytest.raises(ValueError, match="no input named"):
        find_frame_input(model, (torch.zeros(1, 4, 5, 2, 2),), {}, frames=("video", 2))
    with pytest.raises(ValueError, match="out of range"):
        find_frame_input(model, (torch.zeros(1, 4, 5, 2, 2),), {}, frames=7)


def test_symbolic_frames_and_static_fallback_with_reason():
    x = torch.randn(1, 4, 5, 2, 2)
    _, axis = export_video_model(Configured(), (x,))
    assert axis.dynamic and axis.input == "hidden_states" and axis.dim == 2 and axis.patch == 1 and axis.frames == 5
    _, axis = export_video_model(Configured(specialise=True), (x,), video_shape=(5, 1, 1))
    assert not axis.dynamic and "specialises the frame axis" in axis.reason and axis.video_shape == (5, 1, 1)
    with pytest.raises(ValueError, match="video_shape"):
        export_video_model(Configured(), (x,), video_shape=(5, 1))
    with pytest.raises(ConversionError, match="cannot be exported"):
        export_video_model(nn.Identity(), (lambda: 0,))
