"""Fidelity of the converted trained teacher (``zoo.make_wan_bouncing``): teacher vs converted model for
Tc in {1, 2, 3}, To in {0, 1}, undistilled / after stage 1 (``rc.distill``) / after stage 1 + 2
(``rc.finetune``).

    python benchmarks/fidelity.py --device cuda --out OUT_DIR            # the README's table (one H200)
    python benchmarks/fidelity.py --quick --out OUT_DIR                  # a few steps, CPU smoke run

Measured per model:
- ``val_loss``: flow-matching loss on held-out bouncing-shapes videos with fixed noise and stratified
  flow times (``flow_matching.validation_batches``; the training script's validation seed);
- ``sample_rmse`` / ``sample_rmse_per_frame``: RMS difference (pixels in [-1, 1]) of 20-step Euler
  samples from the teacher's samples drawn from the same noise, over all frames and per frame index;
- ``site_error``: relative L1 attention error of every converted site on the teacher's own q, k, v
  (what stage 1 minimises; undistilled and after stage 1).
Goals at Tc=1, To=0: site error >= 3x lower after stage 1; stage 1 closes >= 50% of the val-loss gap
between the undistilled hybrid and the teacher; stage 1 + 2 within 5% of the teacher's val loss.

``--sweep`` (after the configurations): stage-1 options at Tc=1, To=0 (learning rate and steps, attention-weight distillation,
exponential feature maps, no calibration), each from the same fresh conversion.
Results go to ``OUT_DIR/fidelity.json`` after every model (a run cut short keeps what it finished),
the table to ``OUT_DIR/fidelity.md``; ``--save-phi TC,TO`` writes that conversion's stage-1 feature
maps to ``OUT_DIR/phi_tc{TC}_to{TO}.safetensors`` (``rc.save_hybrid``).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rehyat_compile as rc  # noqa: E402
from rehyat_compile import zoo  # noqa: E402
from rehyat_compile.bouncing_shapes import bouncing_shapes  # noqa: E402
from rehyat_compile.distill import reinit_feature_maps, site_errors  # noqa: E402
from rehyat_compile.flow_matching import (euler_sample, noisy, null_text, stratified_times,  # noqa: E402
                                          validation_batches, validation_loss, wan_inputs, wan_velocity)

VAL_SEED = 10_000_019          # scripts/train_bouncing_teacher.py's validation seed
SAMPLE_SEED, DISTILL_SEED, FINETUNE_SEED = 7, 11, 13
CONFIGS = [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
TEXT_DIM = zoo.BOUNCING_WAN_CONFIG["text_dim"]


class Setup:
    """The teacher, the data and the teacher's reference numbers, shared by every conversion."""

    def __init__(self, device, batch: int, val_videos: int, sample_videos: int, sample_steps: int,
                 distill_batches: int):
        self.device, self.batch, self.sample_steps = torch.device(device), batch, sample_steps
        self.teacher = zoo.make_wan_bouncing()[0].to(self.device).eval()
        self.val = [tuple(t.to(self.device) for t in b) for b in
                    validation_batches(bouncing_shapes(val_videos, VAL_SEED), VAL_SEED + 1, batch)]
        gen = torch.Generator().manual_seed(SAMPLE_SEED)
        self.noise = torch.randn(sample_videos, 3, 8, 16, 16, generator=gen).to(self.device)
        self.example = self.batch_inputs(bouncing_shapes(batch, 1).to(self.device), torch.full((batch,), 0.5))
        self.distill_batches = self.noisy_batches(distill_batches, DISTILL_SEED)
        self.teacher_samples = self.samples(self.teacher)
        untrained = zoo.make_wan_bouncing_untrained().to(self.device)
        self.untrained_val_loss = validation_loss(wan_velocity(untrained, TEXT_DIM), self.val)

    def batch_inputs(self, x, s):
        s = s.to(self.device)
        return wan_inputs(x, s, null_text(x.shape[0], TEXT_DIM, device=self.device))

    def noisy_batches(self, n: int, seed: int):
        """``n`` (args, kwargs) batches of noised videos at stratified flow times: the teacher's
        inputs during sampling, for stage 1."""
        out = []
        for i in range(n):
            x0 = bouncing_shapes(self.batch, seed * 1000 + i).to(self.device)
            s = stratified_times(self.batch, seed * 1000 + i).to(self.device)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + i)).to(self.device)
            out.append(self.batch_inputs(noisy(x0, noise, s), s))
        return out

    def samples(self, model) -> torch.Tensor:
        fn = wan_velocity(model, TEXT_DIM)
        return torch.cat([euler_sample(fn, self.noise[i:i + self.batch], self.sample_steps)
                          for i in range(0, self.noise.shape[0], self.batch)])


