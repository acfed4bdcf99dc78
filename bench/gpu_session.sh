#!/usr/bin/env bash
# The GPU work of one device session (about 7 minutes on an H100/H200), all processes sharing the one GPU:
#   OUT=/path bash bench/gpu_session.sh
# - two continuations of the default prior (colour-only sources, and grayscale drawn 0.05x as often)
#   from the shipped weights (issue 3: colorization needs a more colourful prior);
# - the blind-deblur and low-light sampler sweeps (bench/blind_sweep.py, issue 5);
# - the 1000-step point of the quality-versus-steps curve (bench/steps.py, issue 8).
# Eight files come back under $OUT (the device tool's limit).
set -uo pipefail
out="${OUT:?set OUT}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T="${GPU_SESSION_SECONDS:-330}"
mkdir -p "$out/c0" "$out/c5"
timeout 420 python3 bench/gpu_train_prior.py --seconds "$T" --out "$out/c0" --init gdp/assets/default_prior.safetensors \
  --lr 2e-4 --gray-weight 0 --light --run-dir /tmp/run-c0 > /tmp/c0.log 2>&1 &
timeout 420 python3 bench/gpu_train_prior.py --seconds "$T" --out "$out/c5" --init gdp/assets/default_prior.safetensors \
  --lr 2e-4 --gray-weight 0.05 --light --run-dir /tmp/run-c5 > /tmp/c5.log 2>&1 &
timeout 420 python3 bench/blind_sweep.py --device cuda --tasks blind-deblur --out "$out/sweep-deblur.json" \
  --budget 240 > /tmp/sd.log 2>&1 &
timeout 420 python3 bench/blind_sweep.py --device cuda --tasks lowlight --out "$out/sweep-lowlight.json" \
  --budget 240 > /tmp/sl.log 2>&1 &
cp docs/data/quality_vs_steps.json "$out/qvs.json"
timeout 420 python3 bench/steps.py --device cuda --steps 1000 --data "$out/qvs.json" --plot /tmp/qvs.png > /tmp/st.log 2>&1 &
wait
for f in /tmp/c0.log /tmp/c5.log /tmp/sd.log /tmp/sl.log /tmp/st.log; do echo "== $f"; tail -n 25 "$f"; done | tee "$out/logs.txt"
