"""rc.finetune (stage 2): flow matching on converted diffusers models, a custom loss hook for other
objectives, a clear error without one, and data parallelism over torchrun ranks (2 gloo processes)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.finetune import FLOW_MATCHING_MODELS, parameter_groups
from rehyat_compile.flow_matching import flow_matching_loss, validation_batches
from tests.distill_data import ToyHybrid
from tests.models import make_wan_t2v

STEPS = 4
WORKER = Path(__file__).with_name("finetune_torchrun_worker.py")


def output_energy(model, batch):
    """A custom objective: drive the output towards zero."""
    args, kwargs = batch
    return model(*args, **kwargs).pow(2).mean()


def toy_finetune_setup(seed=0):
    torch.manual_seed(seed)
    hybrid = ToyHybrid()
    g = torch.Generator().manual_seed(seed + 1)
    return hybrid, [((torch.randn(1, hybrid.tokens, hybrid.dim, generator=g),), {}) for _ in range(2)]


def wan_hybrid_and_clean_batches():
    model, args, kwargs = make_wan_t2v(frames=4)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=1, overlap_frames=0)
    data = [((torch.randn(args[0].shape, generator=torch.Generator().manual_seed(i)),), kwargs) for i in range(2)]
    return model, hybrid, data


def wan_velocity_fn(model, kwargs):
    return lambda x, s: model(x, **{**kwargs, "timestep": s * 1000})[0]


@pytest.mark.slow
def test_flow_matching_finetune_trains_phi_and_original_weights_and_lowers_the_loss():
    model, hybrid, data = wan_hybrid_and_clean_batches()
    kwargs = data[0][1]
    val = validation_batches(torch.cat([d[0][0] for d in data]), 3, 1)

    def val_loss():
        with torch.no_grad():
            return sum(float(flow_matching_loss(wan_velocity_fn(hybrid, kwargs), *b)) for b in val) / len(val)
    phi = next(iter(hybrid.feature_maps.values())).phi_q.w1.detach().clone()
    weight = model.blocks[0].ffn.net[0].proj.weight.detach().clone()
    before = val_loss()
    report = rc.finetune(hybrid, data, steps=30, lr=3e-3, progress=False)
    assert report.objective == "flow_matching" and report.steps == 30 and len(report.loss_curve) == 30
    assert not torch.equal(phi, next(iter(hybrid.feature_maps.values())).phi_q.w1)   # phi trained
    assert not torch.equal(weight, model.blocks[0].ffn.net[0].proj.weight)            # so are the model's weights
    assert val_loss() < before


def test_phi_gets_its_own_learning_rate_and_can_train_alone():
    _, hybrid, _ = wan_hybrid_and_clean_batches()
    groups = parameter_groups(hybrid, 1e-4, 1e-3)
    phi_ids = {id(p) for p in hybrid.feature_maps.parameters()}
    assert groups[0]["lr"] == 1e-3 and {id(p) for p in groups[0]["params"]} == phi_ids
    assert groups[1]["lr"] == 1e-4 and not phi_ids & {id(p) for p in groups[1]["params"]}
    alone = parameter_groups(hybrid, 1e-4, 1e-3, train_original=False)
    assert len(alone) == 1 and {id(p) for p in alone[0]["params"]} == phi_ids


def test_a_model_not_trained_with_flow_matching_needs_a_custom_loss():
    hybrid, data = toy_finetune_setup()
    assert "ToyHybrid" not in FLOW_MATCHING_MODELS
    with pytest.raises(ValueError, match="not known to be trained with flow matching.*loss="):
        rc.finetune(hybrid, data, steps=1, progress=False)


def test_custom_loss_hook_sees_every_batch_and_is_minimised():
    hybrid, data = toy_finetune_setup()
    seen = []

    def loss(model, batch):
        seen.append(batch)
        return output_energy(model, batch)
    report = rc.finetune(hybrid, data, steps=20, lr=1e-2, loss=loss, progress=False)
    assert report.objective == "custom" and len(seen) == 20
    assert seen[0] is data[0] and seen[1] is data[1] and seen[2] is data[0]   # data is cycled
    assert sum(report.loss_curve[-3:]) < sum(report.loss_curve[:3])


def test_bad_arguments_are_refused():
    hybrid, data = toy_finetune_setup()
    with pytest.raises(ValueError, match="steps"):
        rc.finetune(hybrid, data, steps=0, loss=output_energy)
    with pytest.raises(TypeError, match="loss"):
        rc.finetune(hybrid, data, steps=1, loss="mse")
    with pytest.raises(TypeError, match="scalar"):
        rc.finetune(hybrid, data, steps=1, loss=lambda m, b: m(*b[0]), progress=False)
    _, wan, _ = wan_hybrid_and_clean_batches()
    with pytest.raises(TypeError, match="clean latents"):
        rc.finetune(wan, [torch.zeros(1)], steps=1, progress=False)


def test_torchrun_two_gloo_processes_average_gradients_like_one_process_on_both_batches(tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    hybrid, data = toy_finetune_setup()
    # one process, one step on the mean of the two ranks' batches = the ranks' averaged gradients
    both = [(data[0], data[1])]
    rc.finetune(hybrid, both, steps=STEPS, lr=1e-2, progress=False,
                loss=lambda m, pair: (output_energy(m, pair[0]) + output_energy(m, pair[1])) / 2)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for res in results:
        assert res["backend"] == "gloo" and res["report"]["world_size"] == 2
        for name, tensor in hybrid.state_dict().items():
            torch.testing.assert_close(res["state"][name], tensor, rtol=1e-4, atol=1e-6)