class CleanBatches:
    """Stage-2 data: ``count`` batches of fresh clean videos (args[0]), re-iterable, deterministic."""

    def __init__(self, setup: Setup, count: int, seed: int = FINETUNE_SEED):
        self.setup, self.count, self.seed = setup, count, seed

    def __iter__(self):
        for i in range(self.count):
            x0 = bouncing_shapes(self.setup.batch, self.seed * 100_000 + i).to(self.setup.device)
            yield self.setup.batch_inputs(x0, torch.full((self.setup.batch,), 0.5))


def measure(setup: Setup, model, *, sites: bool) -> dict:
    """Validation loss, sample error against the teacher (mean, per frame) and per-site error."""
    start = time.perf_counter()
    val = validation_loss(wan_velocity(model, TEXT_DIM), setup.val)
    diff = (setup.samples(model) - setup.teacher_samples).float()
    per_frame = diff.pow(2).mean(dim=(0, 1, 3, 4)).sqrt().tolist()                     # [frames]
    row = dict(val_loss=val, sample_rmse=float(diff.pow(2).mean().sqrt()), sample_rmse_per_frame=per_frame)
    if sites:
        errors = site_errors(model, setup.distill_batches[:2])
        row.update(site_error=errors, site_error_mean=sum(errors.values()) / len(errors))
    row["measure_seconds"] = time.perf_counter() - start
    return row


def convert(setup: Setup, chunk_frames: int, overlap_frames: int):
    """A converted copy of the teacher (its own weights, so stage 2 leaves the teacher alone)."""
    args, kwargs = setup.example
    return rc.transform(copy.deepcopy(setup.teacher), args, kwargs, chunk_frames=chunk_frames,
                        overlap_frames=overlap_frames)


def stage1(setup: Setup, hybrid, *, steps: int, lr: float, loss: str = "l1", calibrate: bool = True) -> dict:
    rep = rc.distill(setup.teacher, hybrid, setup.distill_batches, steps=steps, lr=lr, loss=loss,
                     calibrate=calibrate, progress=False, measure_model=False)
    return dict(steps=steps, lr=lr, loss=loss, calibrate=calibrate, seconds=rep.seconds)


def run_config(setup: Setup, tc: int, to: int, opts, save_phi: Path | None, row: dict, write) -> dict:
    """Fill ``row`` stage by stage (``write()`` after each, so a run cut short keeps what it measured)."""
    hybrid = convert(setup, tc, to)
    row["undistilled"] = measure(setup, hybrid, sites=True)
    write()
    row["stage1_options"] = stage1(setup, hybrid, steps=opts.distill_steps, lr=opts.distill_lr, loss=opts.distill_loss)
    row["stage1"] = measure(setup, hybrid, sites=True)
    if save_phi is not None:
        rc.save_hybrid(hybrid, save_phi)
    write()
    ft_steps = opts.finetune_steps if (tc, to) == (1, 0) else opts.finetune_steps_other
    rep = rc.finetune(hybrid, CleanBatches(setup, ft_steps), steps=ft_steps, lr=opts.finetune_lr, progress=False)
    row["stage2_options"] = dict(steps=ft_steps, lr=rep.lr, phi_lr=rep.phi_lr, seconds=rep.seconds,
                                 loss_first10=sum(rep.loss_curve[:10]) / 10, loss_last10=sum(rep.loss_curve[-10:]) / 10)
    row["stage1+2"] = measure(setup, hybrid, sites=False)
    write()
    return row


