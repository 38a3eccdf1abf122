#!/usr/bin/env bash
# Set up everything rehyat-compile needs on a fresh Debian machine: system packages for the
# device emulators and cross toolchains, then a virtual environment at ./.venv with the package,
# its compilers (TVM, torch-mlir, IREE, ONNX Runtime with the QNN EP) and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/install_system_deps.sh ]; then
  bash scripts/install_system_deps.sh
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first, so no dependency can pull a CUDA build.
.venv/bin/pip install -q torch==2.13.0
# compile: TVM, torch-mlir, IREE, and onnxruntime-qnn (pulls onnxruntime; QNN's HTP simulator for x86).
.venv/bin/pip install -q -e ".[compile,test]"
# The aarch64 TVM runtime (libtvm_runtime.so, libtvm_ffi.so from PyPI's aarch64 wheels of the same
# versions) and the driver that runs aarch64 builds under qemu-aarch64; cached, so a re-run is quick.
.venv/bin/python -m rehyat_compile.backends.aarch64_qemu
# zig (PyPI ziglang) builds musl and compiler-rt for hexagon once (~1.5 min on 2 cores) into its
# cache; the qemu-hexagon kernel checks then link in a second.
.venv/bin/python -m rehyat_compile.backends.hexagon_check
