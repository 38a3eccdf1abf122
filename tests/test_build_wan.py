"""The converted tiny diffusers Wan2.1 (5 latent frames, Tc=2, To=1) through rc.build.

Every target is built by ``scripts/build_all_targets.py`` (minutes on 2 cores); the suite keeps
what runs here: CPU (LLVM) and adreno-vulkan (IREE on lavapipe) builds against the converted model
in PyTorch, every Adreno OpenCL kernel on PoCL and every kernel as Hexagon v66 code under
qemu-hexagon against x86 (parallel and step graphs); aarch64 under qemu is tests/test_aarch64_qemu.py.
"""
from __future__ import annotations

import pytest
import torch

import rehyat_compile as rc

pytest.importorskip("tvm")
pytest.importorskip("diffusers")

from models import converted_wan_t2v  # noqa: E402

WAN_TOL = 1e-4  # fp32, output magnitude ~2: LLVM vs eager reassociation


@pytest.mark.slow
def test_converted_wan21_cpu_build_matches_pytorch_and_records_symbolic_cost(tmp_path):
    hybrid, args, kwargs = converted_wan_t2v()
    with torch.no_grad():
        ref = hybrid(*args, **kwargs)
    art = rc.build(hybrid, args, kwargs, target="cpu", out_dir=tmp_path / "wan")
    out = art(*args, **kwargs)
    assert isinstance(out, tuple) and len(out) == len(ref)
    torch.testing.assert_close(out[0], ref[0], atol=WAN_TOL, rtol=WAN_TOL)
    names = [s["name"] for s in art.manifest["entries"]["main"]["inputs"]]
    assert names == ["args[0]", "timestep", "encoder_hidden_states"]  # HybridModel.forward(*args, **kwargs)
    assert "T" in art.manifest["cost"].get("flops", "")  # symbolic in latent frames


@pytest.mark.slow
def test_converted_wan21_streaming_step_graph_builds_and_matches_the_eager_step(tmp_path):
    hybrid, args, kwargs = converted_wan_t2v()
    art = rc.build(hybrid, args, kwargs, target="cpu", out_dir=tmp_path / "wan-step", streaming=True)
    step = art.manifest["entries"]["step"]
    assert sum(s["role"] == "state" for s in step["inputs"]) == sum(s["role"] == "state" for s in step["outputs"]) > 0
    graph, example = rc.stream(hybrid).step_module(*args, **kwargs)
    with torch.no_grad():
        expected = graph(*example)
    for got, want in zip(art(*example), expected):
        torch.testing.assert_close(got, want, atol=WAN_TOL, rtol=WAN_TOL)
    # the whole video through the loaded artifact, tables and states fed for the user: 5 frames at Tc=2
    # run step, step, step_last
    assert "step_last" in art.manifest["entries"]
    loaded = rc.load(tmp_path / "wan-step")
    with torch.no_grad():
        want = rc.stream(hybrid)(*args, **kwargs)[0]
    torch.testing.assert_close(loaded.stream(*args, **kwargs)[0], want, atol=WAN_TOL, rtol=WAN_TOL)
    longer = (torch.cat([args[0], args[0][:, :, :2]], dim=2),) + tuple(args[1:])
    with pytest.raises(ValueError, match="computed for 5 latent frames"):
        loaded.stream(*longer, **kwargs)


def _vulkan_build(hybrid, args, kwargs, out_dir, **build):
    pytest.importorskip("iree.compiler")
    art = rc.build(hybrid, args, kwargs, target="adreno-vulkan", out_dir=out_dir, **build)
    if not art.runnable:
        pytest.skip(art.reason)
    return art


@pytest.mark.slow
def test_converted_wan21_adreno_vulkan_build_matches_pytorch_on_lavapipe(tmp_path):
    # Was 0.27 off: IREE's 64-wide subgroup reductions on lavapipe's 8-wide subgroups (backends/iree.py).
    hybrid, args, kwargs = converted_wan_t2v()
    with torch.no_grad():
        ref = hybrid(*args, **kwargs)
    art = _vulkan_build(hybrid, args, kwargs, tmp_path / "wan-vk")
    torch.testing.assert_close(art(*args, **kwargs)[0], ref[0], atol=WAN_TOL, rtol=WAN_TOL)


@pytest.mark.slow
def test_converted_wan21_adreno_vulkan_step_graph_carries_its_state_across_two_chunks(tmp_path):
    # Did not compile: the bool overlap_valid state became i8 buffers IREE's adreno target cannot lower.
    hybrid, args, kwargs = converted_wan_t2v()
    art = _vulkan_build(hybrid, args, kwargs, tmp_path / "wan-vk-step", streaming=True)
    step = art.manifest["entries"]["step"]
    states = [s for s in step["inputs"] if s["role"] == "state"]
    assert any(s["dtype"] == "bool" for s in states)  # the manifest says bool; the vmfb carries int32
    graph, example = rc.stream(hybrid).step_module(*args, **kwargs)
    chunk = example[:len(example) - len(states)]
    got_state, want_state = example[len(chunk):], example[len(chunk):]
    for _ in range(2):  # first chunk from the initial state, then the next through the new state
        got = art(*chunk, *got_state)
        with torch.no_grad():
            want = graph(*chunk, *want_state)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, atol=WAN_TOL, rtol=WAN_TOL)
        got_state, want_state = got[len(got) - len(states):], want[len(want) - len(states):]
    assert bool(want_state[[s["dtype"] for s in states].index("bool")].any())  # the overlap is valid after a chunk


@pytest.mark.slow
def test_converted_wan21_kernels_run_on_qemu_hexagon_v66_and_match_x86():
    # The parallel graph and the streaming step graph (rc.build's entries), each distinct kernel
    # once: one Hexagon build, one link, one qemu-hexagon run. Tolerance: hexagon_check.TOLERANCE.
    from rehyat_compile.backends import hexagon_check, verify
    from rehyat_compile.backends.tvm import relax_module
    from rehyat_compile.build import _entries
    try:
        hexagon_check.zig_cc(), hexagon_check.qemu_hexagon()
    except verify.ToolMissing as missing:
        pytest.skip(str(missing))
    hybrid, args, kwargs = converted_wan_t2v()
    flats = [_entries(hybrid, args, kwargs, False)[0]["main"], _entries(hybrid, args, kwargs, True)[0]["step"]]
    results = hexagon_check.check_on_qemu(*[relax_module(f) for f in flats])
    assert len(results) > 100 and all(hexagon_check.matches(r) for r in results), hexagon_check.summary(results)


@pytest.mark.slow
def test_converted_wan21_adreno_opencl_kernels_parallel_and_step_run_on_pocl_and_match_x86():
    # Every OpenCL kernel of the Adreno build of both graphs (parallel and streaming step) on PoCL
    # against the same kernel on x86; tolerance 1e-4 absolute on N(0, 1) inputs (test_targets.py).
    pytest.importorskip("pyopencl")
    from rehyat_compile.backends import opencl_check
    from rehyat_compile.backends.tvm import relax_module
    from rehyat_compile.build import _entries
    from test_targets import _assert_every_kernel_matches
    try:
        opencl_check.opencl_context()
    except Exception as err:  # no ICD loader or no platform
        pytest.skip(f"no OpenCL platform: {err}")
    hybrid, args, kwargs = converted_wan_t2v()
    for streaming, name in ((False, "main"), (True, "step")):  # the short last chunk's graph has the same kernels
        flat = _entries(hybrid, args, kwargs, streaming)[0][name]
        _assert_every_kernel_matches(opencl_check.check_kernels(relax_module(flat)))
