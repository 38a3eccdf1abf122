"""Where the Hexagon build time goes: the converted tiny diffusers Wan2.1 (5 latent frames, Tc=2,
To=1), its kernels compiled for one Hexagon version one at a time (per-kernel seconds, largest
first), then the whole build (``hexagon.build_versions``) for each version asked for.

LLVM options are parsed once per process by TVM's hexagon codegen, so compare settings in
separate runs; ``--llvm-options=`` (empty) is LLVM's default (full unrolling of static loops).

    PYTHONPATH=$PWD:$PWD/tests python benchmarks/bench_hexagon_build.py --version v75 --top 8
    PYTHONPATH=$PWD:$PWD/tests python benchmarks/bench_hexagon_build.py --llvm-options= --whole v68,v73,v75
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default="v75", help="Hexagon version of the per-kernel timing ('' skips it)")
    p.add_argument("--top", type=int, default=8, help="how many of the slowest kernels to list")
    p.add_argument("--llvm-options", default=None, help="comma-separated; default: hexagon.LLVM_OPTIONS")
    p.add_argument("--whole", default="", help="comma-separated versions to time as one whole build each")
    p.add_argument("--only", default="", help="per-kernel timing of the kernels whose name contains this")
    opts = p.parse_args()

    import rehyat_compile as rc
    from models import make_wan_t2v
    from rehyat_compile.backends import hexagon
    from rehyat_compile.backends.portable import flat_program, portable_program
    from rehyat_compile.backends.tvm import relax_module
    if opts.llvm_options is not None:
        hexagon.LLVM_OPTIONS = tuple(o for o in opts.llvm_options.split(",") if o)
    print(f"LLVM options: {list(hexagon.LLVM_OPTIONS)}")
    model, args, kwargs = make_wan_t2v(frames=5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    mod = relax_module(flat_program(portable_program(hybrid, args, kwargs), args, kwargs))

    if opts.version:
        import tvm
        spec = {"tag": f"qcom/hexagon-{opts.version}", "llvm-options": list(hexagon.LLVM_OPTIONS)}
        target = tvm.target.Target(spec, host=spec)
        funcs = hexagon.relax_kernels(mod, target)
        times = []
        for name, func in funcs.items():
            if opts.only not in name:
                continue
            start = time.perf_counter()
            module, obj, shared = hexagon.compile_kernels(hexagon.lower_own_host({name: func}, target), target)
            times.append((time.perf_counter() - start, len(module.inspect_source("s")), name))
            obj.unlink(), shared.unlink()
        times.sort(reverse=True)
        print(f"{opts.version}: {len(times)} kernels, {sum(t for t, _, _ in times):.1f} s compiled one by one")
        for seconds, size, name in times[: opts.top]:
            print(f"  {seconds:6.2f} s  {size / 1000:6.0f} kB asm  {name[:90]}")

    for version in filter(None, opts.whole.split(",")):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            hexagon.build_versions(mod, (version,), Path(out), "wan")
            print(f"whole build {version}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
