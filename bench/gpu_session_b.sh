#!/usr/bin/env bash
# The second GPU call of the 2026-11-26 (third) session, after bench/gpu_session.sh (about 4 minutes):
#   OUT=/path bash bench/gpu_session_b.sh        (needs runs/colour/c0.safetensors, c5.safetensors)
# - 200 s more colour-only training from the first call's colour-only continuation (c0);
# - blind deblurring with several chains (passes), each starting from the last kernel estimate;
# - a finer low-light grid around the first sweep's best;
# - colorization chroma against steps and guidance scale for the shipped, c0 and c5 priors.
set -uo pipefail
out="${OUT:?set OUT}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p "$out/c0b"
timeout 250 python3 bench/gpu_train_prior.py --seconds 200 --out "$out/c0b" --init runs/colour/c0.safetensors \
  --lr 2e-4 --gray-weight 0 --light --run-dir /tmp/run-c0b > /tmp/c0b.log 2>&1 &
timeout 250 python3 bench/blind_sweep.py --device cuda --tasks blind-deblur --out "$out/sweep-deblur-passes.json" \
  --budget 170 --grid '{"steps": [100, 50], "lr": [0.2], "update_from": [0.7, 0.5], "passes": [2, 3, 1], "later_update_from": [0.0, 0.5, 1.0]}' \
  > /tmp/sd.log 2>&1 &
timeout 250 python3 bench/blind_sweep.py --device cuda --tasks lowlight --out "$out/sweep-lowlight-fine.json" \
  --budget 120 --grid '{"steps": [50], "target_mean": [0.35, 0.4], "lr_f": [0.05, 0.1, 0.2], "lr_mask": [0.0, 0.003, 0.01]}' \
  > /tmp/sl.log 2>&1 &
timeout 250 python3 bench/colour.py --device cuda --steps 20 50 100 250 --scale-x 1 0.3 0.1 \
  --out "$out/colour.jsonl" default runs/colour/c0.safetensors runs/colour/c5.safetensors > /tmp/co.log 2>&1 &
wait
for f in /tmp/c0b.log /tmp/sd.log /tmp/sl.log /tmp/co.log; do echo "== $f"; tail -n 12 "$f" | cut -c1-400; done | tee "$out/logs.txt"
