"""CUDA C -> PTX with NVRTC from PyPI (``nvidia-cuda-nvrtc-cu12``), through ctypes.

TVM's own NVRTC path needs ``cuda-bindings``; this needs only the NVRTC shared library and the
CCCL headers TVM's generated source includes under ``__CUDACC_RTC__``.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
from pathlib import Path


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _cuda_home() -> Path | None:
    """The CUDA toolkit folder: $CUDA_HOME, else the one holding the nvcc on PATH."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def nvrtc_library() -> ctypes.CDLL:
    """NVRTC from the nvidia-cuda-nvrtc-cu12 wheel, else from the CUDA toolkit; RuntimeError when
    neither is present."""
    root, home = _package_dir("nvidia.cuda_nvrtc"), _cuda_home()
    candidates = [root / "lib" / "libnvrtc.so.12"] if root else []
    candidates += sorted((home / "lib64").glob("libnvrtc.so.*")) if home else []
    for path in candidates:
        if path.exists():
            return ctypes.CDLL(str(path))
    raise RuntimeError("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (or set CUDA_HOME to a CUDA toolkit)")


def nvrtc_version() -> str:
    lib = nvrtc_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _include_dirs() -> list[str]:
    dirs = []
    for pkg in ("nvidia.cuda_cccl", "nvidia.cuda_runtime"):
        root = _package_dir(pkg)
        if root is not None and (root / "include").is_dir():
            dirs.append(str(root / "include"))
    home = _cuda_home()
    if not dirs and home is not None:  # the toolkit's own headers (CCCL under include/cccl since CUDA 13)
        dirs += [str(d) for d in (home / "include" / "cccl", home / "include") if d.is_dir()]
    return dirs


def cuda_to_ptx(source: str, arch: str) -> str:
    """Compile CUDA C ``source`` for ``arch`` (e.g. 'sm_90') to PTX text; RuntimeError with the
    NVRTC log on failure."""
    lib = nvrtc_library()
    prog = ctypes.c_void_p()
    check = _checker(lib)
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"model.cu", 0, None, None), "create")
    options = [f"--gpu-architecture=compute_{arch.removeprefix('sm_')}", "-default-device", "--std=c++17"]
    options += [f"-I{d}" for d in _include_dirs()]
    raw = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.nvrtcCompileProgram(prog, len(options), raw)
    if status != 0:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed for {arch}:\n{log.value.decode(errors='replace')}")
    size = ctypes.c_size_t()
    check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "ptx size")
    ptx = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetPTX(prog, ptx), "ptx")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def _checker(lib):
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(status).decode()}")
    return check
