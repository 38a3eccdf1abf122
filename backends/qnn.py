"""Qualcomm HTP backend: ONNX -> ONNX Runtime's QNN execution provider -> a QNN context binary per SoC.

PyPI's ``onnxruntime-qnn`` ships QNN's HTP backend with its graph preparation for x86: a session
prepares the graph for the chosen SoC (``soc_model``, ``htp_arch``) and, with ``ep.context_enable``,
writes an EPContext ONNX model pointing at the prepared ``*_qnn.bin``. On a phone ORT + QNN EP loads
that pair; here the same pair runs on QNN's HTP simulator (x86). Steps (docs/backends.md, QNN):

1. legalise the portable program for HTP (:data:`rehyat_compile.passes.pipeline.HTP`: splits as
   slices, softmax without infinities, every tensor rank <= 5; ``HTP_QUANTIZED`` also softplus as one
   op and RMS norms as LayerNorms); a tensor still above rank 5 raises ConversionError naming it;
2. export ONNX (``backends/onnx.py``), weights as initializers;
3. ``precision``: ``fp16`` runs the fp32 model in fp16 on HTP (``enable_htp_fp16_precision``);
   ``w8a16`` is a QDQ model from ``onnxruntime.quantization``'s QNN tooling (uint8 weights, uint16
   activations) calibrated on ``flat.calibration`` (the model's own example inputs; for a step graph
   every chunk of the example video, states fed through);
4. per SoC, prepare with every node's placement recorded: a node QNN does not take raises
   ConversionError naming it and its op (never left on the CPU); the context is then written.

``load_entry`` runs the EPContext model with CPU fallback disabled (``session.disable_cpu_ep_fallback``).
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np

from ..errors import ConversionError
from . import onnx as onnx_backend
from .portable import FlatProgram
from .targets import HTP_PRECISIONS, HTP_SOCS, HtpSoc, NotRunnableHere, Target

EP = "QNNExecutionProvider"
SIMULATOR = "qnn-htp-simulator"


def versions() -> dict:
    from importlib.metadata import version
    return {**onnx_backend.versions(), "onnxruntime_qnn": version("onnxruntime-qnn")}


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

def socs_of(spec: Target) -> list[HtpSoc]:
    """The SoCs of a qnn-htp target's ``soc`` option (a name or a sequence of names); ValueError
    listing the valid ones otherwise."""
    chosen = spec.options["soc"]
    names = [chosen] if isinstance(chosen, str) else list(chosen)
    unknown = [n for n in names if n not in HTP_SOCS]
    if unknown or not names:
        valid = ", ".join(f"{s.name!r} ({s.product}, HTP v{s.htp_arch})" for s in HTP_SOCS.values())
        raise ValueError(f"target_options['soc'] must name Snapdragon SoCs among {valid}; got {chosen!r}")
    return [HTP_SOCS[n] for n in names]


def precision_of(spec: Target) -> str:
    precision = spec.options["precision"]
    if precision not in HTP_PRECISIONS:
        raise ValueError(f"target_options['precision'] must be one of {list(HTP_PRECISIONS)}, got {precision!r}")
    return precision


def check_options(spec: Target) -> None:
    """ValueError for an unknown SoC or precision, before any work."""
    socs_of(spec), precision_of(spec)


def provider_options(soc: HtpSoc, precision: str) -> dict:
    """QNN EP options preparing for ``soc`` in ``precision``."""
    options = {"backend_type": "htp", "htp_arch": str(soc.htp_arch), "soc_model": str(soc.soc_model)}
    if precision == "fp16":
        options["enable_htp_fp16_precision"] = "1"
    else:  # the graph inputs' Quantize and outputs' Dequantize on HTP too (the default leaves them on the CPU)
        options["offload_graph_io_quantization"] = "0"
    return options


@functools.cache
def qnn_devices() -> tuple:
    """The QNN EP's devices, its plugin library registered once per process; NotRunnableHere
    without onnxruntime-qnn."""
    try:
        import onnxruntime as ort
        import onnxruntime_qnn
    except ImportError as err:
        raise NotRunnableHere(f"onnxruntime-qnn is not installed ({err}); pip install onnxruntime-qnn==2.7.0") from None
    ort.register_execution_provider_library(EP, onnxruntime_qnn.get_library_path())
    return tuple(d for d in ort.get_ep_devices() if d.ep_name == EP)


def _session_options(soc: HtpSoc, precision: str, *, fallback: bool, context: Path | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if context is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context))
        options.add_session_config_entry("ep.context_embed_mode", "0")
    options.add_provider_for_devices(list(qnn_devices()), provider_options(soc, precision))
    return options


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

def legalize(flat: FlatProgram, precision: str = "fp16") -> dict:
    """Run :data:`~rehyat_compile.passes.pipeline.HTP` (``HTP_QUANTIZED`` for w8a16) on
    ``flat.program`` in place; returns the changed-node counts per pass. ConversionError naming
    every node still above HTP's rank."""
    from ..passes import pipeline
    from ..passes.legalize_permute_rank import HTP_MAX_RANK
    from ..passes.legalize_reshape_rank import high_rank_nodes
    passes = pipeline.HTP if precision == "fp16" else pipeline.HTP_QUANTIZED
    result = pipeline.run(passes, pipeline.PassResult(flat.program))
    left = high_rank_nodes(flat.program.graph_module.graph)
    if left:
        listed = "; ".join(f"{name} ({op}, shape {list(shape)})" for name, op, shape in left[:10])
        raise ConversionError(f"QNN HTP takes tensors of rank <= {HTP_MAX_RANK}; after legalisation these nodes "
                              f"still make higher-rank tensors: {listed}")
    return dict(result.artifacts)


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader`` over example input tuples."""

    def __init__(self, names: list[str], examples: list[tuple]):
        self.feeds = iter([{n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, example)}
                           for example in examples])

    def get_next(self):
        return next(self.feeds, None)


def quantize_w8a16(model_path: Path, out_path: Path, names: list[str], examples: list[tuple]) -> None:
    """QDQ model of ``model_path`` for QNN: uint8 weights, uint16 activations, ranges calibrated
    (min-max) on ``examples``."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model
    if not examples:
        raise ValueError("w8a16 needs calibration inputs; this entry has none")
    # QNN's own preprocessing first (fuses Erf-GELU, LayerNorm spellings into single QNN ops).
    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    source = prepared if qnn_preprocess_model(str(model_path), str(prepared)) else model_path
    try:
        config = get_qnn_qdq_config(str(source), _Calibration(names, examples), activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QUInt8)
        quantize(str(source), str(out_path), config)
    finally:
        prepared.unlink(missing_ok=True)


