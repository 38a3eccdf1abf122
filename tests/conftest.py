import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the fused Triton kernel runs in Triton's interpreter. @triton.jit reads this when a
# kernel is decorated, so it must be set before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def block_x():
    """A small hybrid block (tests/blocks.py), its input and its PyTorch output (backend tests)."""
    from blocks import block_and_input
    block, x = block_and_input()
    with torch.no_grad():
        ref = block(x)
    return block, x, ref
