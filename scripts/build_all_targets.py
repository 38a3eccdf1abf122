"""Build the converted tiny Wan2.1 (5 latent frames, Tc=2, To=1) for every target and backend and
run each artifact's device-free check; prints one line per build with its time.

    python scripts/build_all_targets.py OUT_DIR [--targets cpu,cuda,...] [--streaming] [--hexagon-versions v75]

--streaming builds the recurrent step graph (rc.stream) instead of the whole graph.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import rehyat_compile as rc  # noqa: E402
from rehyat_compile.backends import verify  # noqa: E402
from rehyat_compile.backends.targets import TARGETS  # noqa: E402

from models import make_wan_t2v  # noqa: E402

BUILDS = [("cpu", "tvm"), ("cpu", "mlir"), ("cuda", "tvm"), ("adreno", "tvm"), ("adreno-vulkan", "iree"),
          ("aarch64", "tvm"), ("hexagon", "tvm"), ("onnx", "onnx"), ("qnn-htp", "qnn")]


def check(art, hybrid, args, kwargs, ref) -> str:
    """The device-free check of one artifact, as a short line."""
    if art.runnable:
        where = f"runs under {art.emulated}" if art.emulated else "runs here"
        if "step" in art.manifest["entries"]:
            graph, example = rc.stream(hybrid).step_module(*args, **kwargs)
            with torch.no_grad():
                want = graph(*example)
            started = time.perf_counter()
            got = art(*example)
            seconds = time.perf_counter() - started
            err = max((g.double() - w.double()).abs().max().item() for g, w in zip(got, want))
            return f"{where} ({seconds:.2f} s per step), max |error| vs the eager step graph {err:.2e}"
        started = time.perf_counter()
        got = art(*args, **kwargs)[0]
        seconds = time.perf_counter() - started
        return f"{where} ({seconds:.2f} s per call), max |error| vs PyTorch {(got - ref).abs().max().item():.2e}"
    (files,) = [entry["files"] for entry in art.manifest["entries"].values()]
    folder = art.out_dir
    if art.target.name == "cuda":
        for arch in art.target.options["archs"]:
            verify.ptxas(folder / files[f"ptx_{arch}"], arch)
        return "PTX passes ptxas " + ",".join(art.target.options["archs"]) + ("; fatbin .so" if "library" in files else "")
    if art.target.name == "adreno":
        verify.opencl_syntax(folder / files["opencl_source"])
        return f"OpenCL C compiles (clang -x cl); host {verify.elf_machine(folder / files['library'])}"
    if art.target.name == "aarch64":  # not runnable: qemu-aarch64, the cross g++ or the runtime is missing
        return f"{art.reason}; host library ELF {verify.elf_machine(folder / files['library'])}"
    if art.target.name == "hexagon":
        out = []
        for version in art.target.options["versions"]:
            text = verify.hexagon_disassembly(folder / files[f"object_{version}"], version)
            out.append(f"{version}: {text.count('vmem(')} HVX vmem")
        return "; ".join(out)
    return art.reason


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--targets", default=",".join(sorted(TARGETS)),
                        help="targets or target-backend pairs, comma separated")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--hexagon-versions", default="v68,v73,v75")
    opts = parser.parse_args()
    wanted = set(opts.targets.split(","))
    model, args, kwargs = make_wan_t2v(frames=5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    with torch.no_grad():
        ref = hybrid(*args, **kwargs)[0]
    for target, backend in BUILDS:
        if target not in wanted and f"{target}-{backend}" not in wanted:
            continue
        started = time.perf_counter()
        options = {"versions": tuple(opts.hexagon_versions.split(","))} if target == "hexagon" else None
        suffix = "-streaming" if opts.streaming else ""
        art = rc.build(hybrid, args, kwargs, target=target, backend=backend, streaming=opts.streaming,
                       out_dir=Path(opts.out_dir) / f"{target}-{backend}{suffix}", target_options=options)
        seconds = time.perf_counter() - started
        print(f"{target:14s} {backend:5s} {'step' if opts.streaming else 'full'} build {seconds:6.1f} s  {check(art, hybrid, args, kwargs, ref)}", flush=True)


if __name__ == "__main__":
    main()
