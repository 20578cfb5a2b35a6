#!/usr/bin/env bash
# One GPU session in one call (the device time is scarce): GPU tests, cost-model calibration of the
# GPU backends, and the end-to-end benchmark. Results go to $OUT (or benchmarks/results/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/backends tests/passes/test_rewrite.py -k "gpu or cuda or mixed_heads" 2>&1 | tail -5 | tee "$OUT/tests.txt"
for backend in triton flex; do
  timeout 150 sparsify-cli calibrate --backend "$backend" --device cuda --lengths 4096 8192 16384 --heads 16 \
    --head-dim 128 --block-size 128 --repeats 5 --out "$OUT/calibration_$backend.json" 2>&1 | tail -9
done
timeout 240 python3 benchmarks/e2e_bench.py --frames 64 128 --layers 4 --out "$OUT/e2e_gpu.json" 2>&1 | tail -20
