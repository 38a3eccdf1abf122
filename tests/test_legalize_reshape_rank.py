"""passes/legalize_reshape_rank.py: reshape chains become one reshape, so no high-rank tensor sits
between them; values unchanged; high_rank_nodes names what is left."""
import torch

from htp_graphs import aten, portable, ranks, rewritten, run, targets
from rehyat_compile.passes.legalize_reshape_rank import fold_reshape_chains, high_rank_nodes


def test_a_chain_through_rank_7_folds_to_one_rank_3_reshape():
    x = torch.randn(2, 3, 4, 8)
    program = portable(lambda t: (t.reshape(2, 3, 2, 2, 2, 2, 2).clone().unsqueeze(0).reshape(6, 32) * 3), x)
    assert max(ranks(program)) >= 7 and high_rank_nodes(program.graph_module.graph)
    after, count = rewritten(program, fold_reshape_chains)
    assert count >= 1
    assert max(ranks(after)) <= 4 and high_rank_nodes(after.graph_module.graph) == []
    assert torch.equal(run(after, x), run(program, x))


def test_a_reshape_to_the_same_shape_is_dropped():
    x = torch.randn(3, 4)
    program = portable(lambda t: (t * 2).reshape(6, 2).reshape(3, 4) + 1, x)
    after, _ = rewritten(program, fold_reshape_chains)
    reshapes = targets(after)[aten.reshape.default] + targets(after)[aten.view.default]
    assert reshapes == 0
    assert torch.equal(run(after, x), run(program, x))


def test_an_elementwise_op_on_a_rank_6_tensor_stays_and_is_named():
    x = torch.randn(1, 2, 2, 2, 2, 3)
    program = portable(lambda t: (t * 2).sum(), x)
    after, _ = rewritten(program, fold_reshape_chains)
    left = high_rank_nodes(after.graph_module.graph)
    assert left and any("mul" in name for name, _, _ in left)
