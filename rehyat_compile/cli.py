"""The ``rehyat-compile`` command: inspect | transform | cost | build | distill | demo.

A model is named as ``--preset NAME`` (built-in tiny or meta-device models), ``module:factory``
(a Python callable returning ``(model, args, kwargs)``), or ``diffusers:ClassName --config
config.json`` (built from its config with random weights, example inputs made for its class).
Every verb accepts ``--json`` and then prints one JSON document on stdout.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import ConversionError

CONSOLE = Console(stderr=False, highlight=False)


class UsageError(ValueError):
    """A command-line argument the tool cannot act on; the message says what to do next."""


# ---------------------------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------------------------

def load_model(spec: str | None, preset: str | None, config: str | None, frames: int | None):
    """Resolve the model arguments to ``(model, args, kwargs, name)``."""
    from . import zoo

    if (spec is None) == (preset is None):
        raise UsageError("name a model: either --preset NAME (see `rehyat-compile demo --help` for the list: "
                         f"{', '.join(zoo.PRESETS)}) or MODEL as module:factory or diffusers:ClassName")
    if preset is not None:
        if preset not in zoo.PRESETS:
            raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(zoo.PRESETS)}")
        model, args, kwargs = zoo.PRESETS[preset](**({} if frames is None else {"frames": frames}))
        return model, args, kwargs, preset
    if ":" not in spec:
        raise UsageError(f"MODEL must be module:factory or diffusers:ClassName, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    if module_name == "diffusers":
        if config is None:
            raise UsageError(f"diffusers:{attr} needs --config config.json (the model's config; no hub downloads)")
        try:
            model, args, kwargs = zoo.from_diffusers_config(attr, read_config(config), frames=frames)
        except UsageError:
            raise
        except Exception as err:  # diffusers and torch fail deep inside on bad values; name the file
            raise UsageError(f"--config {config}: diffusers:{attr} cannot be built from it: "
                             f"{type(err).__name__}: {err}") from err
        return model, args, kwargs, spec
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot load {spec!r}: {err}. Check the module is importable (PYTHONPATH) and "
                         f"defines {attr}") from err
    made = factory(**({} if frames is None else {"frames": frames}))
    if not (isinstance(made, tuple) and len(made) == 3):
        raise UsageError(f"{spec} must return (model, args, kwargs); got {type(made).__name__}")
    return (*made, spec)


def read_config(path: str) -> dict:
    """The JSON object in ``path``; UsageError naming ``--config`` and the file when it is missing,
    not JSON, or not an object (diffusers would take a list for a hub repo to download)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file (give the model's config.json)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config {path} must hold a JSON object of the model's arguments "
                         f'({{"num_layers": 2, ...}}), got a JSON {type(config).__name__}')
    return config


# ---------------------------------------------------------------------------------------------
# Verbs
# ---------------------------------------------------------------------------------------------

def _conversion_options(opts) -> dict:
    layers = None if opts.layers is None else [s for s in opts.layers.split(",") if s]
    return dict(chunk_frames=opts.chunk_frames, overlap_frames=opts.overlap_frames, causal=not opts.non_causal,
                layers=layers, feature_dim=opts.feature_dim, video_shape=opts.video_shape)


def cmd_inspect(opts):
    import rehyat_compile as rc
    model, args, kwargs, name = load_model(opts.model, opts.preset, opts.config, opts.frames)
    report = rc.inspect(model, args, kwargs, video_shape=opts.video_shape)
    return report.to_dict(), lambda: CONSOLE.print(str(report))


def cmd_transform(opts):
    import rehyat_compile as rc
    model, args, kwargs, name = load_model(opts.model, opts.preset, opts.config, opts.frames)
    hybrid = rc.transform(model, args, kwargs, **_conversion_options(opts))
    result = {"model": name, "converted": [s.name for s in hybrid.sites],
              "trainable_parameters": sum(p.numel() for p in hybrid.feature_maps.parameters())}
    if opts.out:
        rc.save_hybrid(hybrid, opts.out)
        result["saved"] = str(opts.out)

    def show():
        table = Table(title=f"converted {len(hybrid.sites)} sites of {name}")
        for col in ("site", "module", "kind", "Tc", "To", "causal"):
            table.add_column(col)
        for s in hybrid.sites:
            table.add_row(s.name, s.module, s.kind, str(opts.chunk_frames), str(opts.overlap_frames),
                          str(not opts.non_causal))
        CONSOLE.print(table)
        if opts.out:
            CONSOLE.print(f"phi weights and conversion config written to {opts.out}")
    return result, show


