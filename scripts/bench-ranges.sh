#!/usr/bin/env bash
# Runs the throughput bench N times (default 3) and prints, for every table row and ratio
# line, the range of its first number over the runs: one run's figures move with this
# machine's load (PyTorch's own 224x224 step has read 14.6 and 21.9 images/s on different
# days), so the README quotes ranges. Extra arguments go to cargo bench's environment, e.g.
#   MTPACK_BENCH_PYTORCH=$(scripts/torch-venv.sh) MTPACK_BENCH_STEPS=16 scripts/bench-ranges.sh 3
# Each run's full output is kept in target/bench-ranges/run-K.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
out=target/bench-ranges
mkdir -p "$out"
cargo bench --locked --bench train_throughput --no-run >&2
for k in $(seq 1 "$runs"); do
    echo "run $k of $runs" >&2
    cargo bench --locked --bench train_throughput > "$out/run-$k.txt"
done
python3 - "$out" "$runs" <<'PY'
import re, sys
out, runs = sys.argv[1], int(sys.argv[2])
rows, order = {}, []
for k in range(1, runs + 1):
    section = ""
    for line in open(f"{out}/run-{k}.txt"):
        line = line.rstrip("\n")
        if line and not line.startswith("|") and ":" not in line:
            section = line[:60]
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else None
        if cells and len(cells) > 1 and re.match(r"^[\d.]+$", cells[1].replace(" ", "")):
            key, value = (section, cells[0]), float(cells[1].replace(" ", ""))
        elif m := re.match(r"^(.*?):\s*([\d.]+)x$", line):
            key, value = (section, m.group(1)), float(m.group(2))
        else:
            continue
        if key not in rows:
            rows[key] = []
            order.append(key)
        rows[key].append(value)
last = None
for key in order:
    if key[0] != last:
        print(f"\n{key[0]}")
        last = key[0]
    v = rows[key]
    print(f"  {key[1]}: {min(v):g} - {max(v):g}  ({len(v)} runs: {', '.join(f'{x:g}' for x in v)})")
PY
