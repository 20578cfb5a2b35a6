#!/usr/bin/env bash
# The GPU session in parts that each fit one call of at most 10 minutes (device time is scarce: ~25 min for
# the whole team). Run from the repository root; results go to $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_session.sh 1   # ~3-4 min: install, the whole `pytest -m gpu tests` WITHOUT FA4; counts + card
#   bash benchmarks/gpu_session.sh 2   # ~8-9 min: FA4 install, the whole GPU suite again WITH FA4 (FA4 compiles
#                                      #   each new shape: tens of seconds each)
#   bash benchmarks/gpu_session.sh 3   # ~6-7 min: kernel_bench host time (1K tokens: SDPA, backends' run, a sparse
#                                      #   site eager and under torch.compile) + a short wan_bench --compile (32760 tokens;
#                                      #   WAN=0 leaves it out: ~1 min)
#   bash benchmarks/gpu_session.sh 4   # the adaptive split (estimation share, 32K / 128K), the LLM benches and a decode
#                                      #   page-size sweep (~14 min in all: STEPS="split prefill", then STEPS="decode pages")
#   bash benchmarks/gpu_session.sh 5   # ~5-6 min: e2e_bench --compile at 16K and 32K (eager / compiled / reduce-overhead)
#   bash benchmarks/gpu_session.sh 6   # ~6-8 min: the search at real size (search_bench: Wan 1.3B at 32,760 tokens and a
#                                      #   16-layer Llama-3.2-1B shape at 32K; phases, peak extra GPU memory)
#
# Every step has its own time limit (`timeout`), so a slow or failing step costs at most its limit and the next one
# still runs. Benchmarks write their JSON row by row, so a step cut by its limit keeps the rows it measured.
# What comes back (at most 8 files, no deeper than 2 folders): $OUT/part<N>.tar.gz (every JSON, JUnit XML and step
# log of the part, re-packed after each step, so it is current even if the call is cut) and $OUT/part<N>.txt (the
# summary printed to stdout: card, pass/fail counts, key rows). Limits can be changed: LIMIT_TESTS=300 bash ... 1;
# SKIP_INSTALL=1 skips `pip install -e .` (already installed); TESTS="tests/a.py tests/b.py" runs only those
# GPU tests in parts 1 and 2 (a re-check of what changed; the whole suite is the default); XDIST=4 runs the suite in
# 4 pytest-xdist processes sharing the GPU (the GPU image has pytest-xdist; kernel compilation dominates the suite;
# the workers shuffle with the controller's seed — tests/conftest.py — else xdist refuses their differing orders;
# not yet run on the GPU: the first try, before that fix, stopped at collection).
set -uo pipefail
PART=${1:-1}
OUT=${OUT:-benchmarks/results/gpu}
WORK=${WORK:-/tmp/gpu_session/part$PART}   # everything of this part; packed into $OUT/part$PART.tar.gz
mkdir -p "$OUT" "$WORK/json" "$WORK/logs"
SUMMARY="$OUT/part$PART.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
say() { echo "$@" | tee -a "$SUMMARY"; }
pack() {  # re-pack the part's files into one archive (atomically: a cut call leaves the previous archive)
  tar -czf "$OUT/.part$PART.tar.gz.tmp" -C "$WORK" json logs 2> /dev/null && mv "$OUT/.part$PART.tar.gz.tmp" "$OUT/part$PART.tar.gz"
}
trap pack EXIT
step() {  # step NAME SECONDS COMMAND...: run under a time limit, keep its log, show its tail, re-pack
  local name=$1 seconds=$2; shift 2
  local begin=$SECONDS rc
  timeout --kill-after=15 "$seconds" "$@" > "$WORK/logs/$name.txt" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "== $name: TIME LIMIT ($seconds s) after $((SECONDS - begin)) s"
  else
    say "== $name: rc $rc in $((SECONDS - begin)) s"
  fi
  tail -n "${TAIL:-8}" "$WORK/logs/$name.txt"
  pack
}
show() {  # show FILE.json [KEYS...]: the rows a step wrote (also when it was cut)
  local file=$1; shift
  python3 benchmarks/show_rows.py "$file" ${1:+--keys "$@"} 2>&1 | tee -a "$SUMMARY"
}
counts() {  # counts NAME: pass / fail counts of a test step's JUnit file
  python3 benchmarks/show_rows.py --junit "$WORK/json/$1.xml" 2>&1 | tee -a "$SUMMARY"
}

