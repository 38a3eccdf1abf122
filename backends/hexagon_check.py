"""Run every Hexagon kernel of a Relax module under qemu-hexagon and compare it with x86.

qemu-hexagon 7.2 cannot execute HVX floating point (v68+), so the kernels are built for
Hexagon v66 (scalar fp32, integer HVX): the same TIR functions the Hexagon build compiles (the
generic CPU Relax pipeline under the Hexagon target), lowered with the target as its own host
and libm calls for float intrinsics (``hexagon.lower_own_host``), emitted as one object file.
The same functions are built for x86 by TVM and run in this process.

All kernels are linked once, with ``hexagon_driver.c`` (the few TVM runtime pieces the kernels
call, DLTensor/TVMFFIAny arguments from the tvm_ffi C header) and musl, into one static
``hexagon-linux-musl`` executable by ``zig cc`` (PyPI ``ziglang``). One qemu-hexagon run calls
every kernel on random inputs read from a file (floats N(0, 1), masks 0/1, indices 0..3) and
writes every parameter buffer back; each is compared with the x86 run on the same inputs.

Tolerance (:data:`TOLERANCE`, on :attr:`KernelCheck.relative_error` = max |hexagon - x86| /
max(1, max |x86|)): the kernels are fp32 and both sides run the same loop nests, so what differs
is the float library (musl's ``expf``/``erff``... against LLVM/glibc on x86, each within an ulp
or two) and the summation order LLVM picks when it vectorises reductions. Measured: worst 2.1e-7
(3.5 fp32 ulps of the output scale, in the matmuls) over the 154 distinct kernels of the tiny
Wan's parallel and step graphs; 1e-5 leaves room for longer reductions, while a wrong kernel is
off by O(1).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .hexagon import LLVM_OPTIONS
from .kernel_check import KernelCheck, compare, params, random_inputs, reference_module, run_reference
from .verify import ToolMissing, tool

# Hexagon v66 with 128-byte HVX: the newest version qemu 7.2 runs. Linux triple: the executable
# is a musl Linux program. One core: no parallel launches; no VTCM (TCM scratchpad) under qemu.
V66 = {"kind": "hexagon", "mcpu": "hexagonv66", "mtriple": "hexagon-unknown-linux-musl",
       "mattr": ["+hvxv66", "+hvx-length128b"], "num-cores": 1, "vtcm-capacity": 0,
       "llvm-options": list(LLVM_OPTIONS)}
TOLERANCE = 1e-5
DRIVER = Path(__file__).with_name("hexagon_driver.c")
# DLPack type codes of the numpy kinds the kernels take.
DL_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}
ENTRY_PREFIX = "__tvm_ffi_"  # host finalisation's packed entry of function NAME


def zig_cc() -> list[str]:
    """``zig cc`` from the ziglang wheel (ships musl and compiler-rt for hexagon)."""
    try:
        import ziglang  # noqa: F401
    except ImportError as missing:
        raise ToolMissing("pip install ziglang (zig cc links the Hexagon test program)") from missing
    return [sys.executable, "-m", "ziglang", "cc"]


def qemu_hexagon() -> str:
    return tool("qemu-hexagon")


def v66_target():
    import tvm
    return tvm.target.Target(V66, host=V66)


def checkable(funcs: dict) -> tuple[dict, list[KernelCheck]]:
    """(functions with static buffer parameters, skips for the others)."""
    kept, skipped = {}, []
    for name, func in sorted(funcs.items()):
        try:
            params(func)
        except (TypeError, ValueError):
            skipped.append(KernelCheck(name, "skipped", reason="symbolic buffer shape"))
            continue
        kept[name] = func
    return kept, skipped


def compile_object(funcs: dict, out_dir: Path) -> Path:
    """``funcs`` built for Hexagon v66 into ``out_dir/kernels.o``."""
    import shutil

    from .hexagon import compile_kernels, lower_own_host
    target = v66_target()
    _, obj, shared = compile_kernels(lower_own_host(funcs, target), target)
    shutil.move(obj, out_dir / "kernels.o")
    shared.unlink(missing_ok=True)
    return out_dir / "kernels.o"


ZIG_TARGET = ["-target", "hexagon-linux-musl", "-mcpu=hexagonv66", "-O2", "-static"]


def warm_toolchain() -> None:
    """Link a trivial program with the driver's flags, so zig builds (once, ~1.5 min on 2 cores)
    and caches musl and compiler-rt for hexagon before any check needs them (scripts/setup.sh)."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "main.c"
        source.write_text("#include <stdio.h>\nint main(void) { puts(\"ok\"); return 0; }\n")
        subprocess.run([*zig_cc(), *ZIG_TARGET, str(source), "-o", str(Path(scratch) / "main")], check=True)


