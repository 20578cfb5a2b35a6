#!/usr/bin/env bash
# The GPU session in calls of at most 10 minutes (device time is scarce), after `bash .fa4wh/part-a/stash.sh`
# on the same machine (see benchmarks/NOTES.md). Results go to $OUT (or benchmarks/results/gpu).
#   bash benchmarks/gpu_session.sh 1   # FA4 + sparsify install, GPU tests, FA4 calibration, e2e (eager + compile), adaptive
#   bash benchmarks/gpu_session.sh 2   # FA4 tests, e2e, Wan 1.3B step (eager + compile), kernel grid, NCCL, ONNX providers
#   bash benchmarks/gpu_session.sh 3   # adaptive sites at 16K/32K, flex tests
# Every step has its own time limit, so a slow step costs its limit and the next one still runs.
set -uo pipefail
PART=${1:-1}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOGS=${LOGS:-/tmp/gpu_session_logs}  # step logs (their tails are printed); $OUT keeps the results
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, show its tail
  local name=$1 seconds=$2; shift 2
  local begin=$SECONDS
  timeout "$seconds" "$@" > "$LOGS/$name.txt" 2>&1
  echo "== $name: rc $? in $((SECONDS - begin)) s"; tail -n "${TAIL:-12}" "$LOGS/$name.txt"
}
if [ ! -d /tmp/site/flash_attn ] && [ -f .fa4wh/part-b/install.sh ]; then
  bash .fa4wh/part-b/install.sh /tmp/site > "$LOGS/fa4_install.log" 2>&1 || tail -3 "$LOGS/fa4_install.log"
fi
if [ ! -d /tmp/site2/diffusers ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl/*.whl > "$LOGS/diffusers_install.log" 2>&1
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site2
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1 || { tail -5 "$LOGS/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sparsify.backends as b; [print(r) for r in b.describe_backends('cuda')]" 2>&1 | tee "$OUT/backends.txt"
case "$PART" in
1)
  TAIL=25 step tests 190 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=line -rf tests
  step calibrate_fa4 70 sparsify-cli calibrate --backend fa4 --device cuda --lengths 4096 8192 16384 --heads 16 \
    --head-dim 128 --block-size 128 --repeats 5 --out "$OUT/calibration_fa4.json"
  TAIL=20 step e2e 190 python3 benchmarks/e2e_bench.py --frames 64 128 --layers 4 --backend auto --compile \
    --out "$OUT/e2e_gpu.json"
  TAIL=20 step adaptive 90 python3 benchmarks/adaptive_bench.py --seq 16384 32768 --out "$OUT/adaptive_gpu.json";;
2)
  timeout 80 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short -x tests/backends/test_fa4_backend.py \
    > "$OUT/tests_fa4.txt" 2>&1; tail -c 3000 "$OUT/tests_fa4.txt"
  TAIL=20 step e2e 170 python3 benchmarks/e2e_bench.py --frames 64 128 --layers 4 --backend auto --compile \
    --out "$OUT/e2e_gpu.json"
  TAIL=20 step wan 180 python3 benchmarks/wan_bench.py --compile --backend auto --density 0.15 --out "$OUT/wan_gpu.json"
  TAIL=40 step kernels 90 python3 benchmarks/kernel_bench.py --seq 8192 16384 32768 --density 5 10 25 100 \
    --patterns window --backends fa4 triton flex --rep-ms 25 --json "$OUT/kernel_bench.json"
  step distributed 40 python3 benchmarks/distributed_bench.py --device cuda --out "$OUT/distributed_gpu.json"
  step onnx_providers 10 python3 -c "import onnxruntime; print(onnxruntime.__version__, onnxruntime.get_available_providers())";;
3)
  TAIL=20 step adaptive 60 python3 benchmarks/adaptive_bench.py --seq 16384 32768 --out "$OUT/adaptive_gpu.json"
  timeout 80 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/backends/test_flex_backend.py \
    tests/backends/test_backend_suite.py -k "flex" > "$OUT/tests_flex.txt" 2>&1; tail -c 3000 "$OUT/tests_flex.txt";;
esac
