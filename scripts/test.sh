#!/usr/bin/env bash
# The test command: fetch the pinned real components (cached in .cache/), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch.sh
cargo test --locked "$@"
