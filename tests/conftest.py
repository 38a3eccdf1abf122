import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the fused Triton kernel runs in Triton's interpreter. @triton.jit reads this when a
# kernel is decorated, so it must be set before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