def link_program(obj: Path, names: list[str], out_dir: Path) -> Path:
    """One static hexagon-linux-musl executable: the driver plus every kernel of ``obj``;
    ``names[i]`` is kernel index i of the plan."""
    import tvm_ffi
    (out_dir / "kernels.h").write_text("".join(f"KERNEL({ENTRY_PREFIX}{n})\n" for n in names))
    exe = out_dir / "kernels.hexagon"
    include = Path(tvm_ffi.__file__).parent / "include"
    cmd = [*zig_cc(), *ZIG_TARGET, f"-I{include}", f"-I{out_dir}", str(DRIVER), str(obj), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"zig cc failed to link the Hexagon program:\n{done.stderr[-3000:]}")
    return exe


def write_plan(calls: list[tuple[int, dict[str, np.ndarray]]], out_dir: Path) -> None:
    """``plan`` (text) and ``inputs`` (bytes) for the driver: per call the kernel index and each
    argument's DLPack dtype and shape; the arrays' bytes in the same order."""
    lines = [str(len(calls))]
    with open(out_dir / "inputs", "wb") as inputs:
        for index, arrays in calls:
            lines.append(f"{index} {len(arrays)}")
            for a in arrays.values():
                lines.append(" ".join(map(str, (DL_CODES[a.dtype.kind], a.dtype.itemsize * 8, 1, a.ndim, *a.shape))))
                inputs.write(np.ascontiguousarray(a).tobytes())
    (out_dir / "plan").write_text("\n".join(lines) + "\n")


def read_outputs(calls: list[tuple[int, dict[str, np.ndarray]]], out_dir: Path) -> list[list[np.ndarray]]:
    """The driver's ``outputs`` cut into arrays shaped like each call's inputs (the calls whose
    buffers were all written: every call unless the program crashed)."""
    path = out_dir / "outputs"
    raw, offset, results = path.read_bytes() if path.exists() else b"", 0, []
    for _, arrays in calls:
        if offset + sum(a.nbytes for a in arrays.values()) > len(raw):
            break
        buffers = []
        for a in arrays.values():
            buffers.append(np.frombuffer(raw, a.dtype, a.size, offset).reshape(a.shape))
            offset += a.nbytes
        results.append(buffers)
    return results


def run_program(exe: Path, out_dir: Path, timeout_s: float) -> tuple[dict[int, int], str]:
    """({call: return code} of the calls that finished, message) of one qemu-hexagon run of the
    driver; the message names the exit status when the program crashed."""
    done = subprocess.run([qemu_hexagon(), str(exe), "plan", "inputs", "outputs"], cwd=out_dir,
                          capture_output=True, text=True, timeout=timeout_s)
    codes = {int(w[1]): int(w[3]) for w in (line.split() for line in done.stdout.splitlines()) if w[:1] == ["call"]}
    message = done.stderr[-500:]
    if done.returncode != 0:
        message = f"qemu-hexagon exited with {done.returncode}: {message}"
    return codes, message


