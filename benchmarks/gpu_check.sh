#!/usr/bin/env bash
# One GPU call after `bash .fa4wh/part-a/stash.sh` on the same machine: FA4 from the wheelhouse, the FA4
# probe (.gpu/fa4_probe.py, when present), the GPU tests of the backends and the runtime, and a short kernel
# benchmark. Results go to $OUT (or benchmarks/results/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -f .fa4wh/part-b/install.sh ]; then
  bash .fa4wh/part-b/install.sh /tmp/site > "$OUT/fa4_install.log" 2>&1 || tail -3 "$OUT/fa4_install.log"
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sparsify.backends as b; [print(r) for r in b.describe_backends('cuda')]" 2>&1 | tee "$OUT/backends.txt"
if [ -f .gpu/fa4_probe.py ]; then
  timeout "${PROBE_SECONDS:-200}" python3 .gpu/fa4_probe.py > "$OUT/fa4_probe.txt" 2>&1; tail -45 "$OUT/fa4_probe.txt"
fi
timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider tests/backends tests/runtime -x 2>&1 \
  | tee "$OUT/tests.txt" | tail -25
timeout "${BENCH_SECONDS:-150}" python3 benchmarks/kernel_bench.py --seq ${BENCH_SEQ:-16384 32768} \
  --density ${BENCH_DENSITY:-5 10 25 100} --patterns window --rep-ms 40 --json "$OUT/kernel_bench.json" 2>&1 \
  | tee "$OUT/kernel_bench.txt" | tail -30
