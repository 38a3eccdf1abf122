"""aarch64 builds run under qemu-aarch64 (with PyPI's aarch64 TVM runtime) and match PyTorch.

Tolerance: fp32 results vs PyTorch eager, absolute and relative 1e-5 for the hybrid block (AArch64
LLVM code vs eager: summation order only); 1e-4 for the tiny Wan2.1 (output magnitude ~2, as in
tests/test_build_wan.py). Every test skips with the missing piece's message where qemu-aarch64,
aarch64-linux-gnu-g++ or the aarch64 runtime (scripts/setup.sh fetches it) is absent.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.backends import aarch64_qemu, verify

from blocks import HybridBlockStep

pytest.importorskip("tvm")

TOL = 1e-5
WAN_TOL = 1e-4


@pytest.fixture(scope="module")
def emulation():
    try:
        return aarch64_qemu.require_emulation()
    except verify.ToolMissing as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="module")
def block_artifact(block_x, tmp_path_factory):
    """The hybrid block built for aarch64 (once per module: a build takes ~10 s on 2 cores)."""
    block, x, _ = block_x
    art = rc.build(block, (x,), target="aarch64", out_dir=tmp_path_factory.mktemp("arm") / "block")
    if art.manifest["entries"]["main"]["files"]["library"].endswith(".tar"):
        pytest.skip(f"{aarch64_qemu.CROSS_GXX} missing: host code exported as a .tar of objects")
    return art


@pytest.fixture(scope="module")
def step_artifact(block_x, tmp_path_factory, emulation):
    """The block's streaming step (entries first + step) built for aarch64, and the step module."""
    block, x, _ = block_x
    stepper = HybridBlockStep(block)
    chunk = block.layout["chunk_frames"] * block.layout["tokens_per_frame"]
    art = rc.build(stepper, (x[:, :chunk],), target="aarch64", out_dir=tmp_path_factory.mktemp("arm") / "step",
                   streaming=True)
    return art, stepper, chunk


def test_aarch64_build_is_an_aarch64_shared_object(block_artifact):
    library = block_artifact.out_dir / block_artifact.manifest["entries"]["main"]["files"]["library"]
    assert verify.elf_machine(library) == "aarch64"


def test_missing_runtime_is_reported_with_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv(aarch64_qemu.RUNTIME_ENV, str(tmp_path / "empty"))
    with pytest.raises(verify.ToolMissing, match="python -m rehyat_compile.backends.aarch64_qemu"):
        aarch64_qemu.require_runtime()