def cmd_cost(opts):
    import rehyat_compile as rc
    from .costplot import cost_rows, plot_cost_vs_duration
    model, args, kwargs, name = load_model(opts.model, opts.preset, opts.config, opts.frames)
    original = rc.cost(model, args, kwargs)
    hybrid = rc.transform(model, args, kwargs, **_conversion_options(opts))
    converted = rc.cost(hybrid, args, kwargs)
    rows = cost_rows(original, converted, opts.durations)
    result = {"model": name, "T": str(original.T), "original_flops": str(original.flops),
              "converted_flops": str(converted.flops), "original_degree": original.degree("flops"),
              "converted_peak_memory_degree": converted.degree("peak_memory"),
              "converted_degree": converted.degree("flops"), "rows": rows}
    try:
        rc.check_linear(converted)
        result["linear"] = True
    except rc.ComplexityError as err:
        result["linear"], result["complexity_error"] = False, str(err)
    if opts.plot:
        plot_cost_vs_duration(rows, opts.plot, title=name)
        result["plot"] = str(opts.plot)

    def show():
        table = Table(title=f"cost of {name} vs latent frames T (degree in T: original "
                            f"{result['original_degree']}, converted {result['converted_degree']})")
        for col in ("T", "original GFLOP", "converted GFLOP", "ratio"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(r["T"]), f"{r['original_flops'] / 1e9:.3f}", f"{r['converted_flops'] / 1e9:.3f}",
                          f"{r['original_flops'] / r['converted_flops']:.2f}")
        CONSOLE.print(table)
        CONSOLE.print("converted model is linear in T" if result["linear"] else result["complexity_error"])
        if opts.plot:
            CONSOLE.print(f"plot written to {opts.plot}")
    return result, show


def cmd_build(opts):
    import rehyat_compile as rc
    model, args, kwargs, name = load_model(opts.model, opts.preset, opts.config, opts.frames)
    hybrid = rc.transform(model, args, kwargs, **_conversion_options(opts))
    target_options = {k: v for k, v in (("soc", opts.soc), ("precision", opts.precision)) if v is not None}
    art = rc.build(hybrid, args, kwargs, target=opts.target, backend=opts.backend, out_dir=opts.out_dir,
                   streaming=opts.streaming, target_options=target_options or None)
    manifest = json.loads((Path(opts.out_dir) / "manifest.json").read_text())
    result = {"model": name, "out_dir": str(opts.out_dir), "manifest": manifest}

    def show():
        CONSOLE.print(f"built {name} for {opts.target} ({art.backend}{', streaming' if opts.streaming else ''}) "
                      f"into {opts.out_dir}: {', '.join(sorted(manifest.get('files', {})))}")
        if getattr(art, "verification", None):
            CONSOLE.print(f"verified: {art.verification}")
    return result, show


def cmd_distill(opts):
    import torch
    import rehyat_compile as rc
    model, args, kwargs, name = load_model(opts.model, opts.preset, opts.config, opts.frames)
    hybrid = rc.transform(model, args, kwargs, **_conversion_options(opts))
    batches = _noise_level_batches(args, kwargs, opts.batches)
    with torch.no_grad():
        before = _relative_error(model, hybrid, args, kwargs)
    rep = rc.distill(model, hybrid, batches, steps=opts.steps, lr=opts.lr, loss=opts.loss, progress=not opts.json)
    with torch.no_grad():
        after = _relative_error(model, hybrid, args, kwargs)
    if opts.out:
        rc.save_hybrid(hybrid, opts.out)
    result = {"model": name, "per_layer": rep.to_dict()["per_layer"] if hasattr(rep, "to_dict") else
              {k: dict(v) for k, v in rep.per_layer.items()},
              "model_error_before": before, "model_error_after": after,
              "saved": None if not opts.out else str(opts.out)}

    def show():
        CONSOLE.print(str(rep))
        CONSOLE.print(f"whole-model relative error vs teacher: {before:.4f} -> {after:.4f}")
    return result, show


def _noise_level_batches(args, kwargs, count: int):
    """Teacher inputs at several noise levels: the example latents re-noised, other inputs kept."""
    import torch
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(count):
        level = (i + 1) / (count + 1)
        new_args = tuple((1 - level) * a + level * torch.randn(a.shape, generator=gen, dtype=a.dtype)
                         if torch.is_tensor(a) and a.is_floating_point() and a.dim() == 5 else a for a in args)
        batches.append((new_args, dict(kwargs)))
    return batches


def _first_tensor(out):
    import torch
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _relative_error(model, hybrid, args, kwargs) -> float:
    ref, out = _first_tensor(model(*args, **kwargs)), _first_tensor(hybrid(*args, **kwargs))
    return float((out - ref).norm() / ref.norm())