def check_functions(funcs: dict, seed: int = 0, work_dir: Path | None = None,
                    timeout_s: float = 600) -> list[KernelCheck]:
    """Every PrimFunc of ``funcs`` on qemu-hexagon v66 against x86, one link and one qemu run."""
    kept, results = checkable(funcs)
    if not kept:
        return results
    names = sorted(kept)
    rng = np.random.default_rng(seed)
    calls = [(i, random_inputs(params(kept[n]), rng)) for i, n in enumerate(names)]
    reference = reference_module(kept)
    expected = [run_reference(reference[n], arrays) for n, (_, arrays) in zip(names, calls)]
    with tempfile.TemporaryDirectory(prefix="hexagon-check-") as scratch:
        out_dir = Path(work_dir or scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        exe = link_program(compile_object(kept, out_dir), names, out_dir)
        write_plan(calls, out_dir)
        codes, message = run_program(exe, out_dir, timeout_s)
        got = read_outputs(calls, out_dir)
    for i, name in enumerate(names):
        if i not in codes:
            crashed = i == len(codes)
            results.append(KernelCheck(name, "failed" if crashed else "skipped", kernels=1,
                                       reason=message if crashed else "not run: an earlier kernel crashed the program"))
        elif codes[i] != 0:
            results.append(KernelCheck(name, "failed", kernels=1, reason=f"kernel returned {codes[i]}: {message}"))
        else:
            error, scale = compare(got[i], expected[i])
            results.append(KernelCheck(name, "ok", error, kernels=1, max_abs_value=scale))
    return sorted(results, key=lambda r: r.function)


def distinct_kernels(kernel_sets: list[dict]) -> dict:
    """One {name: PrimFunc} of several modules' kernels, each distinct kernel once (a parallel
    graph and its streaming step share most of theirs); a name taken by a different kernel gets
    the module's index appended."""
    from tvm_ffi.structural import structural_equal, structural_hash
    kept, by_hash = {}, {}
    for index, funcs in enumerate(kernel_sets):
        for name, func in funcs.items():
            bare = func.without_attr("global_symbol")
            same = by_hash.setdefault(structural_hash(bare), [])
            if any(structural_equal(bare, other) for other in same):
                continue
            same.append(bare)
            kept[name if name not in kept else f"{name}_m{index}"] = func
    return kept


def check_on_qemu(mod, *more_mods, seed: int = 0, work_dir: Path | None = None) -> list[KernelCheck]:
    """Every TIR kernel of Relax ``mod`` (as ``backends.tvm.relax_module`` gives) and of
    ``more_mods`` (each distinct kernel once) built for Hexagon v66, run under qemu-hexagon and
    compared with the same kernel built for x86 and run here."""
    from .hexagon import relax_kernels
    target = v66_target()
    return check_functions(distinct_kernels([relax_kernels(m, target) for m in (mod, *more_mods)]), seed, work_dir)


def matches(result: KernelCheck, tolerance: float = TOLERANCE) -> bool:
    """The kernel ran and its relative error (:attr:`KernelCheck.relative_error`) is in tolerance."""
    return result.status == "ok" and result.relative_error <= tolerance


def summary(results: list[KernelCheck], tolerance: float = TOLERANCE) -> str:
    """'N/M kernels match x86 on qemu-hexagon v66 ..., worst err E' (+ the ones that do not)."""
    ran = [r for r in results if r.status == "ok"]
    worst = max((r.relative_error for r in ran), default=float("nan"))
    line = (f"{sum(matches(r, tolerance) for r in results)}/{len(results)} kernels match x86 on qemu-hexagon v66 "
            f"(relative tolerance {tolerance:g}), worst err {worst:.1e}")
    others = [f"{r.function} ({r.reason or f'error {r.relative_error:.1e}'})" for r in results if not matches(r, tolerance)]
    return line + (f"; NOT MATCHING: {'; '.join(others)}" if others else "")


if __name__ == "__main__":
    warm_toolchain()