def placements(session) -> dict[str, list[tuple[str, str]]]:
    """{execution provider: [(node name, op type)]} of a session created with
    ``session.record_ep_graph_assignment_info``."""
    placed: dict[str, list] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        placed.setdefault(subgraph.ep_name, []).extend((n.name, n.op_type) for n in subgraph.get_nodes())
    return placed


def off_htp(placed: dict) -> list[tuple[str, str]]:
    """(node name, op type) of every node not placed on the QNN EP."""
    return [node for ep, nodes in placed.items() if ep != EP for node in nodes]


def compile_context(model_path: Path, soc: HtpSoc, precision: str, context_path: Path) -> Path:
    """Prepare ``model_path`` for ``soc`` and write the EPContext model ``context_path`` and its
    context binary (returned). ConversionError naming every node QNN's HTP did not take."""
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(str(model_path), _session_options(soc, precision, fallback=True,
                                                                           context=context_path))
    except Exception as err:  # QNN refuses a graph it accepted node by node (e.g. preparation fails)
        raise ConversionError(f"QNN HTP ({soc.name}, v{soc.htp_arch}, {precision}) could not prepare "
                              f"{model_path.name}: {err}") from None
    refused = off_htp(placements(session))
    if refused:
        counts: dict[str, int] = {}
        for _, op in refused:
            counts[op] = counts.get(op, 0) + 1
        listed = ", ".join(f"{name} ({op})" for name, op in refused[:20])
        raise ConversionError(f"QNN HTP ({soc.name}, v{soc.htp_arch}, {precision}) does not take {len(refused)} "
                              f"node(s) of {model_path.name} (op types {counts}): {listed}"
                              + (" ..." if len(refused) > 20 else ""))
    binary = context_path.with_name(context_path.stem + "_qnn.bin")
    if not (context_path.is_file() and binary.is_file()):
        raise RuntimeError(f"QNN EP wrote no context for {model_path.name} ({context_path.name}, {binary.name})")
    return binary


def build_entry(flat: FlatProgram, spec: Target, out_dir: Path, name: str) -> dict:
    """``<name>.onnx`` (legalised, fp32), ``<name>.w8a16.onnx`` (QDQ) for w8a16, and per SoC
    ``<name>.<soc>.ctx.onnx`` + ``<name>.<soc>.ctx_qnn.bin``."""
    socs, precision = socs_of(spec), precision_of(spec)
    legalize(flat, precision)
    files = {"onnx": f"{name}.onnx"}
    onnx_backend.save(onnx_backend.export_onnx(flat), out_dir / files["onnx"])
    model = out_dir / files["onnx"]
    if precision == "w8a16":
        files["qdq"] = f"{name}.w8a16.onnx"
        quantize_w8a16(model, out_dir / files["qdq"], [s.name for s in flat.inputs], flat.calibration)
        model = out_dir / files["qdq"]
    for soc in socs:
        context = out_dir / f"{name}.{soc.name}.ctx.onnx"
        binary = compile_context(model, soc, precision, context)
        files[f"{soc.name}.context"], files[f"{soc.name}.binary"] = context.name, binary.name
    return files


# ---------------------------------------------------------------------------------------------
# Load: the HTP simulator
# ---------------------------------------------------------------------------------------------

def context_session(out_dir: Path, spec: Target, files: dict, soc: str | None = None):
    """ONNX Runtime session of the entry's EPContext model for ``soc`` (default: the first built),
    CPU fallback disabled: it runs on QNN's HTP (the simulator on x86)."""
    import onnxruntime as ort
    socs = socs_of(spec)
    chosen = HTP_SOCS[soc] if soc is not None else socs[0]
    if f"{chosen.name}.context" not in files:
        raise ValueError(f"this artifact has no context for {chosen.name!r}; built: {[s.name for s in socs]}")
    with contextlib.chdir(out_dir):  # the EPContext model names its binary relative to itself
        return ort.InferenceSession(files[f"{chosen.name}.context"],
                                    _session_options(chosen, precision_of(spec), fallback=False))


def load_entry(out_dir: Path, spec: Target, files: dict, soc: str | None = None):
    """A runner of the entry on the HTP simulator (``emulator`` says so)."""
    qnn_devices()
    return onnx_backend.SessionRunner(context_session(out_dir, spec, files, soc), emulator=SIMULATOR)
