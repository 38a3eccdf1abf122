"""Host ``.so`` with an nvcc fatbin (one cubin per arch) for a Relax module, on a GPU-less machine.

TVM compiles CUDA kernels to a binary only when its CUDA runtime library loads, and that needs
``libcuda.so.1`` (the driver). Without a GPU the kernels stay CUDA source. So the build runs in a
subprocess whose loader finds a stub ``libcuda.so.1`` exporting the driver symbols TVM's runtime
links against (never called while compiling); nvcc then makes the fatbin. On a GPU machine the
real driver is used and the stub is not built.
"""
from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                  "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                  "cuTensorMapEncodeTiled")
CUDA_ERROR_NO_DEVICE = 100


def _stub_driver(folder: Path) -> None:
    """Write and compile a libcuda.so.1 whose functions all return CUDA_ERROR_NO_DEVICE."""
    source = folder / "libcuda_stub.c"
    source.write_text("".join(f"int {s}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for s in DRIVER_SYMBOLS))
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so.1"),
                    str(source)], check=True, capture_output=True)


def build_fatbin_library(program, archs: tuple[str, ...], host: dict, path: Path) -> None:
    """Compile the ExportedProgram ``program`` (every placeholder a user input) for CUDA ``archs``
    (e.g. ('sm_80', 'sm_90')) with a ``host`` LLVM target; export a shared library with the fatbin
    to ``path``. (The program crosses to the subprocess with ``torch.export.save``: TVM's JSON
    serialiser crashes on this Relax module.)"""
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.export.save(program, folder / "program.pt2")
        env = dict(os.environ)
        if ctypes.util.find_library("cuda") is None:
            _stub_driver(folder)
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [tmp, env.get("LD_LIBRARY_PATH")]))
        cmd = [sys.executable, "-m", "rehyat_compile.backends.cuda_fatbin", str(folder / "program.pt2"),
               str(path), ",".join(archs), repr(host)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"CUDA fatbin build failed:\n{done.stderr[-4000:]}")


def _main(program_path: str, out_path: str, archs: str, host: str) -> None:
    import ast

    import torch
    import tvm
    import tvm_ffi
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.support import nvcc

    arch_list = archs.split(",")
    gencode = [f for a in arch_list for f in ("-gencode", f"arch=compute_{a[3:]},code={a}")]

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        return nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, compiler="nvcc")

    mod = from_exported_program(torch.export.load(program_path))
    target = tvm.target.Target({"kind": "cuda", "arch": arch_list[-1]}, host=ast.literal_eval(host))
    with target:
        executable = tvm.compile(mod, target=target)
    kinds = {m.kind for m in executable.mod.imports[0].imports}
    if "cuda" not in kinds or not tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True):
        raise SystemExit(f"TVM's CUDA runtime did not load (device modules: {kinds})")
    executable.export_library(out_path)


if __name__ == "__main__":
    _main(*sys.argv[1:])
