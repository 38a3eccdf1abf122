"""Device-free checks of built artifacts: each returns what it found or raises with the tool's
message; ``ToolMissing`` when the tool itself is absent (tests turn that into a skip)."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path


class ToolMissing(RuntimeError):
    """A checker's tool (ptxas, llvm-objdump-22, qemu...) is not installed here."""


def tool(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise ToolMissing(f"none of {', '.join(names)} is installed (scripts/install_system_deps.sh)")


def _run(cmd: list[str], what: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:3])}...):\n{(done.stderr or done.stdout)[-3000:]}")
    return done.stdout


ELF_MACHINES = {62: "x86-64", 183: "aarch64", 164: "hexagon"}


def elf_machine(path: Path) -> str:
    """ISA of an ELF file from its header (e_machine), e.g. 'aarch64'."""
    head = Path(path).read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    (machine,) = struct.unpack("<H", head[18:20])
    return ELF_MACHINES.get(machine, f"e_machine={machine}")


def ptxas(ptx_path: Path, arch: str) -> Path:
    """Assemble PTX with ``ptxas -arch=<arch>``; returns the cubin path (beside a temp name)."""
    cubin = Path(ptx_path).with_suffix(f".{arch}.cubin.check")
    try:
        _run([tool("ptxas"), f"-arch={arch}", str(ptx_path), "-o", str(cubin)], "ptxas")
        return cubin
    finally:
        cubin.unlink(missing_ok=True)


def hexagon_disassembly(path: Path, version: str) -> str:
    """``llvm-objdump-22 -d --mcpu=hexagon<version>`` text of a Hexagon object or library."""
    return _run([tool("llvm-objdump-22"), "-d", f"--mcpu=hexagon{version}", str(path)], "llvm-objdump")


def opencl_syntax(source_path: Path) -> None:
    """Compile-check OpenCL C with clang (``-x cl -fsyntax-only``, OpenCL C 2.0)."""
    _run([tool("clang-22", "clang"), "-x", "cl", "-cl-std=CL2.0", "-fsyntax-only", "-Xclang", "-finclude-default-header",
          str(source_path)], "clang OpenCL syntax check")
