"""Shared pieces of the per-kernel device checks (``opencl_check`` on PoCL, ``hexagon_check``
under qemu-hexagon): each TIR function runs on the device and, built for x86 by TVM, in this
process, on the same random inputs; every parameter buffer is then compared.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KernelCheck:
    """One TIR function: 'ok' (errors set), 'skipped' or 'failed' with the reason.
    ``max_abs_value``: the largest |value| of the reference's float buffers (error scale)."""

    function: str
    status: str
    max_abs_error: float = float("nan")
    kernels: int = 0
    reason: str = ""
    max_abs_value: float = float("nan")

    @property
    def relative_error(self) -> float:
        """max_abs_error / max(1, max_abs_value): fp32 rounding grows with the values' size."""
        return self.max_abs_error / max(1.0, self.max_abs_value)


def prim_funcs(mod) -> dict:
    """{name: PrimFunc} of an IRModule."""
    import tvm
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def params(func) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, static shape, dtype) of each buffer parameter, names made unique (they key the
    input arrays); TypeError for a symbolic dimension."""
    specs, seen = [], set()
    for p in func.params:
        name = str(p) if str(p) not in seen else f"{p}#{len(specs)}"
        seen.add(name)
        specs.append((name, tuple(int(d) for d in p.shape), str(p.dtype)))
    return specs


def random_inputs(params, rng) -> dict[str, np.ndarray]:
    """An array per parameter: floats N(0, 1), masks 0/1, integers 0..3 (valid indices into any
    axis of length >= 4, which covers the gathers and slices of these models)."""
    arrays = {}
    for name, shape, dtype in params:
        if dtype.startswith("float"):
            arrays[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            arrays[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            arrays[name] = rng.integers(0, 4, shape).astype(dtype)
    return arrays


def reference_module(funcs: dict):
    """All ``funcs`` built for x86 (``llvm``) in one go: name -> callable on tvm tensors."""
    import tvm
    cpu = tvm.target.Target("llvm")
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n).with_attr("target", cpu) for n, f in funcs.items()})
    return tvm.tirx.build(mod, target=cpu)


def run_reference(fn, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every parameter buffer after calling the x86 build ``fn`` on copies of ``arrays``."""
    import tvm
    tensors = [tvm.runtime.tensor(np.array(a, order="C")) for a in arrays.values()]  # keeps 0-d arrays 0-d
    fn(*tensors)
    return [t.numpy() for t in tensors]


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """(largest |got - want| over float buffers, inf when an integer or bool buffer differs;
    largest |want| over float buffers)."""
    worst, scale = 0.0, 0.0
    for g, w in zip(got, want):
        if w.dtype.kind == "f":
            if w.size:
                worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w))))
                scale = max(scale, float(np.max(np.abs(w))))
        elif not np.array_equal(g, w):
            worst = float("inf")
    return worst, scale
