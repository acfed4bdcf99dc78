#!/usr/bin/env bash
# One prepared command for a session with the device machine (about 3-8 minutes on an H100):
#   bash bench/gpu.sh "$OUT"
# Runs unchanged on a CPU, where bench/gpu.py falls back to the tiny preset (tests/test_bench.py).
set -euo pipefail
out="${1:-${OUT:-bench-out}}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
PYTHONPATH="${PYTHONPATH:-}:$(cd "$(dirname "$0")/.." && pwd)" "$PY" "$(dirname "$0")/gpu.py" --out "$out" "${@:2}"
