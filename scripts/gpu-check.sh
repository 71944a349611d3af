#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, its CUDA 13 driver and PyTorch (CUDA 13)
# but no Rust toolchain: everything mtpack needs comes from .cache/gpu-kit, which
# scripts/build-cuda.sh builds on any machine. In under 8 minutes on an H200 it runs
#   1. parity: MobileNetV2's outputs and 20 training steps (every layer and BatchNorm
#      training on batch statistics) on CUDA against the CPU's kernels, both measured from a
#      float64 run (`mtpack check-device`); the same for PP-LCNet (not a MobileNet) and the
#      committed tiny ViT (LayerNorm, attention, GELU);
#   2. the training step at 3x224x224, batch 64, on CUDA: mtpack against PyTorch on the same
#      GPU in the same run;
#   3. a small `adapt` on CUDA, then `export` and `verify` of its artifact;
# prints one table and writes every command's output to LOG_DIR.
#
# Usage: scripts/gpu-check.sh LOG_DIR
# MTPACK_CHECK_DEVICE=cpu runs the same steps on the CPU (candle's portable ops there): a dry
# run of the script itself where no GPU is (PyTorch's step then fails, and says so).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${1:?usage: scripts/gpu-check.sh LOG_DIR}"
mkdir -p "$LOG"
LOG="$(cd "$LOG" && pwd)"
KIT="$PWD/.cache/gpu-kit"
PY="${PYTHON:-python3}"
[ -f "$KIT/mtpack.xz" ] || { echo "error: $KIT/mtpack.xz is missing: run scripts/build-cuda.sh first" >&2; exit 2; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Python's lzma rather than xz(1), which a GPU image may lack; Python is there with PyTorch.
unxz() { "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
unxz "$KIT/mtpack.xz" "$WORK/mtpack" && chmod +x "$WORK/mtpack"
for f in "$KIT"/libonnxruntime.so.*.xz; do unxz "$f" "$WORK/$(basename "${f%.xz}")"; done
cp "$KIT/mobilenetv2_imagenet.onnx" "$KIT/pplcnet_orientation.onnx" "$WORK/"

# The CUDA libraries candle loads (cuBLAS, cuBLASLt, cuRAND) from PyTorch's CUDA wheels.
NVLIBS="$("$PY" - <<'EOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = {os.path.dirname(f) for r in roots for pat in ("nvidia/**/lib*.so*", "torch/lib/lib*.so*")
        for f in glob.glob(os.path.join(r, pat), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)"
export LD_LIBRARY_PATH="$WORK${NVLIBS:+:$NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
M="$WORK/mtpack"
DEVICE="${MTPACK_CHECK_DEVICE:-cuda}"
if [ "$DEVICE" = cuda ]; then
    SIZE=224 PARITY_BATCH=16 STEPS=20 RATE_BATCH=64 RATE_STEPS=20 ADAPT_SIZE=64 KERNELS=native
else
    # The dry run: the portable ops on 2 CPU cores are ~20x slower than the kernels.
    SIZE=32 PARITY_BATCH=8 STEPS=3 RATE_BATCH=8 RATE_STEPS=2 ADAPT_SIZE=32 KERNELS=portable
fi
MODEL="$WORK/mobilenetv2_imagenet.onnx"

step() { # step NAME TIMEOUT CMD...: runs CMD with its stdout in LOG/NAME.out, stderr in LOG/NAME.err
    local name="$1" limit="$2"; shift 2
    echo "== $name: $*" >&2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOG/$name.out" 2> "$LOG/$name.err"
    local rc=$?
    echo "$rc $((SECONDS - t0))" > "$LOG/$name.rc"
    echo "   exit $rc after $((SECONDS - t0)) s" >&2
    tail -n 3 "$LOG/$name.err" >&2
    return 0
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' || true
    "$M" --version
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} > "$LOG/machine.txt" 2>&1

step parity 240 "$M" check-device "$MODEL" --device "$DEVICE" --size "${SIZE}x$SIZE" --batch $PARITY_BATCH --steps $STEPS --json
step parity-pplcnet 120 "$M" check-device "$WORK/pplcnet_orientation.onnx" --device "$DEVICE" --size "${SIZE}x$SIZE" --batch $PARITY_BATCH --steps $STEPS --json
step parity-vit 60 "$M" check-device fixtures/tiny/tiny_vit.onnx --device "$DEVICE" --batch 16 --steps $STEPS --json
step rate 150 "$M" check-device "$MODEL" --device "$DEVICE" --size "${SIZE}x$SIZE" --batch $RATE_BATCH --steps 0 --rate-steps $RATE_STEPS --json
step pytorch 120 "$PY" scripts/pytorch_gpu_baseline.py "$KIT/mobilenetv2_bottle.py" $RATE_STEPS $SIZE $RATE_BATCH
DIGITS="digits=fixtures/digits/digits.safetensors:resize=${ADAPT_SIZE}x$ADAPT_SIZE:channels=3"
step adapt 150 "$M" adapt "$MODEL" --task "$DIGITS" --method finetune --epochs 1 --device "$DEVICE" --kernels $KERNELS --json -o "$WORK/pack"
step export 60 "$M" export "$WORK/pack" -o "$WORK/pack.onnx"
step verify 60 "$M" verify "$WORK/pack.onnx" --json

"$PY" - "$LOG" "$DEVICE" "$SIZE" "$RATE_BATCH" <<'EOF' | tee "$LOG/table.md"
import json, os, sys
log, device, size, batch = sys.argv[1:5]
def read(name, ext="out"):
    try:
        return open(os.path.join(log, f"{name}.{ext}")).read()
    except OSError:
        return ""
def js(name):
    text = read(name)
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}
def rc(name):
    return (read(name, "rc").split() or ["?"])[0]
machine = read("machine", "txt").splitlines()
print(f"GPU, driver, memory: {machine[0] if machine else '?'}")
print(f"PyTorch: {machine[1] if len(machine) > 1 else '?'}")
print()
print("| check | result |")
print("|---|---|")
def dist(d):
    return f"CPU float32 {d['cpu']:.2e}, {device} {d['checked']:.2e} from float64" if d else "not run"
for name, what in [("parity", "MobileNetV2"), ("parity-pplcnet", "PP-LCNet"), ("parity-vit", "tiny ViT")]:
    p = js(name)
    r = p.get("report", {})
    verdict = {"0": "pass", "1": "FAIL"}.get(rc(name), f"error (exit {rc(name)})")
    print(f"| {what} parity ({verdict}): outputs | {dist(r.get('forward'))} |")
    print(f"| {what}: {r.get('parameters', '?')} parameters after step 1 | {dist(r.get('first_step'))} |")
    print(f"| {what}: after step {r.get('steps', '?')} | {dist(r.get('last_step'))} |")
rate = js("rate").get("report", {}).get("images_per_second")
torch = js("pytorch")
t, ts = torch.get("train_images_per_second"), torch.get("train_images_per_second_strict_f32")
print(f"| training step 3x{size}x{size} batch {batch}, mtpack {device} (exit {rc('rate')}) | {rate:.1f} images/s |" if rate else f"| training step, mtpack {device} | failed (exit {rc('rate')}) |")
if t and ts:
    print(f"| same step, PyTorch {torch.get('torch')} default (TF32 convolutions) / strict float32 | {t:.1f} / {ts:.1f} images/s |")
    if rate:
        print(f"| mtpack / PyTorch | {rate / t:.2f}x default, {rate / ts:.2f}x strict float32 |")
else:
    print(f"| same step, PyTorch | failed (exit {rc('pytorch')}) |")
a = js("adapt")
where = next((l for l in read("adapt", "err").splitlines() if l.startswith("runs on")), "?")
print(f"| adapt on {device}, digits, 1 epoch (exit {rc('adapt')}) | accuracy {a.get('accuracy_matrix', [['?']])[-1]} |")
print(f"| where adapt ran | {where} |")
v = js("verify")
print(f"| export (exit {rc('export')}) + verify (exit {rc('verify')}) | {'verified in tract and ONNX Runtime' if rc('verify') == '0' else 'FAILED'} |")
EOF
