"""passes/legalize_softmax.py: SDPA's safe-softmax guard dropped and {0, -inf} masks made
multiplicative, so no infinity is left for a quantiser; values equal (1e-6: exp/sum reassociation)."""
import math

import torch
import torch.nn.functional as F

from htp_graphs import aten, portable, rewritten, run, targets
from rehyat_compile.passes.legalize_softmax import drop_softmax_guards, multiplicative_masks

TOL = 1e-6  # fp32 softmax rewritten as exp * mask / sum: differences measured below 2e-7


def _both(graph):
    return drop_softmax_guards(graph) + multiplicative_masks(graph)


def _infinities(program) -> int:
    return sum(1 for n in program.graph_module.graph.nodes for a in n.args if isinstance(a, float) and math.isinf(a))


def test_masked_sdpa_has_no_infinity_left_and_equal_values():
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4)
    mask = torch.rand(8, 12) > 0.3
    mask[:, 0] = True  # every query keeps a key
    program = portable(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m), q, k, v, mask)
    assert _infinities(program) > 0 and targets(program)[aten.any.dim] == 1
    after, count = rewritten(program, _both)
    assert count == 2
    assert _infinities(after) == 0 and targets(after)[aten._softmax.default] == 0
    assert targets(after)[aten.any.dim] == 0 and targets(after)[aten.amax.default] == 1
    torch.testing.assert_close(run(after, q, k, v, mask), run(program, q, k, v, mask), atol=TOL, rtol=TOL)


def test_unmasked_sdpa_keeps_its_softmax_without_the_guard():
    q = torch.randn(1, 2, 8, 4)
    program = portable(lambda a: F.scaled_dot_product_attention(a, a, a), q)
    after, count = rewritten(program, _both)
    assert count == 1 and targets(after)[aten._softmax.default] == 1 and targets(after)[aten.eq.Scalar] == 0
    assert torch.equal(run(after, q), run(program, q))


def test_a_plain_softmax_and_a_where_with_other_values_are_untouched():
    x = torch.randn(4, 6)
    program = portable(lambda t: torch.softmax(t + torch.where(t > 0, 0.0, -5.0), -1), x)
    after, count = rewritten(program, _both)
    assert count == 0 and targets(after) == targets(program)
