"""Every target builds the hybrid block, and each artifact passes its device-free check.

Tolerances: fp32 results vs PyTorch eager, absolute and relative 1e-5 on CPU (LLVM) and 1e-4 on
lavapipe (Vulkan SPIR-V, different exp/erf approximations).
"""
from __future__ import annotations

import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.backends import iree, verify

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


def _vulkan_artifact(model, args, out_dir, **options):
    pytest.importorskip("iree.compiler")
    art = rc.build(model, args, target="adreno-vulkan", out_dir=out_dir, target_options=options or None)
    if not art.runnable and "no Vulkan device" in art.reason:
        pytest.skip(art.reason)
    return art


class Matmul(torch.nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


class BoolMask(torch.nn.Module):
    """Bool tensors in memory: a bool input, a bool ``cat`` and a bool output (IREE's adreno
    target has no 8-bit storage; these used to fail to lower to SPIR-V)."""

    def forward(self, x, valid):
        mask = torch.cat([valid, torch.ones(x.shape[-1] - valid.shape[0], dtype=torch.bool)])
        return x + torch.where(mask, 0.0, float("-inf")), mask[1:] & (x[0, 0, 1:] > 0)


@pytest.mark.slow
def test_adreno_vulkan_carries_bool_inputs_and_outputs_through_int32_buffers(tmp_path):
    x, valid = torch.randn(2, 32, 48), torch.arange(16) % 3 > 0
    art = _vulkan_artifact(BoolMask(), (x, valid), tmp_path / "bool")
    entry = art.manifest["entries"]["main"]
    assert [s["dtype"] for s in entry["inputs"]] == ["float32", "bool"]
    assert [s["dtype"] for s in entry["outputs"]] == ["float32", "bool"]  # the manifest keeps saying bool
    assert "tensor<16xi32>" in (tmp_path / "bool" / entry["files"]["linalg_ir"]).read_text()
    got, want = art.entries["main"](x, valid), BoolMask()(x, valid)
    torch.testing.assert_close(got[0], want[0])
    assert got[1].dtype == torch.bool and torch.equal(got[1], want[1])


@pytest.mark.slow
def test_adreno_vulkan_matvec_with_long_reduction_is_right_at_any_subgroup_size(tmp_path):
    # K = 64 made IREE pick 64-wide subgroup reductions; lavapipe's 8-wide subgroups summed 1/8 of each row.
    a, b = torch.randn(6, 32, 64), torch.randn(6, 64, 1)
    art = _vulkan_artifact(Matmul(), (a, b), tmp_path / "mv")
    torch.testing.assert_close(art(a, b), a @ b, atol=VULKAN_TOL, rtol=VULKAN_TOL)
    tuned = _vulkan_artifact(Matmul(), (a, b), tmp_path / "mv-subgroups", subgroup_ops=True)
    sizes = iree.vulkan_subgroup_sizes()
    if sizes and sizes[0] <= iree.SUBGROUP_OPS_SIZE <= sizes[1]:
        torch.testing.assert_close(tuned(a, b), a @ b, atol=VULKAN_TOL, rtol=VULKAN_TOL)
    else:  # lavapipe: the tuned build would be wrong here, so it is not run
        assert not tuned.runnable and "subgroup_ops=True" in tuned.reason


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
    _assert_every_kernel_matches(opencl_check.check_kernels(relax_module(flat_program(portable_program(block, (x,)), (x,)))))


def _assert_every_kernel_matches(results):
    assert results and all(r.status == "ok" for r in results), [r for r in results if r.status != "ok"]
    worst = max(results, key=lambda r: r.max_abs_error)
    assert worst.max_abs_error <= OPENCL_KERNEL_TOL, worst


class RotaryInterleave(torch.nn.Module):
    """diffusers Wan's rotary embedding: even and odd channels written through strided slices
    into an empty tensor (``slice_scatter`` with step 2), which TVM 0.27 miscompiled for OpenCL."""

    def forward(self, x, cos, sin):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out


@pytest.mark.slow
def test_strided_slice_scatter_kernels_match_x86_on_pocl():
    pytest.importorskip("pyopencl")
    from rehyat_compile.backends import opencl_check
    from rehyat_compile.backends.portable import flat_program, portable_program
    from rehyat_compile.backends.tvm import relax_module
    try:
        opencl_check.opencl_context()
    except Exception as err:
        pytest.skip(f"no OpenCL platform: {err}")
    args = (torch.randn(1, 80, 2, 16), torch.randn(1, 80, 1, 8), torch.randn(1, 80, 1, 8))
    _assert_every_kernel_matches(opencl_check.check_kernels(relax_module(flat_program(portable_program(RotaryInterleave(), args), args))))


@pytest.mark.gpu
def test_cuda_build_runs_on_the_gpu_and_matches_pytorch(block_x, tmp_path):
    from rehyat_compile.backends.tvm import cuda_device_available
    if not cuda_device_available():
        pytest.skip("no CUDA device visible to TVM")
    block, x, ref = block_x
    art = rc.build(block, (x,), target="cuda", out_dir=tmp_path / "cuda")  # sm_80 + sm_90 fatbin .so
    assert art.runnable, art.reason
    torch.testing.assert_close(art(x), ref, atol=1e-4, rtol=1e-4)
