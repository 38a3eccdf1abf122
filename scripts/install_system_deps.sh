#!/usr/bin/env bash
# Debian packages the device-free backend checks need (docs/backends.md "Where things come from"):
# PoCL (CPU OpenCL) for Adreno kernels, qemu-user (qemu-aarch64, qemu-hexagon) and the aarch64
# cross toolchain, LLVM 22 (TVM's LLVM major) to link/disassemble Hexagon, lavapipe + tools for IREE
# Vulkan, spirv-tools.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends \
    pocl-opencl-icd ocl-icd-opencl-dev clinfo \
    qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
    llvm-22 lld-22 clang-22 \
    mesa-vulkan-drivers vulkan-tools spirv-tools
