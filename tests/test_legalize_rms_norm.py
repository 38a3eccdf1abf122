"""passes/legalize_rms_norm.py: x * rsqrt(mean(x^2) + eps) becomes LayerNorm([x, -x])[..., :n];
values equal (1e-5, fp32 reassociation); a norm over another dim is untouched."""
import torch

from htp_graphs import aten, portable, rewritten, run, targets
from rehyat_compile.passes.legalize_rms_norm import rms_norm_as_layer_norm

TOL = 1e-5  # fp32: LayerNorm's mean/variance vs mean of squares; measured differences below 1e-6


def test_rms_norm_becomes_a_layer_norm_of_the_mirrored_input():
    norm = torch.nn.RMSNorm(32, eps=1e-6)
    x = torch.randn(2, 7, 32) * torch.rand(2, 7, 1)
    program = portable(norm, x)
    assert targets(program)[aten.rsqrt.default] == 1
    after, count = rewritten(program, rms_norm_as_layer_norm)
    assert count == 1
    got = targets(after)
    assert got[aten.rsqrt.default] == 0 and got[aten.native_layer_norm.default] == 1
    torch.testing.assert_close(run(after, x), run(program, x), atol=TOL, rtol=TOL)


def test_a_mean_square_over_another_dim_is_untouched():
    x = torch.randn(4, 8)
    program = portable(lambda t: t * torch.rsqrt(t.pow(2).mean(0, keepdim=True) + 1e-6), x)
    after, count = rewritten(program, rms_norm_as_layer_norm)
    assert count == 0 and targets(after) == targets(program)
