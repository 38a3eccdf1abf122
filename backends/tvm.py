"""TVM backend: Relax imported from the exported program, compiled per target.

Entry point :func:`build_entry` writes one entry's files (library, kernel sources) into an
artifact folder and returns their roles; :func:`load_entry` turns them back into a callable where
the target can run on this machine. Target facts and traps: docs/backends.md.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .portable import FlatProgram
from .targets import NotRunnableHere, Target


def _tvm():
    import tvm
    return tvm


def versions() -> dict:
    tvm = _tvm()
    return {"tvm": tvm.__version__, "tvm_llvm": str(tvm.support.libinfo().get("LLVM_VERSION", "?"))}


def relax_module(flat: FlatProgram):
    """Relax IRModule of ``flat``: one function ``main(weights..., inputs...)``."""
    from tvm.relax.frontend.torch import from_exported_program
    return from_exported_program(flat.program)


def tvm_target(spec: Target, device=None):
    tvm = _tvm()
    device = spec.tvm_device if device is None else device
    host = spec.tvm_host
    return tvm.target.Target(device, host=host) if host is not None else tvm.target.Target(device)


def device_modules(executable) -> list:
    """The kernel modules (cuda, opencl, ...) imported by a compiled VM executable's host code."""
    found, stack = [], list(executable.mod.imports)
    while stack:
        mod = stack.pop()
        if mod.kind not in ("llvm", "relax.VMExecutable", "static_library"):
            found.append(mod)
        stack.extend(mod.imports)
    return found


def _cross_compiler(triple: str):
    """export_library's compile function for ``triple``; None when the cross toolchain is absent."""
    from tvm.support import cc
    gxx = f"{triple}-g++"
    return cc.cross_compiler(gxx) if shutil.which(gxx) else None


def _export_host(executable, path_so: Path, triple: str | None) -> Path:
    """Host library as a shared object (cross-compiled for ``triple``), or a ``.tar`` of objects
    when the cross toolchain is absent (still linkable on the device)."""
    if triple is None:
        executable.export_library(str(path_so))
        return path_so
    fcompile = _cross_compiler(triple)
    if fcompile is None:
        tar = path_so.with_suffix(".tar")
        executable.export_library(str(tar))
        return tar
    executable.export_library(str(path_so), fcompile=fcompile)
    return path_so


# ---------------------------------------------------------------------------------------------
# Per-target builds: each returns {role: file name} written into out_dir
# ---------------------------------------------------------------------------------------------

def _build_cpu(flat, mod, spec: Target, out_dir: Path, name: str) -> dict:
    tvm = _tvm()
    executable = tvm.compile(mod, target=tvm_target(spec))
    triple = spec.tvm_device.get("mtriple") if isinstance(spec.tvm_device, dict) else None
    lib = _export_host(executable, out_dir / f"{name}.so", triple)
    return {"library": lib.name}


def _build_cuda(flat, mod, spec: Target, out_dir: Path, name: str) -> dict:
    from . import nvrtc
    tvm = _tvm()
    files = {}
    for arch in spec.options["archs"]:
        target = tvm.target.Target({"kind": "cuda", "arch": arch}, host=spec.tvm_host)
        with target:
            executable = tvm.compile(mod, target=target)
        (source,) = [m.inspect_source() for m in device_modules(executable)]
        (out_dir / f"{name}.{arch}.cu").write_text(source)
        (out_dir / f"{name}.{arch}.ptx").write_text(nvrtc.cuda_to_ptx(source, arch))
        files[f"cuda_source_{arch}"] = f"{name}.{arch}.cu"
        files[f"ptx_{arch}"] = f"{name}.{arch}.ptx"
    library = _cuda_fatbin_library(flat, spec, out_dir, name)
    if library is not None:
        files["library"] = library
    return files


def _cuda_fatbin_library(flat, spec: Target, out_dir: Path, name: str) -> str | None:
    """Host .so embedding an nvcc fatbin (one cubin per arch); None without nvcc."""
    from .cuda_fatbin import build_fatbin_library
    if shutil.which("nvcc") is None or not spec.options.get("fatbin", True):
        return None
    build_fatbin_library(flat.program, spec.options["archs"], spec.tvm_host, out_dir / f"{name}.so")
    return f"{name}.so"


def _build_adreno(flat, mod, spec: Target, out_dir: Path, name: str) -> dict:
    tvm = _tvm()
    executable = tvm.compile(mod, target=tvm_target(spec))
    (kernels,) = device_modules(executable)
    (out_dir / f"{name}.cl").write_text(kernels.inspect_source())
    lib = _export_host(executable, out_dir / f"{name}.so", spec.tvm_host["mtriple"])
    return {"opencl_source": f"{name}.cl", "library": lib.name}


def _build_hexagon(flat, mod, spec: Target, out_dir: Path, name: str) -> dict:
    from . import hexagon
    return hexagon.build_versions(mod, spec.options["versions"], out_dir, name)


BUILDERS = {"cpu": _build_cpu, "aarch64": _build_cpu, "cuda": _build_cuda, "adreno": _build_adreno,
            "hexagon": _build_hexagon}


def build_entry(flat: FlatProgram, spec: Target, out_dir: Path, name: str) -> dict:
    """Compile ``flat`` for ``spec`` into ``out_dir``; returns {role: file name}."""
    mod = relax_module(flat)
    files = BUILDERS[spec.name](flat, mod, spec, out_dir, name)
    (out_dir / f"{name}.relax.py").write_text(mod.script())
    files["relax_ir"] = f"{name}.relax.py"
    return files


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def cuda_device_available() -> bool:
    """A CUDA driver and device TVM can use (the stub driver of a GPU-less build is not one)."""
    import ctypes.util
    return ctypes.util.find_library("cuda") is not None and _tvm().cuda(0).exist


def load_entry(out_dir: Path, spec: Target, files: dict):
    """Callable ``(list of numpy arrays: weights then inputs) -> list of numpy arrays``."""
    if spec.name == "aarch64":
        return _emulated_aarch64_entry(out_dir / files["library"])
    tvm = _tvm()
    from tvm import relax
    if spec.name == "cpu":
        device = tvm.cpu()
    elif spec.name == "cuda" and "library" in files and cuda_device_available():
        device = tvm.cuda(0)
    else:
        raise NotRunnableHere(f"target {spec.name!r} does not run on this machine "
                              f"({'no CUDA device' if spec.name == 'cuda' else 'different device/ISA'}); "
                              "its files are built and checked with the device-free checks")
    lib = tvm.runtime.load_module(str(out_dir / files["library"]))
    vm = relax.VirtualMachine(lib, device)

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays])
        return [r.numpy() for r in result]
    return run


def _emulated_aarch64_entry(library: Path):
    """The ``load_entry`` callable of an aarch64 build, run under qemu-aarch64 (its ``emulator``
    attribute says so); NotRunnableHere naming what is missing for the emulation."""
    from . import aarch64_qemu
    from .verify import ToolMissing
    if library.suffix != ".so":
        raise NotRunnableHere(f"{library.name} holds aarch64 objects, not a shared object (built without "
                              f"{aarch64_qemu.CROSS_GXX}): rebuild with the cross toolchain to run it under qemu-aarch64")
    try:
        aarch64_qemu.require_emulation()
    except ToolMissing as missing:
        raise NotRunnableHere(f"target 'aarch64' runs here only under qemu-aarch64 emulation, which is not "
                              f"available: {missing}") from None

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return aarch64_qemu.run_entry(library, "main", arrays)
    run.emulator = "qemu-aarch64"
    return run