install_sparsify() {  # SKIP_INSTALL=1: sparsify is already installed (editable) in this python
  [ "${SKIP_INSTALL:-0}" = 1 ] && return 0
  if [ ! -d /tmp/site2/diffusers ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl/*.whl > "$WORK/logs/diffusers_install.txt" 2>&1
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . > "$WORK/logs/install.txt" 2>&1 \
    || { say "sparsify install failed:"; tail -5 "$WORK/logs/install.txt"; pack; exit 1; }
}
install_fa4() {  # FA4 (flash-attn-4, CuTe DSL) from the wheelhouse into /tmp/site
  if [ ! -d /tmp/site/flash_attn ] && [ -f .fa4wh/part-b/install.sh ]; then
    local begin=$SECONDS
    bash .fa4wh/part-b/install.sh /tmp/site > "$WORK/logs/fa4_install.txt" 2>&1 || tail -3 "$WORK/logs/fa4_install.txt"
    say "== fa4_install: $((SECONDS - begin)) s"
  fi
  [ -d /tmp/site/flash_attn ] || say "FA4 is NOT installed (no .fa4wh/part-b/install.sh, or it failed): fa4 rows skip"
}
card() {
  say "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$SUMMARY"
  python3 -c "import sparsify.backends as b; [print(r) for r in b.describe_backends('cuda')]" 2>&1 | tee -a "$SUMMARY"
}
gpu_suite() {  # gpu_suite NAME SECONDS: the whole GPU-marked suite, counts to the summary
  # pytest-benchmark (in the GPU image) warns that xdist disables it, which the suite's -W error makes fatal.
  TAIL=15 step "$1" "$2" python3 -m pytest -q -p no:cacheprovider -p no:benchmark -m gpu --tb=line -rf ${XDIST:+-n "$XDIST"} \
    --junitxml="$WORK/json/$1.xml" ${TESTS:-tests}
  counts "$1"
}

case "$PART" in
1)
  export PYTHONPATH=/tmp/site2
  install_sparsify
  card
  gpu_suite tests_gpu_without_fa4 "${LIMIT_TESTS:-420}";;
2)
  install_fa4
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site2
  install_sparsify
  card
  gpu_suite tests_gpu_with_fa4 "${LIMIT_TESTS:-480}";;
5)
  install_fa4
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site2
  install_sparsify
  card
  step e2e "${LIMIT_E2E:-330}" python3 benchmarks/e2e_bench.py --frames 64 128 --layers 4 --backend auto --compile \
    --out "$WORK/json/e2e_cuda.json"
  show "$WORK/json/e2e_cuda.json" tokens mode dense_ms sparsify_ms speedup attention_ms ideal_ms fraction_of_ideal \
    max_output_error mean_density output_rel_error cudagraph_skips;;
3)
  install_fa4
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site2
  install_sparsify
  card
  step kernel_host "${LIMIT_KERNEL:-150}" python3 benchmarks/kernel_bench.py --host-time-only --backends fa4 triton \
    --json "$WORK/json/kernel_host.json"
  show "$WORK/json/kernel_host.json" call host_us gpu_us device_us wall_us host_bound
  # Wan 1.3B config at 32760 tokens: eager, then torch.compile (two compilations of the 30-layer model); the
  # self-attention-skipped column is left out (a third compilation), the graph-break count runs last.
  [ "${WAN:-1}" = 0 ] && { say "== wan: skipped (WAN=0)"; pack; say "part $PART done in $SECONDS s"; exit 0; }
  step wan "${LIMIT_WAN:-420}" python3 benchmarks/wan_bench.py --compile --no-skipped --backend auto --density 0.15 \
    --repeats 5 --warmup 2 --out "$WORK/json/wan_cuda.json"
  show "$WORK/json/wan_cuda.json" mode dense_ms sparse_ms speedup attention_ms ideal_ms fraction_of_ideal \
    output_rel_error;;
4)
  install_fa4
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site2
  install_sparsify
  card
  # One layer's adaptive site split into estimation / kernel / glue (issue 19's estimation share), then the LLM benches.
  # STEPS picks some (all four take ~14 min: two calls, e.g. STEPS="split prefill" then STEPS="decode pages").
  STEPS=${STEPS:-split prefill decode pages}
  has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
  has split && step adaptive_split "${LIMIT_SPLIT:-150}" python3 benchmarks/adaptive_bench.py --split --shape llama-1b \
    --seq 32768 131072 --trace --out "$WORK/json/adaptive_split_cuda.json"
  has split && show "$WORK/json/adaptive_split_cuda.json" seq pattern backend attention_ms host_ms estimate_ms kernel_ms \
    glue_ms estimate_share causal_density launches kernels
  for bench in llm_prefill llm_decode; do
    has "${bench#llm_}" || continue
    script=benchmarks/${bench}_bench.py
    if [ ! -f "$script" ]; then say "== $bench: $script does not exist here, skipped"; continue; fi
    if python3 "$script" --help 2>/dev/null | grep -q -- "--out"; then
      step "$bench" "${LIMIT_LLM:-270}" python3 "$script" --out "$WORK/json/${bench}_cuda.json"
      show "$WORK/json/${bench}_cuda.json"
    else
      step "$bench" "${LIMIT_LLM:-270}" python3 "$script"
    fi
  done
  # Decode at batch 1 is launch-bound (issue 19's 2x at 128K): the page size sets how many pages the bound scores.
  has pages && for page in 32 64; do
    step "llm_decode_page$page" "${LIMIT_PAGE:-90}" python3 benchmarks/llm_decode_bench.py --lengths 131072 \
      --batches 1 --page-size "$page" --no-torch-path --breakdown --out "$WORK/json/llm_decode_page${page}_cuda.json"
    show "$WORK/json/llm_decode_page${page}_cuda.json"
  done
  # The pattern quality_gpu.sh checks on real weights: a 4096-token budget (Quest's kind) in pages of 16.
  has pages && step llm_decode_tokens4096 "${LIMIT_PAGE:-90}" python3 benchmarks/llm_decode_bench.py --lengths 32768 \
    131072 --batches 1 8 --page-size 16 --budget 0 --min-pages 256 --window-pages 4 --no-torch-path --breakdown \
    --out "$WORK/json/llm_decode_tokens4096_cuda.json"
  has pages && show "$WORK/json/llm_decode_tokens4096_cuda.json";;
6)
  install_fa4
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site2
  install_sparsify
  card
  step search "${LIMIT_SEARCH:-480}" python3 benchmarks/search_bench.py --device cuda --model wan llama --batches 3 \
    --out "$WORK/json/search_cuda.json"
  show "$WORK/json/search_cuda.json";;
*)
  echo "unknown part '$PART': 1 to 6 (see the head of $0)" >&2; exit 2;;
esac
pack
say "part $PART done in $SECONDS s; files: $OUT/part$PART.tar.gz, $SUMMARY"