SWEEP = [  # (name, reinit options, distill options)
    ("default", {}, {}),
    ("lr 1e-2", {}, {"lr": 1e-2}),
    ("steps x4", {}, {"steps_factor": 4}),
    ("attention-weight KL", {}, {"loss": "attention_weights"}),
    ("l1 + 0.1 weight KL", {}, {"loss": "l1+attention_weights"}),
    ("exp feature maps", {"positive": "exp"}, {}),
    ("no calibration", {}, {"calibrate": False}),
]


def run_sweep(setup: Setup, opts, budget_end: float) -> list[dict]:
    rows = []
    for name, reinit, options in SWEEP:
        if time.perf_counter() > budget_end:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        hybrid = convert(setup, 1, 0)
        torch.manual_seed(0)
        if reinit:
            reinit_feature_maps(hybrid, **reinit)
        steps = opts.distill_steps * options.get("steps_factor", 1)
        info = stage1(setup, hybrid, steps=steps, lr=options.get("lr", opts.distill_lr),
                      loss=options.get("loss", opts.distill_loss), calibrate=options.get("calibrate", True))
        rows.append({"variant": name, **info, **measure(setup, hybrid, sites=True)})
        print(f"sweep {name}: {rows[-1]['site_error_mean']:.4f} site error, val {rows[-1]['val_loss']:.4f}", flush=True)
    return rows


def goals(result: dict) -> dict:
    """The issue's three goals at Tc=1, To=0, measured."""
    row = next((r for r in result["configs"] if (r["chunk_frames"], r["overlap_frames"]) == (1, 0)), None)
    if row is None or "stage1+2" not in row:
        return {}
    teacher = result["teacher_val_loss"]
    und, s1, s12 = (row[k]["val_loss"] for k in ("undistilled", "stage1", "stage1+2"))
    ratio = row["undistilled"]["site_error_mean"] / row["stage1"]["site_error_mean"]
    closed = (und - s1) / (und - teacher)
    return {"site_error_reduction": ratio, "site_error_goal_met": ratio >= 3,
            "val_gap_closed_by_stage1": closed, "val_gap_goal_met": closed >= 0.5,
            "stage12_over_teacher": s12 / teacher - 1, "stage12_goal_met": s12 <= 1.05 * teacher}


