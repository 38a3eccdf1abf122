"""IREE backend: torch-mlir linalg on tensors -> ``iree-compile`` for Vulkan/SPIR-V (``.vmfb``).

Runs here on Mesa's lavapipe (CPU Vulkan) through the ``iree-run-module`` CLI (docs/backends.md: the
Python runtime API fails on lavapipe). Strict drivers may reject the SPIR-V (``spirv-val``
flags NoSignedWrap without its extension), which lavapipe accepts.

Subgroup size. IREE's ``adreno`` description lets reductions (matmuls with K >= 64, matvecs,
softmax sums) use subgroup shuffles written for a subgroup of exactly 64 invocations, and the
runtime asks the driver for that size (``requiredSubgroupSize``). A driver that cannot provide it
(lavapipe runs 8-wide subgroups and ignores the request) adds up only part of each row: the tiny
Wan2.1 came out 0.27 off, a lone ``bmm`` [6,32,64] x [6,64,1] 20 off. By default the build removes
subgroup operations from IREE's target description, so reductions are split over threads and
shared memory and are correct at any subgroup size; ``subgroup_ops=True`` keeps IREE's tuned
kernels, which run only where the device offers 64-wide subgroups.

Booleans. A bool tensor that IREE keeps in memory (a function argument or result, the output of
a ``cat``) is an i8 buffer; IREE's adreno description has no 8-bit storage (some Adreno drivers
lack ``storageBuffer8BitAccess``), so those loads and stores are emulated on 32-bit words, and the
vectorised ones (``vector<4xi8>``) fail to lower: "functions in 'spirv.module' can only contain
spirv.* ops" (``x > 0`` returned from a function is enough). The build therefore compiles the graph
with bools in memory as int32 0/1 (:func:`bools_in_memory_as_int32`); the artifact's inputs and
outputs stay bool (``name.abi.json`` says which, and the runner converts).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import fx

from .mlir import linalg_module
from .portable import FlatProgram, _AllInputs
from .targets import NotRunnableHere, Target


def iree_tool(name: str) -> str:
    """Path of an IREE command-line tool inside the pip wheels (compiler or runtime package)."""
    import importlib.util
    for package, folder in (("iree.compiler", "_mlir_libs"), ("iree._runtime_libs", "")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / folder / name
            if candidate.exists():
                return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: pip install iree-base-compiler iree-base-runtime")
    return found


def versions() -> dict:
    from importlib.metadata import version
    return {"iree_base_compiler": version("iree-base-compiler"), "iree_base_runtime": version("iree-base-runtime")}


def _iree_compile(args: list[str]) -> str:
    """Run ``iree-compile`` with ``args``; its stdout, or RuntimeError with the first errors."""
    done = subprocess.run([iree_tool("iree-compile"), *args], capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        raise RuntimeError("iree-compile failed:\n" + "\n".join(errors[:5]) + f"\n...\n{done.stderr[-2000:]}")
    return done.stdout


_EMPTY_MODULE = "func.func @f(%x: tensor<1xf32>) -> tensor<1xf32> {\n  return %x : tensor<1xf32>\n}\n"


def vulkan_device_target(vulkan_target: str, subgroup_ops: bool) -> str:
    """IREE's own ``#hal.device.target<"vulkan", ...>`` for ``--iree-vulkan-target=vulkan_target``
    (read back from a trivial module compiled to the preprocessing phase), with the subgroup
    operations of its workgroup-processor description set to ``none`` unless ``subgroup_ops``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "empty.mlir"
        source.write_text(_EMPTY_MODULE)
        text = _iree_compile([str(source), "--iree-hal-target-device=vulkan", f"--iree-vulkan-target={vulkan_target}",
                              "--compile-to=preprocessing"])
    found = re.search(r"(#hal\.device\.target<\"vulkan\".*?>) : !hal\.device", text)
    if found is None:
        raise RuntimeError(f"iree-compile did not report a Vulkan device target for {vulkan_target!r}")
    target = found.group(1)
    return target if subgroup_ops else re.sub(r"\bsubgroup = [a-z|]+", "subgroup = none", target)


