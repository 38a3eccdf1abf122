"""One rank of the distributed fine-tuning test, launched by torchrun (rc.finetune joins the gloo group
itself). Writes its weights and report to ``<out_dir>/<rank>.pt``."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rehyat_compile as rc  # noqa: E402
from tests.test_finetune import STEPS, output_energy, toy_finetune_setup  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    hybrid, data = toy_finetune_setup()
    report = rc.finetune(hybrid, data, steps=STEPS, lr=1e-2, loss=output_energy, progress=False)
    torch.save({"state": hybrid.state_dict(), "report": report.to_dict(), "backend": dist.get_backend()},
               os.path.join(sys.argv[1], f"{dist.get_rank()}.pt"))
    dist.destroy_process_group()
