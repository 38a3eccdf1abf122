"""IREE backend: torch-mlir linalg on tensors -> ``iree-compile`` for Vulkan/SPIR-V (``.vmfb``).

Runs here on Mesa's lavapipe (CPU Vulkan) through the ``iree-run-module`` CLI (BACKENDS.md: the
Python runtime API fails on lavapipe). Strict drivers may reject the SPIR-V (``spirv-val``
flags NoSignedWrap without its extension), which lavapipe accepts.
"""
from __future__ import annotations

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


def build_entry(flat: FlatProgram, spec: Target, out_dir: Path, name: str) -> dict:
    """Write ``name.linalg.mlir`` and ``name.vmfb`` (Vulkan, SPIR-V tuned for the target GPU)."""
    source = out_dir / f"{name}.linalg.mlir"
    source.write_text(str(linalg_module(flat)))
    vmfb = out_dir / f"{name}.vmfb"
    cmd = [iree_tool("iree-compile"), str(source), "--iree-hal-target-device=vulkan",
           f"--iree-vulkan-target={spec.options['iree_vulkan_target']}", "-o", str(vmfb)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        raise RuntimeError("iree-compile failed:\n" + "\n".join(errors[:5]) + f"\n...\n{done.stderr[-2000:]}")
    return {"linalg_ir": source.name, "vmfb": vmfb.name}


def vulkan_available() -> bool:
    """Whether a Vulkan device (lavapipe counts) answers ``iree-run-module --list_devices``."""
    try:
        done = subprocess.run([iree_tool("iree-run-module"), "--list_devices"], capture_output=True, text=True,
                              timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return "vulkan://" in done.stdout


def load_entry(out_dir: Path, spec: Target, files: dict):
    """Callable (weights + inputs as numpy) -> outputs through ``iree-run-module --device=vulkan``."""
    if not vulkan_available():
        raise NotRunnableHere("no Vulkan device (install mesa-vulkan-drivers for lavapipe)")
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
