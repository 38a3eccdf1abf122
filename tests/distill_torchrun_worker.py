"""One rank of the distributed distillation test, launched by torchrun (environment init: rc.distill
joins the gloo group itself). Writes its trained feature maps and report to ``<out_dir>/<rank>.pt``."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rehyat_compile as rc  # noqa: E402
from tests.distill_data import toy_setup  # noqa: E402

STEPS = 5

if __name__ == "__main__":
    torch.set_num_threads(1)
    teacher, hybrid, batches = toy_setup(batches=2)
    report = rc.distill(teacher, hybrid, batches, steps=STEPS, lr=1e-2, progress=False)
    torch.save({"state": hybrid.phi.state_dict(), "report": report.to_dict(), "backend": dist.get_backend()},
               os.path.join(sys.argv[1], f"{dist.get_rank()}.pt"))
    dist.destroy_process_group()
