"""Every target builds the hybrid block, and each artifact passes its device-free check.

Tolerances: fp32 results vs PyTorch eager, absolute and relative 1e-5 on CPU (LLVM) and 1e-4 on
lavapipe (Vulkan SPIR-V, different exp/erf approximations).
"""
from __future__ import annotations

import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.backends import verify

from blocks import HybridAttentionOnly, HybridBlockStep

pytest.importorskip("tvm")

VULKAN_TOL = 1e-4


def _needs(check, *args):
    try:
        return check(*args)
    except verify.ToolMissing as missing:
        pytest.skip(str(missing))


def test_cuda_build_writes_cuda_c_and_ptx_that_ptxas_accepts(block_x, tmp_path):
    # One arch and no fatbin keeps this lean; the GPU test below builds the default (sm_80 + sm_90 fatbin).
    block, x, _ = block_x
    art = rc.build(block, (x,), target="cuda", out_dir=tmp_path / "cuda",
                   target_options={"archs": ("sm_90",), "fatbin": False})
    files = art.manifest["entries"]["main"]["files"]
    for arch in ("sm_90",):
        ptx = tmp_path / "cuda" / files[f"ptx_{arch}"]
        assert f".target {arch}" in ptx.read_text()
        _needs(verify.ptxas, ptx, arch)
    assert "library" not in files and not art.runnable


def test_adreno_build_writes_opencl_kernels_and_an_aarch64_host_library(block_x, tmp_path):
    block, x, _ = block_x
    chunk = block.layout["chunk_frames"] * block.layout["tokens_per_frame"]
    art = rc.build(HybridBlockStep(block), (x[:, :chunk],), target="adreno", out_dir=tmp_path / "a", streaming=True)
    for entry in ("first", "step"):
        files = art.manifest["entries"][entry]["files"]
        source = tmp_path / "a" / files["opencl_source"]
        assert "__kernel void" in source.read_text()
        _needs(verify.opencl_syntax, source)
        library = tmp_path / "a" / files["library"]
        if library.suffix == ".so":
            assert verify.elf_machine(library) == "aarch64"
        else:
            pytest.skip("aarch64 cross toolchain missing: host code exported as a .tar of objects")
    assert not art.runnable and "does not run on this machine" in art.reason


@pytest.mark.slow
def test_adreno_vulkan_vmfb_runs_on_lavapipe_and_matches(block_x, tmp_path):
    pytest.importorskip("iree.compiler")
    block, x, ref = block_x
    art = rc.build(block, (x,), target="adreno-vulkan", out_dir=tmp_path / "vk")
    if not art.runnable:
        pytest.skip(art.reason)
    torch.testing.assert_close(art(x), ref, atol=VULKAN_TOL, rtol=VULKAN_TOL)


@pytest.mark.slow
def test_hexagon_v75_build_is_hvx_code_that_disassembles(block_x, tmp_path):
    # Hexagon code generation takes ~2 s per kernel on 2 cores: the attention alone keeps it short.
    _, x, _ = block_x
    art = rc.build(HybridAttentionOnly().eval(), (x,), target="hexagon", out_dir=tmp_path / "hex", target_options={"versions": ("v75",)})
    files = art.manifest["entries"]["main"]["files"]
    assert verify.elf_machine(tmp_path / "hex" / files["library_v75"]) == "hexagon"
    text = _needs(verify.hexagon_disassembly, tmp_path / "hex" / files["object_v75"], "v75")
    assert "vmem(" in text  # HVX vector loads/stores: the kernels use the vector unit
    assert "vmem(" in (tmp_path / "hex" / files["assembly_v75"]).read_text()


OPENCL_KERNEL_TOL = 1e-4  # fp32 kernel vs the same TIR on x86, N(0,1) inputs: summation order only


@pytest.mark.slow
def test_adreno_opencl_kernels_run_on_pocl_and_match_x86(block_x):
    pytest.importorskip("pyopencl")
    from rehyat_compile.backends import opencl_check
    from rehyat_compile.backends.portable import flat_program, portable_program
    from rehyat_compile.backends.tvm import relax_module
    block, x, _ = block_x
    try:
        opencl_check.opencl_context()
    except Exception as err:  # no ICD loader or no platform
        pytest.skip(f"no OpenCL platform: {err}")
    results = opencl_check.check_kernels(relax_module(flat_program(portable_program(block, (x,)), (x,))))
    checked = [r for r in results if r.status == "ok"]
    assert len(checked) >= 0.9 * len(results), [r for r in results if r.status != "ok"]
    worst = max(checked, key=lambda r: r.max_abs_error)
    assert worst.max_abs_error <= OPENCL_KERNEL_TOL, worst


@pytest.mark.gpu
def test_cuda_build_runs_on_the_gpu_and_matches_pytorch(block_x, tmp_path):
    from rehyat_compile.backends.tvm import cuda_device_available
    if not cuda_device_available():
        pytest.skip("no CUDA device visible to TVM")
    block, x, ref = block_x
    art = rc.build(block, (x,), target="cuda", out_dir=tmp_path / "cuda")  # sm_80 + sm_90 fatbin .so
    assert art.runnable, art.reason
    torch.testing.assert_close(art(x), ref, atol=1e-4, rtol=1e-4)
