"""passes/legalize_permute_rank.py: permutes composed, and those above rank 5 rewritten as
reshape -> coalesced permute -> reshape; values unchanged; rank-5 permutes untouched."""
import torch

from htp_graphs import aten, portable, rewritten, run, targets
from rehyat_compile.passes.legalize_permute_rank import (HTP_MAX_RANK, coalesce_permutation, compose_permutes,
                                                         lower_permute_rank)


def _both(graph):
    return compose_permutes(graph) + lower_permute_rank(graph)


def _permute_ranks(program):
    return [n.meta["val"].dim() for n in program.graph_module.graph.nodes if n.target is aten.permute.default]


def test_coalescing_merges_neighbours_and_drops_unit_dims():
    # Wan's unpatchify: (b, f, h, w, pt, ph, pw, c) -> (b, c, f, pt, h, ph, w, pw)
    assert coalesce_permutation([1, 5, 4, 4, 1, 2, 2, 4], [0, 7, 1, 4, 2, 5, 3, 6]) == (
        [20, 4, 2, 2, 4], [4, 0, 2, 1, 3])
    assert coalesce_permutation([2, 3, 4], [0, 1, 2]) == ([24], [0])


def test_unpatchify_permute_of_rank_8_runs_at_rank_5_with_equal_values():
    x = torch.randn(1, 5, 4, 4, 1, 2, 2, 4)
    program = portable(lambda t: t.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5), x)
    assert max(_permute_ranks(program)) == 8
    after, count = rewritten(program, _both)
    assert count == 1
    assert _permute_ranks(after) == [5]
    assert torch.equal(run(after, x), run(program, x))


def test_a_permute_and_its_inverse_cancel():
    x = torch.randn(1, 2, 3, 4, 5, 6)
    program = portable(lambda t: t.movedim(3, -1).permute(0, 1, 2, 5, 3, 4) * 2, x)
    after, count = rewritten(program, _both)
    assert targets(after)[aten.permute.default] == 0 and count >= 1
    assert torch.equal(run(after, x), run(program, x))


def test_permutes_within_the_limit_are_untouched():
    x = torch.randn(2, 3, 4, 5, 6)
    program = portable(lambda t: t.permute(0, 2, 1, 4, 3) + 1, x)
    assert max(_permute_ranks(program)) == HTP_MAX_RANK
    after, count = rewritten(program, _both)
    assert count == 0 and targets(after) == targets(program)
