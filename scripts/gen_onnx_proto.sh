#!/usr/bin/env bash
# Regenerate src/onnx/pb/onnx.rs from schemas/onnx.proto (ONNX IR version 14, copied from the
# PyPI wheel onnx==1.23.2, file onnx/onnx.proto). Needs protoc (Debian: protobuf-compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --manifest-path tools/protogen/Cargo.toml --target-dir target/protogen
echo "regenerated src/onnx/pb/onnx.rs" >&2
