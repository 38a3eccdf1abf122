"""Per-kernel device checks of the converted tiny Wan2.1 (5 latent frames, Tc=2, To=1), parallel
and streaming step graphs: every Adreno OpenCL kernel on PoCL and every kernel as Hexagon v66
code under qemu-hexagon, each against the same kernel on x86. Prints one line per check.

    python scripts/kernel_checks.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import converted_wan_t2v  # noqa: E402
from rehyat_compile.backends import hexagon_check, opencl_check  # noqa: E402
from rehyat_compile.backends.tvm import relax_module  # noqa: E402
from rehyat_compile.build import _entries  # noqa: E402


def opencl_line(results) -> str:
    ran = [r for r in results if r.status == "ok"]
    worst = max((r.max_abs_error for r in ran), default=float("nan"))
    return f"{sum(r.max_abs_error <= 1e-4 for r in ran)}/{len(results)} match x86 within 1e-4, worst {worst:.1e}"


def main() -> None:
    hybrid, args, kwargs = converted_wan_t2v()
    modules = {("parallel", "step")[streaming]: relax_module(next(iter(_entries(hybrid, args, kwargs, streaming)[0].values())))
               for streaming in (False, True)}
    for graph, mod in modules.items():
        started = time.perf_counter()
        line = opencl_line(opencl_check.check_kernels(mod))
        print(f"adreno OpenCL on PoCL, {graph} graph: {line} ({time.perf_counter() - started:.0f} s)", flush=True)
    started = time.perf_counter()
    line = hexagon_check.summary(hexagon_check.check_on_qemu(*modules.values()))
    print(f"hexagon v66 under qemu-hexagon, parallel + step graphs (distinct kernels): {line} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
