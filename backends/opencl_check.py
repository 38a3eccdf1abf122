"""Run the Adreno build's OpenCL kernels on PoCL (CPU OpenCL) and compare each with the same
kernel's unscheduled TIR compiled for x86 (docs/backends.md: the TVM wheel has no OpenCL runtime, so
the OpenCL C runs under pyopencl with the launch grid read from the lowered host code).

Per TIR function: the Adreno Relax pipeline is split before its dlight schedules, so the
function exists twice with one name: unscheduled (reference, built for ``llvm``) and scheduled for
the GPU (built for the Adreno OpenCL target like ``tvm.compile`` does, default TIR pipeline). The
host side of the GPU build calls ``T.call_ffi_kernel(name, buffers..., grid..., block...)``; the
kernels run in that order on buffers filled with the same random inputs, and every parameter
buffer is compared. Functions whose kernels take host-allocated scratch buffers are reported as
skipped, not checked.
"""
from __future__ import annotations

import re

import numpy as np

from .kernel_check import KernelCheck, compare, params, prim_funcs, random_inputs, reference_module, run_reference

ADRENO = "qcom/adreno-opencl"
CALL = re.compile(r'T\.call_ffi_kernel\("([^"]+)", (.*?), launch_params=\[(.*?)\]')


def scheduled_and_reference(mod):
    """(reference IRModule, device IRModule). Device: the Adreno Relax legalisation passes (with
    their dlight GPU schedules). Reference: the same passes up to the schedules, run with an x86
    ``llvm`` target current (under a GPU target some legalisations already emit thread-bound
    TIR); fused functions get the same names when fusion made the same groups."""
    import tvm
    from tvm.relax.backend.adreno import pipeline as adreno
    device = tvm.target.Target(ADRENO, host="llvm")
    cpu = tvm.target.Target("llvm")
    with device:
        scheduled = tvm.transform.Sequential(adreno.legalize_passes(device))(mod)
    with cpu:
        passes = adreno.legalize_passes(device)
        unscheduled = [p for p in passes if p.info.name != "ApplyDefaultSchedule"]
        reference = tvm.transform.Sequential(unscheduled)(mod)
    return reference, scheduled


def _device_programs(funcs: dict):
    """(OpenCL C source of every kernel, {function: [(kernel, [arguments], grid, block)]}) of the
    GPU-scheduled functions, lowered together like ``tvm.compile`` does (default TIR pipeline)."""
    import importlib

    import tvm
    tir_build = importlib.import_module("tvm.tirx.build")  # the module; tvm.tirx.build is its function
    target = tvm.target.Target(ADRENO, host="llvm")
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    pipeline, _, finalize_device = tvm.tirx.get_tir_pipeline("default")
    host, devices = tir_build.split_host_device_mods(pipeline(tvm.tirx.transform.BindTarget(target)(mod)))
    source = "\n".join(tir_build.codegen_build(finalize_device()(d), t).inspect_source() for t, d in devices.items())
    launches = {}
    for gv, func in host.functions.items():
        calls = []
        for kernel, args, launch_params in CALL.findall(func.script()):
            dims = [p.strip().strip('"') for p in launch_params.split(",")]
            values = [a.strip() for a in args.split(",")]
            extents = [int(re.sub(r"^T\.int(32|64)\((\d+)\)$", r"\2", v)) for v in values[len(values) - len(dims):]]
            grid, block = [1, 1, 1], [1, 1, 1]
            for dim, extent in zip(dims, extents):
                (grid if dim.startswith("blockIdx") else block)["xyz".index(dim[-1])] = extent
            calls.append((kernel, values[: len(values) - len(dims)], grid, block))
        launches[gv.name_hint] = calls
    return source, launches


def short_kernel_names(source: str, launches: dict) -> tuple[str, dict]:
    """(source, launches) with every kernel renamed ``k0``, ``k1``, ...: TVM names a fused kernel
    after all its ops, and PoCL aborts ("Final linking of kernel ... failed") on names that do not
    fit in a file name (it caches each kernel under a folder of that name)."""
    kernels = sorted({kernel for calls in launches.values() for kernel, *_ in calls}, key=len, reverse=True)
    renamed = {kernel: f"k{i}" for i, kernel in enumerate(kernels)}
    for kernel, short in renamed.items():
        source = re.sub(rf"\b{re.escape(kernel)}\b", short, source)
    return source, {fn: [(renamed[kernel], *rest) for kernel, *rest in calls] for fn, calls in launches.items()}


def _param_of(argument: str, names: set[str]) -> str | None:
    """'lv128_1.data' -> 'lv128' when that is a parameter of the function."""
    base = argument.removesuffix(".data")
    for candidate in (base, re.sub(r"_\d+$", "", base)):
        if candidate in names:
            return candidate
    return None


def opencl_context():
    """A pyopencl context on PoCL (or the first OpenCL platform); RuntimeError when none."""
    import pyopencl as cl
    platforms = cl.get_platforms()
    if not platforms:
        raise RuntimeError("no OpenCL platform (apt-get install pocl-opencl-icd)")
    chosen = next((p for p in platforms if "Portable" in p.name), platforms[0])
    return cl.Context(chosen.get_devices())


def check_kernels(mod, seed: int = 0) -> list[KernelCheck]:
    """Run every TIR function of Relax ``mod`` compiled for Adreno OpenCL on PoCL, each compared
    with its x86 reference on the same random inputs (floats N(0, 1), masks 0/1)."""
    import pyopencl as cl
    reference, scheduled = scheduled_and_reference(mod)
    reference_funcs, device_funcs = prim_funcs(reference), prim_funcs(scheduled)
    names = sorted(n for n in device_funcs if n in reference_funcs and params(reference_funcs[n]) ==
                   params(device_funcs[n]))
    results = [KernelCheck(n, "skipped", reason="the x86 reference fused this function differently")
               for n in sorted(device_funcs) if n not in names]
    expected_fns = reference_module({n: reference_funcs[n] for n in names})
    source, launches = short_kernel_names(*_device_programs({n: device_funcs[n] for n in names}))
    context = opencl_context()
    queue = cl.CommandQueue(context)
    program = cl.Program(context, source).build()
    rng = np.random.default_rng(seed)
    for name in names:
        results.append(_check_one(name, params(reference_funcs[name]), launches.get(name, []), expected_fns[name],
                                  program, context, queue, rng))
    return results


def _check_one(name, specs, launches, reference_fn, program, context, queue, rng) -> KernelCheck:
    import pyopencl as cl
    names = {n for n, _, _ in specs}
    mapped = [[_param_of(a, names) for a in buffers] for _, buffers, _, _ in launches]
    if not launches or any(None in m for m in mapped):
        return KernelCheck(name, "skipped", kernels=len(launches),
                           reason="kernel arguments include host-allocated scratch buffers or scalars")
    arrays = random_inputs(specs, rng)
    want = run_reference(reference_fn, arrays)
    flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
    device = {n: cl.Buffer(context, flags, hostbuf=np.ascontiguousarray(a)) for n, a in arrays.items()}
    for (kernel, _, grid, block), args in zip(launches, mapped):
        getattr(program, kernel)(queue, tuple(g * b for g, b in zip(grid, block)), tuple(block),
                                 *[device[a] for a in args])
    got = [np.empty(shape, dtype) for _, shape, dtype in specs]
    for (pname, _, _), buffer in zip(specs, got):
        cl.enqueue_copy(queue, buffer, device[pname])
    queue.finish()
    error, scale = compare(got, want)
    return KernelCheck(name, "ok", error, len(launches), max_abs_value=scale)