def test_aarch64_artifact_without_the_runtime_is_not_runnable_and_says_what_is_missing(block_artifact, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv(aarch64_qemu.RUNTIME_ENV, str(tmp_path / "empty"))
    art = rc.load(block_artifact.out_dir)
    assert not art.runnable and art.emulated is None
    assert "qemu-aarch64" in art.reason and "aarch64 TVM runtime" in art.reason
    with pytest.raises(RuntimeError, match="aarch64 TVM runtime"):
        art(torch.zeros(1))


def test_runtime_is_extracted_from_wheels_by_library_name(tmp_path, monkeypatch):
    import zipfile
    wheels = []
    for dist, libraries in aarch64_qemu.RUNTIME_LIBRARIES.items():
        wheel = tmp_path / f"{dist}-aarch64.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for name in libraries:
                archive.writestr(f"pkg/lib/{name}", name.encode())
            archive.writestr("pkg/lib/libunneeded.so", b"x")
        wheels.append(wheel)
    monkeypatch.setenv(aarch64_qemu.RUNTIME_ENV, str(tmp_path / "rt"))
    folder = aarch64_qemu.fetch_runtime(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(aarch64_qemu.runtime_library_names())
    assert (folder / "libtvm_ffi.so").read_bytes() == b"libtvm_ffi.so"


def test_hybrid_block_aarch64_build_runs_under_qemu_and_matches_pytorch(block_x, block_artifact, emulation):
    _, x, ref = block_x
    art = rc.load(block_artifact.out_dir)
    assert art.runnable and art.emulated == "qemu-aarch64", art.reason
    assert "emulated='qemu-aarch64'" in repr(art)
    torch.testing.assert_close(art(x), ref, atol=TOL, rtol=TOL)


def test_hybrid_block_streaming_aarch64_build_runs_first_and_step_under_qemu(block_x, step_artifact):
    _, x, _ = block_x
    art, stepper, chunk = step_artifact
    assert art.emulated == "qemu-aarch64", art.reason
    with torch.no_grad():
        want_first = stepper(x[:, :chunk])
        want_step = stepper(x[:, chunk:2 * chunk], *want_first[1:])
    got_first = art(x[:, :chunk])
    got_step = art(x[:, chunk:2 * chunk], *got_first[1:])
    for got, want in zip((*got_first, *got_step), (*want_first, *want_step)):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_run_entry_returns_every_output_of_a_tuple_result(block_x, step_artifact):
    # The first entry returns (output, *state) with a bool tensor among them: dtypes and shapes survive.
    _, x, _ = block_x
    art, _, chunk = step_artifact
    first = art.entries["first"]
    outputs = aarch64_qemu.run_entry(art.out_dir / art.manifest["entries"]["first"]["files"]["library"],
                                     "main", first.weights + [x[:, :chunk].numpy()])
    assert [(str(o.dtype), list(o.shape)) for o in outputs] == [(s["dtype"], s["shape"]) for s in first.outputs]
    assert any(o.dtype == np.bool_ for o in outputs)


def _tiny_wan():
    pytest.importorskip("diffusers")
    from models import converted_wan_t2v
    return converted_wan_t2v()


@pytest.mark.slow
def test_converted_wan21_aarch64_build_runs_under_qemu_and_matches_pytorch(tmp_path, emulation):
    hybrid, args, kwargs = _tiny_wan()
    with torch.no_grad():
        ref = hybrid(*args, **kwargs)
    art = rc.build(hybrid, args, kwargs, target="aarch64", out_dir=tmp_path / "wan")
    assert art.emulated == "qemu-aarch64", art.reason
    out = art(*args, **kwargs)
    torch.testing.assert_close(out[0], ref[0], atol=WAN_TOL, rtol=WAN_TOL)


def _chunk_inputs(runner, args, kwargs, start: int, stop: int) -> list:
    """The step graph's tensor inputs and tables for frames [start, stop) (state excluded)."""
    from rehyat_compile.stream import _chunk
    plan = runner.plan(*args, **kwargs)
    program = plan.program(stop - start)
    inputs = [x for x in _chunk(plan.flat, program.input_dims, start, stop) if isinstance(x, torch.Tensor)]
    return inputs + list(_chunk(runner._tables(program, plan.flat), program.table_dims, start, stop))


@pytest.mark.slow
def test_converted_wan21_streaming_aarch64_build_runs_two_chunks_under_qemu_and_matches_the_stream(
        tmp_path, emulation):
    # Chunk 0 from the empty state, then chunk 1 from the state the aarch64 step returned: the
    # carried state is what streaming adds, so it must come back from the emulated run intact.
    hybrid, args, kwargs = _tiny_wan()
    art = rc.build(hybrid, args, kwargs, target="aarch64", out_dir=tmp_path / "wan-step", streaming=True)
    assert art.emulated == "qemu-aarch64", art.reason
    runner = rc.stream(hybrid)
    graph, example = runner.step_module(*args, **kwargs)
    n_state = len(graph.state_names)
    chunk = graph.chunk_frames
    second = _chunk_inputs(runner, args, kwargs, chunk, 2 * chunk)
    with torch.no_grad():
        want0 = graph(*example)
        want1 = graph(*second, *want0[-n_state:])
    got0 = art(*example)
    got1 = art(*second, *got0[-n_state:])
    assert len(got0) == len(want0) and len(got1) == len(want1)
    for got, want in zip((*got0, *got1), (*want0, *want1)):
        torch.testing.assert_close(got, want, atol=WAN_TOL, rtol=WAN_TOL)
