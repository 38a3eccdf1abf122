"""rc.distill sharded over 2 gloo processes on CPU equals the single-process run."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rehyat_compile as rc
from tests.distill_data import toy_setup

STEPS = 10


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher, hybrid, batches = toy_setup(batches=2)
        report = rc.distill(teacher, hybrid, batches, steps=STEPS, lr=1e-2, progress=False)
        torch.save({"state": hybrid.phi.state_dict(), "report": report.to_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_shard_sites_and_match_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    teacher, hybrid, batches = toy_setup(batches=2)
    single = rc.distill(teacher, hybrid, batches, steps=STEPS, lr=1e-2, progress=False)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for res in results:  # every rank ends with every site's trained weights
        for name, tensor in hybrid.phi.state_dict().items():
            torch.testing.assert_close(res["state"][name], tensor, rtol=1e-5, atol=1e-6)
        assert res["report"]["world_size"] == 2
    ranks = {name: site["rank"] for name, site in results[0]["report"]["per_layer"].items()}
    assert sorted(ranks.values()) == [0, 1]  # one site per rank
    for name, site in results[1]["report"]["per_layer"].items():
        assert site["error_after"] == single.per_layer[name].error_after or abs(
            site["error_after"] - single.per_layer[name].error_after) < 1e-5
        assert site["error_after"] < site["error_before"]
