#!/usr/bin/env bash
# The GPU work of the 2026-11-27 (fourth) session, about 5 minutes on an H100:
#   OUT=/path bash bench/gpu_session_c.sh
# - the tests that need CUDA (skipped on the CPU machines);
# - blind deblurring with a sparsity prior on the kernel (its entropy, BlindDeblur `sparsity`),
#   two sweeps sharing the GPU: 50 steps over sparsity x update_from x later_update_from, and
#   100 steps over sparsity (bench/blind_sweep.py; issue: blind tasks).
set -uo pipefail
out="${OUT:?set OUT}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_operators.py tests/test_sampling.py -k cuda \
  2>&1 | tail -n 5 | tee "$out/cuda-tests.txt"
timeout 330 python3 bench/blind_sweep.py --device cuda --tasks blind-deblur --out "$out/sweep-sparsity-50.json" \
  --budget 170 --grid '{"steps": [50], "lr": [0.2], "update_from": [0.7, 0.5], "passes": [2], "later_update_from": [1.0, 0.7], "sparsity": [0, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}' \
  > /tmp/s50.log 2>&1 &
timeout 330 python3 bench/blind_sweep.py --device cuda --tasks blind-deblur --out "$out/sweep-sparsity-100.json" \
  --budget 170 --grid '{"steps": [100], "lr": [0.2], "update_from": [0.7], "passes": [2], "later_update_from": [1.0], "sparsity": [0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}' \
  > /tmp/s100.log 2>&1 &
wait
for f in /tmp/s50.log /tmp/s100.log; do echo "== $f"; tail -n 40 "$f" | cut -c1-330; done | tee "$out/logs.txt"
