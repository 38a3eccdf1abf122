"""Train the embedded teacher: a tiny diffusers WanTransformer3DModel (``zoo.BOUNCING_WAN_CONFIG``) with
rectified flow matching on the procedural bouncing-shapes videos (``rehyat_compile/bouncing_shapes.py``).

    python scripts/train_bouncing_teacher.py --out OUT_DIR [--steps 20000] [--max-minutes 6] [--init W.safetensors]

Run on the GPU machine (one H200: bf16 autocast, about 25 ms a step at batch 128). Every training
batch is drawn fresh from the generator (seed = data seed + step), so there is no finite training
set to overfit; validation uses 512 videos of a held-out seed with fixed noise and stratified flow
times, the same loss ``benchmarks/fidelity.py`` reports. AdamW, linear warm-up then cosine decay,
EMA of the weights (the EMA is what is saved). ``--max-minutes`` caps the wall time: the step count
is fixed after timing the first steps, so the schedule completes; the count used is written to
``train_log.json``, and ``--steps N --max-minutes 0`` (no cap) repeats that run.

Writes ``OUT_DIR/wan_bouncing_shapes.safetensors`` (EMA weights, fp32) and ``OUT_DIR/train_log.json``
(config, steps, validation loss at the start (untrained, or the --init weights) and trained, loss curve).

The rehyat_compile modules it needs (dataset, flow matching, the config) import only torch and are
loaded by file path, so this runs where only torch and diffusers are installed.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent.parent / "rehyat_compile"
VAL_SEED, VAL_VIDEOS = 10_000_019, 512


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"rehyat_{name}", PACKAGE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


shapes, fm, zoo = load_module("bouncing_shapes"), load_module("flow_matching"), load_module("zoo")


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, val, device) -> float:
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = fm.validation_loss(fm.wan_velocity(model, zoo.BOUNCING_WAN_CONFIG["text_dim"]), val, device)
    model.train()
    return loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, default=6.0, help="cap on training wall time (0: none)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0, help="data seed (the weights start from zoo's seed 0)")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--init", type=Path, help="start from these weights (a previous run's safetensors)")
    opts = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    opts.out.mkdir(parents=True, exist_ok=True)

    model = zoo.make_wan_bouncing_untrained()
    if opts.init is not None:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(opts.init))
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    val = fm.validation_batches(shapes.bouncing_shapes(VAL_VIDEOS, VAL_SEED), VAL_SEED + 1, batch=128)
    untrained = evaluate(model, val, device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; starting val loss {untrained:.4f}",
          flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.01)
    velocity = fm.wan_velocity(model, zoo.BOUNCING_WAN_CONFIG["text_dim"])
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    total, log, start, step = opts.steps, [], time.perf_counter(), 0
    while step < total:
        x0 = shapes.bouncing_shapes(opts.batch, opts.seed * 1_000_003 + step, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s = torch.rand(opts.batch, generator=gen, device=device)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, total, opts.lr, opts.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = fm.flow_matching_loss(velocity, x0, noise, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(opts.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        if step == 50 and opts.max_minutes > 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - start) / 50
            total = min(total, int(opts.max_minutes * 60 / (per_step * 1.08)))
            print(f"{per_step * 1e3:.1f} ms a step: training {total} steps", flush=True)
        if step % 100 == 0:
            log.append({"step": step, "loss": float(loss.detach())})
        if step % opts.eval_every == 0 or step == total:
            v = evaluate(ema, val, device)
            log.append({"step": step, "loss": float(loss.detach()), "ema_val_loss": v})
            print(f"step {step:6d}  train {float(loss):.4f}  ema val {v:.4f}  {time.perf_counter() - start:.0f} s",
                  flush=True)
    trained = evaluate(ema, val, device)
    from safetensors.torch import save_file
    save_file({k: v.detach().float().cpu().contiguous() for k, v in ema.state_dict().items()},
              opts.out / "wan_bouncing_shapes.safetensors")
    (opts.out / "train_log.json").write_text(json.dumps(dict(
        config=zoo.BOUNCING_WAN_CONFIG, steps=step, batch=opts.batch, lr=opts.lr, warmup=opts.warmup, ema=opts.ema,
        seed=opts.seed, init=None if opts.init is None else opts.init.name, seconds=time.perf_counter() - start, device=str(torch.cuda.get_device_name(0)
                                                                       if device.type == "cuda" else "cpu"),
        torch=torch.__version__, start_val_loss=untrained, trained_val_loss=trained, curve=log), indent=1))
    print(f"done: {step} steps; val loss at start {untrained:.4f} -> trained (EMA) {trained:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
