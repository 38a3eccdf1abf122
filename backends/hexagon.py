"""Hexagon (HVX) builds through TVM without the Hexagon SDK (docs/backends.md "Hexagon").

``tvm.tirx.build`` treats a hexagon target as a device and skips host finalisation, so the
kernels are lowered here with the hexagon target as its own host: the Relax module goes through
the generic CPU Relax pipeline, its TIR functions through the default TIR pipeline plus host
finalisation, then ``target.build.hexagon``. Two gaps are filled: float intrinsics such as
``tirx.exp`` have no Hexagon lowering (they become libm calls, ``expf``...), and linking calls the
SDK's ``tvm.contrib.hexagon.link_shared``, replaced by ``ld.lld`` (LLVM 22, TVM's LLVM major).
Output per version: HVX assembly ``.s``, object ``.o``, shared object ``.so`` (ELF, QDSP6).
The Relax VM that sequences the kernels runs on the phone's Arm CPU (see the aarch64 target).
LLVM's loop unroller is turned off (:data:`LLVM_OPTIONS`): code size and build time. The kernels
are checked by running them as v66 code under qemu-hexagon (``hexagon_check``).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# Float intrinsics without a Hexagon LLVM lowering -> C math library (fp32 names; fp64 drop the f).
LIBM = {"tirx.exp": "expf", "tirx.log": "logf", "tirx.tanh": "tanhf", "tirx.erf": "erff", "tirx.sqrt": "sqrtf",
        "tirx.pow": "powf", "tirx.log1p": "log1pf", "tirx.exp2": "exp2f", "tirx.sin": "sinf", "tirx.cos": "cosf"}
# Build time of the tiny Wan for v75 (109 kernels, README "Targets"): LLVM's loop unroller fully
# unrolls TIR's static loop nests after HVX vectorisation (2-4x the code for a DSP's small I-cache,
# 2x the time), and Hexagon's software pipeliner spends ~30 s on each masked-softmax kernel (4x).
# Both off: 4x faster builds; the pipeliner's effect on device speed is unmeasured (no device).
# The hexagon codegen parses these once per process (the first Hexagon build's options win) and
# they stay set for LLVM builds that follow in the process (results unchanged: scheduling only).
LLVM_OPTIONS = ("-unroll-threshold=0", "-enable-pipeliner=false")
_registered = False


def lld() -> str | None:
    """ld.lld of LLVM 22 (same major as TVM's LLVM), or any ld.lld."""
    return shutil.which("ld.lld-22") or shutil.which("ld.lld")


def _register_lowerings() -> None:
    global _registered
    if _registered:
        return
    import tvm
    from tvm.tirx.op import register_intrin_lowering

    def to_libm(name):
        def lower(call):
            dtype = str(call.ty)
            return tvm.tirx.call_pure_extern(dtype, name if dtype == "float32" else name[:-1], *call.args)
        return lower
    for op, name in LIBM.items():
        register_intrin_lowering(op, target="hexagon", f=to_libm(name), level=99)
    _registered = True


class _Linker:
    """Stands in for the SDK linker: links with ld.lld and keeps copies of the object and .so."""

    def __init__(self):
        self.objects: list[str] = []
        self.shared: str | None = None

    def __call__(self, so_name, objs, *extra) -> int:
        objects = [str(o).strip('"') for o in objs]
        done = subprocess.run([lld(), "-shared", "--hash-style=sysv", "-o", str(so_name), *objects],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ld.lld failed for Hexagon: {done.stderr[-2000:]}")
        self.objects, self.shared = objects, str(so_name)
        return 0


def kernel_module(mod, version: str):
    """TIR IRModule of ``mod``'s kernels, lowered for ``qcom/hexagon-<version>`` as its own host."""
    import tvm
    spec = {"tag": f"qcom/hexagon-{version}", "llvm-options": list(LLVM_OPTIONS)}
    target = tvm.target.Target(spec, host=spec)
    return lower_own_host(relax_kernels(mod, target), target), target


def relax_kernels(mod, target) -> dict:
    """{name: PrimFunc} of Relax ``mod`` after the generic CPU Relax pipeline under ``target``
    (legalised and fused, not yet lowered: the same TIR can be built for any target)."""
    import tvm
    from tvm import relax
    with target:
        lowered = relax.backend.cpu_generic.get_default_pipeline(target)(mod)
    return {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def lower_own_host(funcs: dict, target):
    """IRModule of ``funcs`` lowered with ``target`` as its own host (default TIR pipeline and
    host finalisation: packed entries ``__tvm_ffi_<name>``), float intrinsics lowered to libm."""
    import tvm
    _register_lowerings()
    kernels = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    kernels = tvm.tirx.transform.BindTarget(target)(kernels)
    pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(target)
    return finalize_host()(pipeline(kernels))


def compile_kernels(kernels, target) -> tuple[object, Path, Path]:
    """(runtime module, object file, shared object) of lowered ``kernels``; the caller owns (and
    removes) the two files, which live in the temporary folder TVM chose."""
    import tvm
    import tvm_ffi
    if lld() is None:
        raise RuntimeError("ld.lld not found: apt-get install lld-22 (Hexagon links with LLVM's linker)")
    _register_lowerings()
    linker = _Linker()
    tvm_ffi.register_global_func("tvm.contrib.hexagon.link_shared", linker, override=True)
    module = tvm.get_global_func("target.build.hexagon")(kernels, target)
    return module, Path(linker.objects[0]), Path(linker.shared)


def build_kernels(kernels, target, out_dir: Path, stem: str) -> dict:
    """Compile lowered ``kernels`` to ``stem.s``, ``stem.o``, ``stem.so`` in ``out_dir``."""
    module, obj, shared = compile_kernels(kernels, target)
    (out_dir / f"{stem}.s").write_text(module.inspect_source("s"))
    shutil.move(obj, out_dir / f"{stem}.o")
    shutil.move(shared, out_dir / f"{stem}.so")
    return {"assembly": f"{stem}.s", "object": f"{stem}.o", "library": f"{stem}.so"}


def build_versions(mod, versions, out_dir: Path, name: str) -> dict:
    """{role_version: file} for every Hexagon ``version`` (e.g. 'v75')."""
    _register_lowerings()
    files = {}
    for version in versions:
        kernels, target = kernel_module(mod, version)
        for role, file in build_kernels(kernels, target, out_dir, f"{name}.{version}").items():
            files[f"{role}_{version}"] = file
    return files
