#!/usr/bin/env bash
# The test command: fetch the pinned real components (cached in .cache/), check that the CUDA
# build compiles, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch.sh
cargo check --locked --quiet --features cuda --all-targets
cargo test --locked "$@"