def with_device_target(linalg_text: str, device_target: str) -> str:
    """``linalg_text`` with ``hal.device.targets = [device_target]`` on its module: iree-compile
    then compiles for exactly that description (no ``--iree-hal-target-device``)."""
    from iree.compiler import ir
    with ir.Context():
        module = ir.Module.parse(linalg_text)
        module.operation.attributes["hal.device.targets"] = ir.ArrayAttr.get([ir.Attribute.parse(device_target)])
        return str(module)


# Ops that write a new bool tensor to memory from bool inputs (views and elementwise ops fuse).
_BOOL_COPIES = {torch.ops.aten.cat.default, torch.ops.aten.stack.default, torch.ops.aten.clone.default,
                torch.ops.aten.constant_pad_nd.default, torch.ops.aten.slice_scatter.default}


def _is_bool(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def bools_in_memory_as_int32(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int], list[int]]:
    """Rewrite ``gm`` in place so no bool tensor crosses memory: bool inputs arrive as int32 and
    are compared with 0 at once, bool outputs leave as int32, and the ops in ``_BOOL_COPIES`` run on
    int32 copies of their bool operands. Returns (gm, positions of bool inputs, of bool outputs)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    bool_inputs = [i for i, n in enumerate(placeholders) if _is_bool(n)]
    with graph.inserting_after(placeholders[-1]):
        for i in bool_inputs:
            node = placeholders[i]
            as_bool = graph.call_function(torch.ops.aten.ne.Scalar, (node, 0))
            node.replace_all_uses_with(as_bool, delete_user_cb=lambda user: user is not as_bool)
    for node in [n for n in graph.nodes if n.target in _BOOL_COPIES and _is_bool(n)]:
        with graph.inserting_before(node):
            node.args = fx.node.map_arg(node.args, lambda a: graph.call_function(
                torch.ops.aten._to_copy.default, (a,), {"dtype": torch.int32}) if _is_bool(a) else a)
        with graph.inserting_after(node):
            as_bool = graph.call_function(torch.ops.aten.ne.Scalar, (node, 0))
        node.replace_all_uses_with(as_bool, delete_user_cb=lambda user: user is not as_bool)
    output = next(n for n in graph.nodes if n.op == "output")
    results = list(output.args[0])
    bool_outputs = [i for i, r in enumerate(results) if _is_bool(r)]
    with graph.inserting_before(output):
        for i in bool_outputs:
            results[i] = graph.call_function(torch.ops.aten._to_copy.default, (results[i],), {"dtype": torch.int32})
    output.args = (tuple(results),)
    gm.recompile()
    return gm, bool_inputs, bool_outputs


def _without_bools_in_memory(flat: FlatProgram) -> tuple[FlatProgram, dict]:
    """``flat`` re-exported after :func:`bools_in_memory_as_int32`, and its ABI note
    ``{"bool_inputs": [...], "bool_outputs": [...]}`` (positions among weights + inputs / outputs)."""
    gm, bool_inputs, bool_outputs = bools_in_memory_as_int32(copy.deepcopy(flat.program.graph_module))
    abi = {"bool_inputs": bool_inputs, "bool_outputs": bool_outputs}
    if not bool_inputs and not bool_outputs and gm.code == flat.program.graph_module.code:
        return flat, abi
    examples = [torch.zeros(s.shape, dtype=torch.int32 if s.dtype == "bool" else getattr(torch, s.dtype))
                for s in flat.arguments]
    with torch.no_grad():
        program = torch.export.export(_AllInputs(gm), tuple(examples))
    return dataclasses.replace(flat, program=program), abi


def build_entry(flat: FlatProgram, spec: Target, out_dir: Path, name: str) -> dict:
    """Write ``name.linalg.mlir`` (the torch-mlir module iree-compile takes: the graph with bools
    in memory as int32), ``name.abi.json`` (which inputs and outputs are bool) and ``name.vmfb``
    (Vulkan SPIR-V for the target GPU; subgroup operations per the module docstring)."""
    flat, abi = _without_bools_in_memory(flat)
    (out_dir / f"{name}.abi.json").write_text(json.dumps(abi))
    source = out_dir / f"{name}.linalg.mlir"
    linalg = str(linalg_module(flat))
    source.write_text(linalg)
    target = vulkan_device_target(spec.options["iree_vulkan_target"], spec.options["subgroup_ops"])
    vmfb = out_dir / f"{name}.vmfb"
    with tempfile.TemporaryDirectory() as tmp:
        targeted = Path(tmp) / "targeted.mlir"
        targeted.write_text(with_device_target(linalg, target))
        _iree_compile([str(targeted), "-o", str(vmfb)])
    return {"linalg_ir": source.name, "vmfb": vmfb.name, "abi": f"{name}.abi.json"}


def vulkan_available() -> bool:
    """Whether a Vulkan device (lavapipe counts) answers ``iree-run-module --list_devices``."""
    try:
        done = subprocess.run([iree_tool("iree-run-module"), "--list_devices"], capture_output=True, text=True,
                              timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return "vulkan://" in done.stdout


def vulkan_subgroup_sizes() -> tuple[int, int] | None:
    """(min, max) subgroup size of the first Vulkan device from ``vulkaninfo`` (vulkan-tools), or
    None when it cannot be read."""
    tool = shutil.which("vulkaninfo")
    if tool is None:
        return None
    try:
        text = subprocess.run([tool], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return None
    low, high = re.search(r"minSubgroupSize\s*=\s*(\d+)", text), re.search(r"maxSubgroupSize\s*=\s*(\d+)", text)
    return (int(low.group(1)), int(high.group(1))) if low and high else None


SUBGROUP_OPS_SIZE = 64  # the subgroup size IREE's adreno kernels with subgroup operations are written for


def load_entry(out_dir: Path, spec: Target, files: dict):
    """Callable (weights + inputs as numpy) -> outputs through ``iree-run-module --device=vulkan``.
    NotRunnableHere without a Vulkan device, or for a ``subgroup_ops=True`` build on a device
    without 64-wide subgroups (its reductions would silently add up partial rows)."""
    if not vulkan_available():
        raise NotRunnableHere("no Vulkan device (install mesa-vulkan-drivers for lavapipe)")
    if spec.options.get("subgroup_ops"):
        sizes = vulkan_subgroup_sizes()
        if sizes is None or not sizes[0] <= SUBGROUP_OPS_SIZE <= sizes[1]:
            raise NotRunnableHere(f"built with subgroup_ops=True for {SUBGROUP_OPS_SIZE}-wide subgroups; this Vulkan "
                                  f"device offers {'unknown sizes (no vulkaninfo)' if sizes is None else '%d..%d' % sizes}")
    vmfb = out_dir / files["vmfb"]
    bool_outputs = set(json.loads((out_dir / files["abi"]).read_text())["bool_outputs"]) if "abi" in files else set()
    n_out = _count_results(out_dir / files["linalg_ir"])

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            cmd = [iree_tool("iree-run-module"), "--device=vulkan", f"--module={vmfb}", "--function=main"]
            for i, a in enumerate(arrays):
                np.save(folder / f"in{i}.npy", np.ascontiguousarray(a.astype(np.int32) if a.dtype == np.bool_ else a))
                cmd.append(f"--input=@{folder / f'in{i}.npy'}")
            cmd += [f"--output=@{folder / f'out{i}.npy'}" for i in range(n_out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"iree-run-module failed:\n{done.stderr[-4000:]}")
            outs = [np.load(folder / f"out{i}.npy") for i in range(n_out)]
            return [o != 0 if i in bool_outputs else o for i, o in enumerate(outs)]
    return run


def _count_results(linalg_path: Path) -> int:
    from .mlir import _result_types
    return len(_result_types(linalg_path.read_text()))
