"""The one table of build targets: what each target is, which backends lower to it, and how.

A target names a device; a backend names the compiler that lowers to it. The first backend of a
target is its default. TVM targets are TVM 0.27 JSON dicts or tags (docs/backends.md: strings such as
``"opencl -device=adreno"`` are rejected).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

BACKENDS = ("tvm", "mlir", "iree", "onnx", "qnn")


class NotRunnableHere(RuntimeError):
    """A valid artifact whose device (or runtime) is not available on this machine."""


@dataclass(frozen=True)
class Target:
    """One build target. ``tvm_device``/``tvm_host``: TVM target of the kernels and of the host
    code that launches them (None: a CPU target compiled as its own host). ``mobile``: a device
    where the recurrent step graph (constant memory) is the natural build."""

    name: str
    description: str
    backends: tuple[str, ...]
    mobile: bool
    tvm_device: object = None
    tvm_host: object = None
    options: dict = field(default_factory=dict)

    @property
    def default_backend(self) -> str:
        return self.backends[0]


AARCH64_LINUX = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}


@dataclass(frozen=True)
class HtpSoc:
    """A Snapdragon SoC as QNN's HTP backend names it: ``soc_model`` id and HTP architecture
    (``soc_model`` / ``htp_arch`` provider options; ids from QNN's SoC table, e.g. ExecuTorch's
    ``backends/qualcomm`` and LiteRT's ``vendors/qualcomm/core/schema/soc_table.h``)."""

    name: str
    product: str
    soc_model: int
    htp_arch: int


HTP_SOCS: dict[str, HtpSoc] = {s.name: s for s in (
    HtpSoc("sm8550", "Snapdragon 8 Gen 2", 43, 73),
    HtpSoc("sm8650", "Snapdragon 8 Gen 3", 57, 75),
    HtpSoc("sm8750", "Snapdragon 8 Elite", 69, 79),
)}
HTP_PRECISIONS = ("fp16", "w8a16")  # w8a16: 8-bit weights, 16-bit activations (QDQ, backends/qnn.py)

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("cpu", "x86-64 CPU through LLVM (runs here)", ("tvm", "mlir"), mobile=False,
           tvm_device={"kind": "llvm"}),
    Target("cuda", "NVIDIA GPU: CUDA C, PTX via NVRTC, fatbin .so where nvcc is present",
           ("tvm",), mobile=False, tvm_device={"kind": "cuda", "arch": "sm_90"}, tvm_host={"kind": "llvm"},
           options={"archs": ("sm_80", "sm_90"), "fatbin": True}),
    Target("adreno", "Qualcomm Adreno GPU: OpenCL C kernels, aarch64 Linux/Android host .so",
           ("tvm",), mobile=True, tvm_device="qcom/adreno-opencl", tvm_host=AARCH64_LINUX),
    Target("adreno-vulkan", "Qualcomm Adreno GPU through Vulkan/SPIR-V: IREE .vmfb",
           ("iree",), mobile=True, options={"iree_vulkan_target": "adreno", "subgroup_ops": False}),
    Target("hexagon", "Qualcomm Hexagon DSP with HVX: assembly, .o, .so per version",
           ("tvm",), mobile=True, tvm_device="qcom/hexagon-v75",
           options={"versions": ("v68", "v73", "v75")}),
    Target("aarch64", "64-bit Arm CPU (Linux): host .so", ("tvm",), mobile=True, tvm_device=AARCH64_LINUX),
    Target("onnx", "ONNX model (weights inside), runs on ONNX Runtime's CPU provider", ("onnx",), mobile=False),
    Target("qnn-htp", "Qualcomm Hexagon NPU (HTP) through ONNX Runtime's QNN EP: ONNX, EPContext ONNX + QNN "
           "context binary per SoC; runs on QNN's HTP simulator here", ("qnn",), mobile=True,
           options={"soc": tuple(HTP_SOCS), "precision": "fp16"}),
)}

def with_options(spec: Target, options: dict | None) -> Target:
    """``spec`` with some of its options replaced; ValueError naming unknown option keys."""
    if not options:
        return spec
    if not isinstance(options, dict):
        raise TypeError(f"target_options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"target_options for {spec.name!r} take keys {sorted(spec.options) or '(none)'}, "
                         f"got {unknown}")
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in {**spec.options, **options}.items()}
    return replace(spec, options=merged)


# The API names the MLIR path for adreno-vulkan "mlir": torch-mlir imports, IREE compiles.
BACKEND_ALIASES = {("adreno-vulkan", "mlir"): "iree"}


def resolve(target: str, backend: str | None) -> tuple[Target, str]:
    """(Target, backend name) for a user's choice; ValueError listing the valid ones otherwise."""
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    spec = TARGETS[target]
    if backend is None:
        return spec, spec.default_backend
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} (or None for the target's default), "
                         f"got {backend!r}")
    backend = BACKEND_ALIASES.get((target, backend), backend)
    if backend not in spec.backends:
        raise ValueError(f"target {target!r} is built by backend {' or '.join(map(repr, spec.backends))}, "
                         f"not {backend!r}")
    return spec, backend