def table(result: dict) -> str:
    lines = [f"teacher val loss {result['teacher_val_loss']:.4f} (untrained {result['untrained_val_loss']:.4f})", "",
             "| Tc | To | stage | val loss | vs teacher | sample RMSE | RMSE per frame 0..7 | site error |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["configs"]:
        for stage in ("undistilled", "stage1", "stage1+2"):
            if stage not in row:
                continue
            m = row[stage]
            frames = " ".join(f"{e:.3f}" for e in m["sample_rmse_per_frame"])
            site = f"{m['site_error_mean']:.4f}" if "site_error_mean" in m else ""
            lines.append(f"| {row['chunk_frames']} | {row['overlap_frames']} | {stage} | {m['val_loss']:.4f} | "
                         f"{m['val_loss'] / result['teacher_val_loss']:.2f}x | {m['sample_rmse']:.4f} | {frames} | {site} |")
    if result.get("sweep"):
        lines += ["", "Stage-1 options at Tc=1, To=0:", "",
                  "| variant | steps | lr | loss | site error | val loss | sample RMSE |", "|---|---|---|---|---|---|---|"]
        for r in result["sweep"]:
            if "skipped" in r:
                lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | | | | |")
            else:
                lines.append(f"| {r['variant']} | {r['steps']} | {r['lr']:g} | {r['loss']} | {r['site_error_mean']:.4f} | "
                             f"{r['val_loss']:.4f} | {r['sample_rmse']:.4f} |")
    skipped = [f"Tc={r['chunk_frames']},To={r['overlap_frames']}" for r in result["configs"] if "skipped" in r]
    if skipped:
        lines += ["", f"Not run (time budget): {', '.join(skipped)}"]
    if result.get("goals"):
        g = result["goals"]
        lines += ["", f"Goals at Tc=1, To=0: site error {g['site_error_reduction']:.2f}x lower (goal 3x); stage 1 "
                      f"closes {100 * g['val_gap_closed_by_stage1']:.0f}% of the val-loss gap (goal 50%); stage 1+2 "
                      f"{100 * g['stage12_over_teacher']:+.1f}% vs the teacher (goal within 5%)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run on CPU")
    p.add_argument("--configs", nargs="*", default=None, help="TC,TO pairs (default: all six)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--val-videos", type=int, default=256)
    p.add_argument("--sample-videos", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--distill-batches", type=int, default=8)
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--distill-lr", type=float, default=3e-3)
    p.add_argument("--distill-loss", default="l1")
    p.add_argument("--finetune-steps", type=int, default=600, help="stage 2 at Tc=1, To=0")
    p.add_argument("--finetune-steps-other", type=int, default=200, help="stage 2 at the other configs")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--save-phi", nargs="*", default=[], help="TC,TO pairs whose stage-1 maps to save")
    p.add_argument("--budget-s", type=float, default=0, help="skip what would start after this many seconds")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.batch, opts.val_videos, opts.sample_videos, opts.sample_steps = 4, 8, 4, 4
        opts.distill_batches, opts.distill_steps, opts.finetune_steps, opts.finetune_steps_other = 2, 3, 2, 2
    configs = CONFIGS if opts.configs is None else [tuple(int(v) for v in c.split(",")) for c in opts.configs]
    save = {tuple(int(v) for v in c.split(",")) for c in opts.save_phi}
    opts.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    budget_end = start + opts.budget_s if opts.budget_s else float("inf")
    setup = Setup(opts.device, opts.batch, opts.val_videos, opts.sample_videos, opts.sample_steps, opts.distill_batches)
    result = {"device": str(setup.device), "torch": torch.__version__, "options": vars(opts) | {"out": str(opts.out)},
              "teacher_val_loss": validation_loss(wan_velocity(setup.teacher, TEXT_DIM), setup.val),
              "untrained_val_loss": setup.untrained_val_loss, "configs": [], "sweep": []}
    print(f"teacher val loss {result['teacher_val_loss']:.4f}; untrained {result['untrained_val_loss']:.4f}", flush=True)

    def write():
        result["goals"] = goals(result)
        result["seconds"] = time.perf_counter() - start
        (opts.out / "fidelity.json").write_text(json.dumps(result, indent=1))
        (opts.out / "fidelity.md").write_text(table(result) + "\n")

    for tc, to in configs:
        row = {"chunk_frames": tc, "overlap_frames": to}
        result["configs"].append(row)
        if time.perf_counter() > budget_end:
            row["skipped"] = "time budget"
            continue
        phi_path = opts.out / f"phi_tc{tc}_to{to}.safetensors" if (tc, to) in save else None
        run_config(setup, tc, to, opts, phi_path, row, write)
        print(f"Tc={tc} To={to}: val {row['undistilled']['val_loss']:.4f} -> {row['stage1']['val_loss']:.4f} -> "
              f"{row['stage1+2']['val_loss']:.4f}; site error {row['undistilled']['site_error_mean']:.4f} -> "
              f"{row['stage1']['site_error_mean']:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    if opts.sweep:
        result["sweep"] = run_sweep(setup, opts, budget_end)
    write()
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
