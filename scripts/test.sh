#!/usr/bin/env bash
# The test command: fetch the pinned real components (cached in .cache/), check that the CUDA
# build compiles (ONNX Runtime's CUDA provider, and candle's CUDA training with the CUDA 13.0
# compiler from PyPI: scripts/build-cuda.sh check), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch.sh
cargo check --locked --quiet --features cuda --all-targets
scripts/build-cuda.sh check
cargo test --locked "$@"
