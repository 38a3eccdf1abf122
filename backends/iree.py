"""IREE backend: torch-mlir linalg on tensors -> ``iree-compile`` for Vulkan/SPIR-V (``.vmfb``).

Runs here on Mesa's lavapipe (CPU Vulkan) through the ``iree-run-module`` CLI (BACKENDS.md: the
Python runtime API fails on lavapipe). Strict drivers may reject the SPIR-V (``spirv-val``
flags NoSignedWrap without its extension), which lavapipe accepts.

Subgroup size. IREE's ``adreno`` description lets reductions (matmuls with K >= 64, matvecs,
softmax sums) use subgroup shuffles written for a subgroup of exactly 64 invocations, and the
runtime asks the driver for that size (``requiredSubgroupSize``). A driver that cannot provide it
(lavapipe runs 8-wide subgroups and ignores the request) adds up only part of each row: the tiny
Wan2.1 came out 0.27 off, a lone ``bmm`` [6,32,64] x [6,64,1] 20 off. By default the build removes
subgroup operations from IREE's target description, so reductions are split over threads and
shared memory and are correct at any subgroup size; ``subgroup_ops=True`` keeps IREE's tuned
kernels, which run only where the device offers 64-wide subgroups.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .mlir import linalg_module
from .portable import FlatProgram
from .targets import NotRunnableHere, Target


def iree_tool(name: str) -> str:
    """Path of an IREE command-line tool inside the pip wheels (compiler or runtime package)."""
    import importlib.util
    for package, folder in (("iree.compiler", "_mlir_libs"), ("iree._runtime_libs", "")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / folder / name
            if candidate.exists():
                return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: pip install iree-base-compiler iree-base-runtime")
    return found


def versions() -> dict:
    from importlib.metadata import version
    return {"iree_base_compiler": version("iree-base-compiler"), "iree_base_runtime": version("iree-base-runtime")}


def _iree_compile(args: list[str]) -> str:
    """Run ``iree-compile`` with ``args``; its stdout, or RuntimeError with the first errors."""
    done = subprocess.run([iree_tool("iree-compile"), *args], capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        raise RuntimeError("iree-compile failed:\n" + "\n".join(errors[:5]) + f"\n...\n{done.stderr[-2000:]}")
    return done.stdout


_EMPTY_MODULE = "func.func @f(%x: tensor<1xf32>) -> tensor<1xf32> {\n  return %x : tensor<1xf32>\n}\n"


def vulkan_device_target(vulkan_target: str, subgroup_ops: bool) -> str:
    """IREE's own ``#hal.device.target<"vulkan", ...>`` for ``--iree-vulkan-target=vulkan_target``
    (read back from a trivial module compiled to the preprocessing phase), with the subgroup
    operations of its workgroup-processor description set to ``none`` unless ``subgroup_ops``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "empty.mlir"
        source.write_text(_EMPTY_MODULE)
        text = _iree_compile([str(source), "--iree-hal-target-device=vulkan", f"--iree-vulkan-target={vulkan_target}",
                              "--compile-to=preprocessing"])
    found = re.search(r"(#hal\.device\.target<\"vulkan\".*?>) : !hal\.device", text)
    if found is None:
        raise RuntimeError(f"iree-compile did not report a Vulkan device target for {vulkan_target!r}")
    target = found.group(1)
    return target if subgroup_ops else re.sub(r"\bsubgroup = [a-z|]+", "subgroup = none", target)


def with_device_target(linalg_text: str, device_target: str) -> str:
    """``linalg_text`` with ``hal.device.targets = [device_target]`` on its module: iree-compile
    then compiles for exactly that description (no ``--iree-hal-target-device``)."""
    from iree.compiler import ir
    with ir.Context():
        module = ir.Module.parse(linalg_text)
        module.operation.attributes["hal.device.targets"] = ir.ArrayAttr.get([ir.Attribute.parse(device_target)])
        return str(module)


def build_entry(flat: FlatProgram, spec: Target, out_dir: Path, name: str) -> dict:
    """Write ``name.linalg.mlir`` (torch-mlir output) and ``name.vmfb`` (Vulkan SPIR-V for the
    target GPU; subgroup operations per the module docstring)."""
    source = out_dir / f"{name}.linalg.mlir"
    linalg = str(linalg_module(flat))
    source.write_text(linalg)
    target = vulkan_device_target(spec.options["iree_vulkan_target"], spec.options["subgroup_ops"])
    vmfb = out_dir / f"{name}.vmfb"
    with tempfile.TemporaryDirectory() as tmp:
        targeted = Path(tmp) / "targeted.mlir"
        targeted.write_text(with_device_target(linalg, target))
        _iree_compile([str(targeted), "-o", str(vmfb)])
    return {"linalg_ir": source.name, "vmfb": vmfb.name}


def vulkan_available() -> bool:
    """Whether a Vulkan device (lavapipe counts) answers ``iree-run-module --list_devices``."""
    try:
        done = subprocess.run([iree_tool("iree-run-module"), "--list_devices"], capture_output=True, text=True,
                              timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return "vulkan://" in done.stdout


def vulkan_subgroup_sizes() -> tuple[int, int] | None:
    """(min, max) subgroup size of the first Vulkan device from ``vulkaninfo`` (vulkan-tools), or
    None when it cannot be read."""
    tool = shutil.which("vulkaninfo")
    if tool is None:
        return None
    try:
        text = subprocess.run([tool], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return None
    low, high = re.search(r"minSubgroupSize\s*=\s*(\d+)", text), re.search(r"maxSubgroupSize\s*=\s*(\d+)", text)
    return (int(low.group(1)), int(high.group(1))) if low and high else None


SUBGROUP_OPS_SIZE = 64  # the subgroup size IREE's adreno kernels with subgroup operations are written for


def load_entry(out_dir: Path, spec: Target, files: dict):
    """Callable (weights + inputs as numpy) -> outputs through ``iree-run-module --device=vulkan``.
    NotRunnableHere without a Vulkan device, or for a ``subgroup_ops=True`` build on a device
    without 64-wide subgroups (its reductions would silently add up partial rows)."""
    if not vulkan_available():
        raise NotRunnableHere("no Vulkan device (install mesa-vulkan-drivers for lavapipe)")
    if spec.options.get("subgroup_ops"):
        sizes = vulkan_subgroup_sizes()
        if sizes is None or not sizes[0] <= SUBGROUP_OPS_SIZE <= sizes[1]:
            raise NotRunnableHere(f"built with subgroup_ops=True for {SUBGROUP_OPS_SIZE}-wide subgroups; this Vulkan "
                                  f"device offers {'unknown sizes (no vulkaninfo)' if sizes is None else '%d..%d' % sizes}")
    vmfb = out_dir / files["vmfb"]

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            cmd = [iree_tool("iree-run-module"), "--device=vulkan", f"--module={vmfb}", "--function=main"]
            for i, a in enumerate(arrays):
                np.save(folder / f"in{i}.npy", np.ascontiguousarray(a))
                cmd.append(f"--input=@{folder / f'in{i}.npy'}")
            n_out = _count_results(out_dir / files["linalg_ir"])
            cmd += [f"--output=@{folder / f'out{i}.npy'}" for i in range(n_out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"iree-run-module failed:\n{done.stderr[-4000:]}")
            return [np.load(folder / f"out{i}.npy") for i in range(n_out)]
    return run


def _count_results(linalg_path: Path) -> int:
    from .mlir import _result_types
    return len(_result_types(linalg_path.read_text()))
