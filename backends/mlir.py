"""MLIR backend: torch-mlir's FX importer -> linalg on tensors -> loops -> LLVM dialect, run by
MLIR's ExecutionEngine (CPU) and written as an object file.

Calling convention of the compiled ``main``: results become trailing out-parameters
(``buffer-results-to-out-params``), so the C interface takes (weights..., inputs..., outputs...)
as ranked memref descriptors and returns nothing.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .portable import FlatProgram
from .targets import NotRunnableHere, Target

# linalg on tensors -> LLVM dialect on the host CPU. memref.copy becomes linalg.copy (torch-mlir's
# refback-munge-memref-copy) so strided copies need no runtime library (memrefCopy).
LLVM_PIPELINE = ",".join([
    "func.func(linalg-generalize-named-ops)",
    "func.func(linalg-fuse-elementwise-ops)",
    "one-shot-bufferize{bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map}",
    "buffer-results-to-out-params{modify-public-functions}",
    "func.func(refback-munge-memref-copy)",
    "func.func(buffer-hoisting)",
    "buffer-deallocation-pipeline",
    "func.func(convert-linalg-to-loops)",
    "lower-affine",
    "convert-scf-to-cf",
    "expand-strided-metadata",
    "lower-affine",
    "finalize-memref-to-llvm",
    "convert-math-to-llvm",
    "convert-math-to-libm",
    "convert-arith-to-llvm",
    "convert-index-to-llvm",
    "convert-func-to-llvm",
    "convert-cf-to-llvm",
    "reconcile-unrealized-casts",
])


def versions() -> dict:
    from importlib.metadata import version
    return {"torch_mlir": version("torch-mlir")}


def linalg_module(flat: FlatProgram):
    """torch-mlir linalg-on-tensors module of ``flat`` (function ``main``)."""
    from torch_mlir import fx
    return fx.export_and_import(flat.program, output_type="linalg-on-tensors", func_name="main")


def lower_to_llvm(linalg_text: str):
    """Parse linalg text into a fresh context and lower it to the LLVM dialect (C interface on)."""
    from torch_mlir import ir, passmanager
    context = ir.Context()
    module = ir.Module.parse(linalg_text, context)
    with context:
        for op in module.body.operations:
            if op.operation.name == "func.func":
                op.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
        passmanager.PassManager.parse(f"builtin.module({LLVM_PIPELINE})").run(module.operation)
    return module


def build_entry(flat: FlatProgram, spec: Target, out_dir: Path, name: str) -> dict:
    """Write ``name.linalg.mlir`` (portable input), ``name.llvm.mlir`` and ``name.o``."""
    from torch_mlir.execution_engine import ExecutionEngine
    linalg = str(linalg_module(flat))
    (out_dir / f"{name}.linalg.mlir").write_text(linalg)
    llvm = lower_to_llvm(linalg)
    (out_dir / f"{name}.llvm.mlir").write_text(str(llvm))
    engine = ExecutionEngine(llvm, opt_level=2)
    engine.dump_to_object_file(str(out_dir / f"{name}.o"))
    return {"linalg_ir": f"{name}.linalg.mlir", "llvm_ir": f"{name}.llvm.mlir", "object": f"{name}.o"}


def load_entry(out_dir: Path, spec: Target, files: dict):
    """Callable (weights + inputs as numpy) -> outputs, JIT-compiled from the saved LLVM dialect."""
    if spec.name != "cpu":
        raise NotRunnableHere(f"MLIR build for {spec.name!r} does not run on this machine")
    from torch_mlir import ir
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.runtime import get_ranked_memref_descriptor
    context = ir.Context()
    module = ir.Module.parse((out_dir / files["llvm_ir"]).read_text(), context)
    engine = ExecutionEngine(module, opt_level=2)
    out_shapes = _result_types((out_dir / files["linalg_ir"]).read_text())

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        outs = [np.empty(shape, dtype) for shape, dtype in out_shapes]
        descriptors = [get_ranked_memref_descriptor(np.ascontiguousarray(a)) for a in arrays + outs]
        engine.invoke("main", *[ctypes.pointer(ctypes.pointer(d)) for d in descriptors])
        return outs
    return run


MLIR_DTYPES = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "i64": np.int64, "i32": np.int32,
               "i1": np.bool_}


def _result_types(linalg_text: str) -> list[tuple[tuple[int, ...], type]]:
    """Shapes and dtypes of ``main``'s results, read from its signature in the linalg text."""
    from torch_mlir import ir
    context = ir.Context()
    module = ir.Module.parse(linalg_text, context)
    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == "main":
            results = ir.FunctionType(ir.TypeAttr(op.attributes["function_type"]).value).results
            return [(tuple(ir.RankedTensorType(t).shape), MLIR_DTYPES[str(ir.RankedTensorType(t).element_type)])
                    for t in results]
    raise ValueError("linalg module has no function 'main'")