def cmd_demo(opts):
    from .demo import run_demo
    summary = run_demo(Path(opts.out), console=None if opts.json else CONSOLE, hexagon=opts.hexagon)
    return summary, lambda: None


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------

def _video_shape(text: str):
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--video-shape must be FRAMES,H,W (token grid after patching), got {text!r}")
    return tuple(int(p) for p in parts)


def _int_at_least(minimum: int):
    """argparse type: an int >= minimum (argparse names the option and exits with code 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


def _add_model_args(p):
    p.add_argument("model", nargs="?", help="module:factory or diffusers:ClassName")
    p.add_argument("--preset", help="a built-in model, e.g. wan2.1-tiny or wan2.1-1.3b-meta")
    p.add_argument("--config", help="config.json for diffusers:ClassName")
    p.add_argument("--frames", type=_int_at_least(1), help="latent frames of the example input")
    p.add_argument("--video-shape", type=_video_shape, help="FRAMES,H,W token grid when the frame axis "
                                                             "cannot be made symbolic")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")


def _add_conversion_args(p):
    p.add_argument("--chunk-frames", type=_int_at_least(1), default=3, help="Tc, latent frames per chunk (default 3)")
    p.add_argument("--overlap-frames", type=_int_at_least(0), default=1,
                   help="To, frames of softmax overlap (default 1)")
    p.add_argument("--non-causal", action="store_true", help="linear attention also over later frames "
                                                             "(cannot stream)")
    p.add_argument("--layers", help="comma-separated site names or module paths to convert (default: all)")
    p.add_argument("--feature-dim", type=_int_at_least(2), help="features per head of phi_q/phi_k")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rehyat-compile", description=(
        "Convert video diffusion transformers to ReHyAt recurrent hybrid attention, prove the "
        "result (equivalence, linear cost) and compile it for mobile and GPU targets."))
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("inspect", help="find softmax attention sites and what the tool would do with each")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("transform", help="convert the model; optionally save phi weights + config")
    _add_model_args(p)
    _add_conversion_args(p)
    p.add_argument("--out", help="write phi weights (safetensors) and the conversion config here")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("cost", help="symbolic FLOPs/bytes/memory in the number of latent frames; linearity check")
    _add_model_args(p)
    _add_conversion_args(p)
    p.add_argument("--durations", type=_int_at_least(1), nargs="+", default=[5, 9, 21, 31, 41],
                   help="latent frames to tabulate")
    p.add_argument("--plot", help="write a PNG plot of cost vs video duration here")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("build", help="ahead-of-time build for a target, verified where an emulator exists")
    _add_model_args(p)
    _add_conversion_args(p)
    p.add_argument("--target", required=True,
                   help="cpu, cuda, adreno, adreno-vulkan, hexagon, aarch64, onnx or qnn-htp")
    p.add_argument("--backend", default=None, help="tvm or mlir (default: the target's own; adreno-vulkan uses "
                   "IREE, onnx and qnn-htp their own)")
    p.add_argument("--soc", nargs="+", default=None, help="qnn-htp: SoCs (sm8550 sm8650 sm8750; default all)")
    p.add_argument("--precision", default=None, help="qnn-htp: fp16 (default) or w8a16")
    p.add_argument("--out-dir", required=True, help="folder for the library, kernels and manifest.json")
    p.add_argument("--streaming", action="store_true", help="build the recurrent step graph (constant memory)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("distill", help="train phi_q/phi_k of each converted site to match the original model")
    _add_model_args(p)
    _add_conversion_args(p)
    p.add_argument("--steps", type=_int_at_least(1), default=200)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--loss", default="l1", choices=["l1", "l2"])
    p.add_argument("--batches", type=_int_at_least(1), default=4, help="noise levels of the example input to train on")
    p.add_argument("--out", help="write the distilled phi weights + config here")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded tiny Wan2.1 model (< 3 min)")
    p.add_argument("--out", default="rehyat-demo", help="output folder (default ./rehyat-demo)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-hexagon", dest="hexagon", action="store_false",
                   help="leave out the Hexagon site build (v75, disassembled) and its v66 run under qemu-hexagon")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    # torch.export's own deprecation notice, printed once per export; not the user's concern.
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)
    parser = build_parser()
    opts = parser.parse_args(argv)
    try:
        result, show = opts.func(opts)
    except (UsageError, ConversionError, ValueError, TypeError, FileNotFoundError) as err:
        if getattr(opts, "json", False):
            print(json.dumps({"error": str(err), "kind": type(err).__name__}))
        else:
            CONSOLE.print(f"[bold red]error:[/] {err}")
        return 2
    if opts.json:
        print(json.dumps(result, default=str))
    else:
        show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
