"""passes/legalize_softplus.py: core aten's decomposed softplus becomes one aten.softplus (ONNX
Softplus), same values; a where that is not a softplus is untouched."""
import torch
import torch.nn.functional as F

from htp_graphs import aten, portable, rewritten, run, targets
from rehyat_compile.passes.legalize_softplus import softplus_as_one_op


def test_decomposed_softplus_becomes_one_op_with_equal_values():
    x = torch.randn(64) * 30
    program = portable(lambda t: F.softplus(t) + F.softplus(t, beta=2.0, threshold=10.0), x)
    assert targets(program)[aten.log1p.default] == 2
    after, count = rewritten(program, softplus_as_one_op)
    assert count == 2
    got = targets(after)
    assert got[aten.softplus.default] == 2 and got[aten.log1p.default] == 0 and got[aten.where.self] == 0
    torch.testing.assert_close(run(after, x), run(program, x), atol=1e-6, rtol=1e-6)  # same fp32 function


def test_a_select_that_is_not_a_softplus_is_untouched():
    x = torch.randn(16)
    program = portable(lambda t: torch.where(t > 20, t, torch.log1p(torch.exp(2 * t))), x)
    after, count = rewritten(program, softplus_as_one_op)
    assert count == 0 and targets(after) == targets(program)
