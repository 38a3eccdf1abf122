"""passes/legalize_split.py: splits read by getitem become slices, same values; others untouched."""
import operator

import torch

from htp_graphs import aten, portable, rewritten, run, targets
from rehyat_compile.passes.legalize_split import split_as_slices


def test_split_with_sizes_becomes_one_slice_per_piece_with_equal_values():
    x = torch.randn(2, 10, 3)
    program = portable(lambda t: [p * (i + 1) for i, p in enumerate(t.split([3, 5, 2], dim=1))], x)
    assert targets(program)[aten.split_with_sizes.default] == 1
    after, count = rewritten(program, split_as_slices)
    assert count == 1
    got = targets(after)
    assert got[aten.split_with_sizes.default] == 0 and got[operator.getitem] == 0 and got[aten.slice.Tensor] >= 3
    for a, b in zip(run(after, x), run(program, x)):
        assert torch.equal(a, b)  # a slice is the same values, exactly


def test_equal_split_with_a_short_last_piece_keeps_its_length():
    x = torch.randn(7, 4)
    program = portable(lambda t: [p.sum(0) for p in t.split(3, dim=0)], x)
    after, count = rewritten(program, split_as_slices)
    assert count == 1
    for a, b in zip(run(after, x), run(program, x)):
        assert torch.equal(a, b)


def test_a_graph_without_splits_is_left_alone():
    x = torch.randn(4, 4)
    program = portable(lambda t: t[:, :2] + 1, x)
    after, count = rewritten(program, split_as_slices)
    assert count == 0 and targets(after) == targets(program)
