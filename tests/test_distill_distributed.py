"""rc.distill under torchrun with 2 gloo processes on CPU: sites sharded, result equal to one process."""
import subprocess
import sys
from pathlib import Path

import torch

import rehyat_compile as rc
from tests.distill_data import toy_setup

WORKER = Path(__file__).with_name("distill_torchrun_worker.py")


def test_torchrun_two_gloo_processes_shard_sites_and_match_one_process(tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    teacher, hybrid, batches = toy_setup(batches=2)
    single = rc.distill(teacher, hybrid, batches, steps=5, lr=1e-2, progress=False)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for res in results:  # every rank ends with every site's trained weights, equal to one process's
        assert res["backend"] == "gloo" and res["report"]["world_size"] == 2
        for name, tensor in hybrid.phi.state_dict().items():
            torch.testing.assert_close(res["state"][name], tensor, rtol=1e-5, atol=1e-6)
    ranks = {name: site["rank"] for name, site in results[0]["report"]["per_layer"].items()}
    assert sorted(ranks.values()) == [0, 1]  # one site per rank
    for name, site in results[1]["report"]["per_layer"].items():
        assert abs(site["error_after"] - single.per_layer[name].error_after) < 1e-5
        assert site["error_after"] < site["error_before"]
