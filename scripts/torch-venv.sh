#!/usr/bin/env bash
# The Python environment the benches' PyTorch comparisons run in (MTPACK_BENCH_PYTORCH):
# .cache/torch-venv with PyTorch 2.15.0 (PyPI's wheel), numpy, and what the ViT baseline
# needs besides (transformers 4.x for the Dinov2 network: 5.0 renamed its attention weights;
# onnx to read the ONNX file's weights; onnxruntime for its check that both run the same network).
# Without onnx the ViT rows of `cargo bench --bench train_throughput` have no PyTorch side.
# Idempotent: an existing environment only gets what it lacks. Prints the Python to use.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/torch-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.15.0 numpy "transformers<5" onnx onnxruntime >&2
"$venv/bin/python" -c 'import torch, numpy, transformers, onnx' >&2
echo "$PWD/$venv/bin/python"
