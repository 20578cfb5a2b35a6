"""The estimator, block-list, decode-score and page-selection Triton kernels compile for Hopper (sm_90) without a GPU.

Triton's interpreter (how CI runs these kernels on CPU tensors) checks what they compute, not
that the compiler takes them: a type the compiler refuses, or an op the interpreter allows and
the GPU backend does not, would only show on the GPU machine. Here each kernel is compiled to
PTX and a cubin with the local Triton and its bundled ``ptxas``, in a subprocess (the suite sets
``TRITON_INTERPRET=1``, under which ``triton.jit`` makes interpreted functions).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

BF16, F32, I64, I32, U8 = "*bf16", "*fp32", "*i64", "*i32", "*u8"

# (module, kernel, pointer and float argument types (other arguments: i32), constexpr values)
KERNELS = [
    ("sparsify.estimator_kernels", "_probe_stats_kernel",
     dict(Q=BF16, K=BF16, KV_INDEX=I64, VALID=U8, ROW_MAX=F32, ROW_SUM=F32, qk_scale="fp32"),
     dict(CAUSAL=True, HAS_VALID=True, IEEE=False, BLOCK_M=64, BLOCK_N=64, HEAD_DIM=64, D_PAD=64, CHUNK_KEYS=1024)),
    ("sparsify.estimator_kernels", "_probe_split_kernel",
     dict(Q=BF16, K=BF16, KV_INDEX=I64, VALID=U8, ROW_MAX=F32, ROW_SUM=F32, SPLIT=F32, qk_scale="fp32"),
     dict(CAUSAL=True, HAS_VALID=False, IEEE=False, BLOCK_M=64, BLOCK_N=64, HEAD_DIM=128, D_PAD=128, BLOCK_SIZE=128,
          CHUNK_BLOCKS=8, CLASSES=3, CLASSES_PAD=4)),
    ("sparsify.estimator_kernels", "_probe_stats_kernel",     # every probe row of a head in one tile (8 warps)
     dict(Q=BF16, K=BF16, KV_INDEX=I64, VALID=U8, ROW_MAX=F32, ROW_SUM=F32, qk_scale="fp32"),
     dict(CAUSAL=True, HAS_VALID=False, IEEE=False, BLOCK_M=128, BLOCK_N=64, HEAD_DIM=128, D_PAD=128,
          CHUNK_KEYS=2048, num_warps=8)),
    ("sparsify.estimator_kernels", "_probe_split_kernel",
     dict(Q=BF16, K=BF16, KV_INDEX=I64, VALID=U8, ROW_MAX=F32, ROW_SUM=F32, SPLIT=F32, qk_scale="fp32"),
     dict(CAUSAL=True, HAS_VALID=False, IEEE=False, BLOCK_M=128, BLOCK_N=64, HEAD_DIM=64, D_PAD=64, BLOCK_SIZE=128,
          CHUNK_BLOCKS=16, CLASSES=3, CLASSES_PAD=4, num_warps=8)),
    ("sparsify.estimator_kernels", "_probe_split_kernel",     # the heaviest tile: 128 rows of 128 dims, padding
     dict(Q=BF16, K=BF16, KV_INDEX=I64, VALID=U8, ROW_MAX=F32, ROW_SUM=F32, SPLIT=F32, qk_scale="fp32"),
     dict(CAUSAL=True, HAS_VALID=True, IEEE=False, BLOCK_M=128, BLOCK_N=64, HEAD_DIM=128, D_PAD=128, BLOCK_SIZE=128,
          CHUNK_BLOCKS=16, CLASSES=3, CLASSES_PAD=4, num_warps=8)),
    ("sparsify.estimator_kernels", "_top_lines_kernel",
     dict(SPLIT=F32, COLUMN_COUNT=I32, SLASH_COUNT=I32, COLUMNS=I64, DIAGONALS=I64), dict(CLASSES=3, PAD=2048)),
    ("sparsify.estimator_kernels", "_vertical_slash_lists_kernel",
     dict(COLUMNS=I64, DIAGONALS=I64, SINKS=I32, LISTS=I64),
     dict(CAUSAL=True, BLOCK_SIZE=128, ROWS=16, COLUMN_PAD=32, SLASH_PAD=64, SINK_PAD=2)),
    ("sparsify.estimator_kernels", "_block_means_kernel", dict(X=BF16, VALID=U8, MEANS=F32, COUNTS=F32),
     dict(HAS_VALID=True, BLOCK_SIZE=128, DIM=64, D_PAD=64)),
    ("sparsify.estimator_kernels", "_coverage_kernel",
     dict(SCORES=F32, KEY_BIAS=F32, COVERAGE=F32, MIN_BLOCKS=I32, MAX_BLOCKS=I32, SINKS=I32, LISTS=I64,
          CANDIDATE_MASS=I64, CANDIDATE_INDEX=I64),
     dict(CAUSAL=True, BLOCK_SIZE=128, ROWS=4, K_PAD=1024, SINK_PAD=2, PRESELECT=False, LIMIT_PAD=1024)),
    ("sparsify.estimator_kernels", "_coverage_kernel",         # 128K tokens at low density: ranks over a tile
     dict(SCORES=F32, KEY_BIAS=F32, COVERAGE=F32, MIN_BLOCKS=I32, MAX_BLOCKS=I32, SINKS=I32, LISTS=I64,
          CANDIDATE_MASS=F32, CANDIDATE_INDEX=I32),
     dict(CAUSAL=True, BLOCK_SIZE=128, ROWS=4, K_PAD=1024, SINK_PAD=2, PRESELECT=True, LIMIT_PAD=64, num_warps=8)),
    ("sparsify.estimator_kernels", "_query_mean_logits_kernel",
     dict(MEANS=F32, K=BF16, KV_INDEX=I64, VALID=U8, LOGITS=F32),
     dict(CAUSAL=True, HAS_VALID=True, IEEE=False, BLOCK_SIZE=128, CHUNK_BLOCKS=16, ROWS=64, BLOCK_N=64, HEAD_DIM=64,
          D_PAD=64)),
    ("sparsify.estimator_kernels", "_query_mean_logits_kernel",     # head dim 128 in 8 warps; float32 in IEEE
     dict(MEANS=F32, K=F32, KV_INDEX=I64, VALID=U8, LOGITS=F32),
     dict(CAUSAL=True, HAS_VALID=False, IEEE=True, BLOCK_SIZE=128, CHUNK_BLOCKS=8, ROWS=64, BLOCK_N=64, HEAD_DIM=128,
          D_PAD=128, num_warps=8)),
    ("sparsify.estimator_kernels", "_query_mean_logits_kernel",     # the widest tile: head dim 256, block 256
     dict(MEANS=F32, K=BF16, KV_INDEX=I64, VALID=U8, LOGITS=F32),
     dict(CAUSAL=True, HAS_VALID=True, IEEE=False, BLOCK_SIZE=256, CHUNK_BLOCKS=16, ROWS=64, BLOCK_N=64, HEAD_DIM=256,
          D_PAD=256, num_warps=8)),
    ("sparsify.backends.triton_decode", "_page_scores_kernel",
     dict(Q=BF16, MIN=BF16, MAX=BF16, END=I64, SCORES=F32, K=BF16),
     dict(HEAD_D=64, BLOCK_D=64, BLOCK_R=16, BLOCK_P=64, TOUCHED=1, CHUNK=16, HAS_END=False)),
    ("sparsify.backends.triton_decode", "_top_pages_kernel", dict(SCORES=F32, CHOSEN=I64), dict(PAD=8192)),
    ("sparsify.block_list_kernels", "_compress_kernel",
     dict(BLOCKS=I64, FULL_COUNTS=I32, FULL_INDICES=I32, COUNTS=I32, INDICES=I32),
     dict(CAUSAL=True, BLOCK_SIZE=128, SLOTS_PAD=128, FULL_PAD=128, PARTIAL_PAD=16)),
]


def _ptxas_present() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return os.path.isfile(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_present(), reason="needs Triton with its bundled ptxas")
@pytest.mark.parametrize("module, kernel, types, constexprs", KERNELS,
                         ids=[f"{kernel}-{index}" for index, (_, kernel, _, _) in enumerate(KERNELS)])
def test_the_kernel_compiles_for_hopper(module, kernel, types, constexprs):
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, module, kernel, repr(types), repr(constexprs)],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout


def _compile(module: str, kernel: str, types: dict, constexprs: dict) -> None:
    """Compile ``module.kernel`` for sm_90: every argument typed (pointers and floats from ``types``, the rest i32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    function = getattr(importlib.import_module(module), kernel)
    constexprs = dict(constexprs)
    options = {"num_warps": constexprs.pop("num_warps")} if "num_warps" in constexprs else {}   # as the launch sets it
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in function.arg_names}
    compiled = triton.compile(ASTSource(function, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    assert compiled.asm.get("cubin"), f"{kernel}: no cubin"
    print("compiled", kernel)


if __name__ == "__main__":
    import ast

    _compile(sys.argv[1], sys.argv[2], ast.literal_eval(sys.argv[3]), ast.literal_eval(sys.argv[4]))
