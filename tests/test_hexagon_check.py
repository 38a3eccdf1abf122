"""Hexagon kernels built for v66 run under qemu-hexagon and match the same kernels on x86.

Tolerance: ``hexagon_check.TOLERANCE`` = 1e-5 of max(1, largest |x86 value|) on N(0, 1) inputs
(fp32; musl libm vs LLVM/glibc on x86, summation order of vectorised reductions). Every kernel
must run: no skips.
"""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from rehyat_compile.backends import hexagon_check, verify  # noqa: E402

from blocks import HybridAttentionOnly  # noqa: E402


def _toolchain_or_skip():
    try:
        hexagon_check.zig_cc(), hexagon_check.qemu_hexagon()
    except verify.ToolMissing as missing:
        pytest.skip(str(missing))


def _exp_kernel(factor: float):
    from tvm import te
    a = te.placeholder((40,), "float32", name="a")
    b = te.compute((40,), lambda i: te.exp(a[i]) * factor, name="b")
    return te.create_prim_func([a, b])


def _relax(model, args, kwargs=None):
    from rehyat_compile.backends.portable import flat_program, portable_program
    from rehyat_compile.backends.tvm import relax_module
    return relax_module(flat_program(portable_program(model, args, kwargs), args, kwargs))


def test_a_kernel_that_differs_from_its_x86_build_is_reported(monkeypatch):
    _toolchain_or_skip()
    from rehyat_compile.backends import kernel_check
    # The x86 side gets exp(a) * 3 where Hexagon runs exp(a) * 2: the check must see it.
    monkeypatch.setattr(hexagon_check, "reference_module",
                        lambda funcs: kernel_check.reference_module({n: _exp_kernel(3.0) for n in funcs}))
    (result,) = hexagon_check.check_functions({"exp_times": _exp_kernel(2.0)})
    assert result.status == "ok" and result.max_abs_error > 0.1 and not hexagon_check.matches(result)
    assert hexagon_check.summary([result]).startswith("0/1 kernels match")


def test_a_kernel_that_raises_on_hexagon_is_reported_failed_with_its_message(monkeypatch):
    _toolchain_or_skip()
    # Float buffers announced as unsigned ints: the kernel's own argument check must refuse them.
    monkeypatch.setitem(hexagon_check.DL_CODES, "f", 1)
    (result,) = hexagon_check.check_functions({"exp_times": _exp_kernel(2.0)})
    assert result.status == "failed" and "dtype" in result.reason and not hexagon_check.matches(result)


def test_symbolic_shapes_are_skipped_with_a_reason():
    from tvm import te
    n = te.var("n", "int64")
    c = te.placeholder((n,), "float32", name="c")
    symbolic = te.create_prim_func([c, te.compute((n,), lambda i: c[i] + 1, name="d")])
    kept, skipped = hexagon_check.checkable({"dynamic": symbolic, "static": _exp_kernel(1.0)})
    assert list(kept) == ["static"]
    assert [(s.function, s.status, s.reason) for s in skipped] == [("dynamic", "skipped", "symbolic buffer shape")]


@pytest.mark.slow
def test_attention_and_hybrid_block_kernels_run_on_qemu_hexagon_v66_and_match_x86(block_x):
    # Both modules in one check (their shared kernels once): one Hexagon build, one qemu run.
    _toolchain_or_skip()
    block, x, _ = block_x
    attention, whole = _relax(HybridAttentionOnly().eval(), (x,)), _relax(block, (x,))
    results = hexagon_check.check_on_qemu(attention, whole)
    assert all(hexagon_check.matches(r) for r in results), hexagon_check.summary(results)
    assert len(results) >= 50  # projections, phi maps, chunked softmax and linear parts, norms, FFN
    assert any("layer_norm" in r.function for r in results) and any("softmax" in r.function for r in results)
    assert hexagon_check.summary(results).startswith(f"{len(results)}/{len(results)} kernels match")
