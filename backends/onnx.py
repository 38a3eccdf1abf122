"""ONNX backend: the portable program as an ONNX model, run by ONNX Runtime's CPU provider.

``torch.onnx.export(program, dynamo=True)`` translates the aten graph (``backends/portable.py``); the
weights, graph inputs of the flat program, become initializers so the model is self-contained
(what an Android app with ONNX Runtime, or a Qualcomm AI Hub compile job, takes). The model's
inputs are then the flat program's inputs, in order. ``backends/qnn.py`` builds on this file.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from .portable import FlatProgram
from .targets import Target

OPSET = 18  # torch.onnx's default in torch 2.13; QNN EP 2.7 takes it


def versions() -> dict:
    from importlib.metadata import version
    return {name: version(name) for name in ("onnx", "onnxscript", "onnxruntime")}


def export_onnx(flat: FlatProgram):
    """``onnx.ModelProto`` of ``flat.program`` with the weights as initializers; its inputs are
    ``flat.inputs`` and its outputs ``flat.outputs``, in order (named after their specs)."""
    import torch
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        exported = torch.onnx.export(flat.program, (), dynamo=True, optimize=False, opset_version=OPSET,
                                     verbose=False)
    model = exported.model_proto
    weights = list(flat.weights.values())
    graph_inputs = list(model.graph.input)
    if len(graph_inputs) != len(weights) + len(flat.inputs):
        raise RuntimeError(f"ONNX export has {len(graph_inputs)} inputs, expected {len(weights)} weights + "
                           f"{len(flat.inputs)} inputs")
    _inputs_as_initializers(model, graph_inputs[:len(weights)], weights)
    _rename_io(model, [s.name for s in flat.inputs], [s.name for s in flat.outputs])
    return _folded(model)


def _folded(model):
    """``model`` with constant subgraphs folded, by ONNX Runtime's basic graph optimisations
    (constant folding, redundant-node elimination; standard ONNX ops only, unlike the extended
    levels): the exporter leaves ``Constant``/``Cast``/``Expand`` chains (4,000 nodes -> ~740 on the
    tiny Wan2.1), and a QDQ quantiser would see a computed ``ones`` LayerNorm scale as an activation,
    which QNN refuses. (onnxscript's optimizer does the same in 15 s per graph; this takes 0.3 s.)"""
    import tempfile

    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        source, folded = Path(tmp) / "exported.onnx", Path(tmp) / "folded.onnx"
        onnx.save_model(model, str(source))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load_model(str(folded))


def _inputs_as_initializers(model, inputs, tensors) -> None:
    """Graph inputs ``inputs`` become initializers holding ``tensors``."""
    from onnx import numpy_helper
    for spec, tensor in zip(inputs, tensors):
        model.graph.input.remove(spec)
        model.graph.initializer.append(numpy_helper.from_array(tensor.detach().cpu().numpy(), spec.name))


def _rename_io(model, input_names: list[str], output_names: list[str]) -> None:
    """Graph inputs and outputs renamed (every use follows); names are the manifest's."""
    renames = {}
    for value, name in zip([*model.graph.input, *model.graph.output], [*input_names, *output_names]):
        if value.name in renames:  # an output that is directly an input keeps the input's name
            continue
        renames[value.name] = name
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in [*model.graph.input, *model.graph.output]:
        value.name = renames.get(value.name, value.name)


def save(model, path: Path) -> None:
    import onnx
    onnx.save_model(model, str(path))


def op_counts(model) -> dict[str, int]:
    """{ONNX op type: node count} of ``model`` (a ModelProto or a path)."""
    import onnx
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def build_entry(flat: FlatProgram, spec: Target, out_dir: Path, name: str) -> dict:
    """``<name>.onnx`` (weights inside)."""
    save(export_onnx(flat), out_dir / f"{name}.onnx")
    return {"onnx": f"{name}.onnx"}


class SessionRunner:
    """``runner(arrays) -> outputs`` for an ONNX Runtime session: ``arrays`` are rc.load's
    (weights..., inputs...); the weights are inside the model, so only the last ``len(inputs)``
    are fed."""

    def __init__(self, session, emulator: str | None = None):
        self.session, self.emulator = session, emulator
        self.names = [i.name for i in session.get_inputs()]

    def __call__(self, arrays):
        feed = dict(zip(self.names, [np.ascontiguousarray(a) for a in arrays[len(arrays) - len(self.names):]]))
        return self.session.run(None, feed)


def load_entry(out_dir: Path, spec: Target, files: dict):
    """An ONNX Runtime CPU session of the entry's model."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out_dir / files["onnx"]), options, providers=["CPUExecutionProvider"])
    return SessionRunner(session)
