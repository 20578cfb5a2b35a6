"""Speed of one input-adaptive site against the static choice and dense attention, estimation included.

One site of ``--heads`` heads (``D`` = ``--head-dim``, bf16 on CUDA) at each length: dense SDPA, a
static sliding window of about ``--window-density`` of the blocks, and the input-adaptive patterns
(``pooled_coverage``, ``estimated_vertical_slash``) run through `sparsify.runtime.SparseAttention`
exactly as a compiled model runs them (mask estimated on the device per call, then the backend).
Inputs carry input-dependent "anchor" keys that every query attends to, plus local structure.
Reports per pattern: milliseconds per call (median, CUDA events), the estimation alone, realised
density, speedup over SDPA. Each row is printed and written to the JSON file
(``{"meta", "rows", "complete"}``) as soon as it is measured.

``--split`` times the parts of one site's sparse attention instead (issue 19: "estimation <= 10%
of the sparse attention time at >= 32K"), for the patterns of `llm_prefill_bench.py` at
``--density`` of the causal blocks: ``attention_ms`` (the site's whole attend), ``estimate_ms``
(the mask source alone), ``kernel_ms`` (the backend's run on that mask, plan prepared),
``prepare_ms`` (the backend's plan of a per-call mask), ``glue_ms`` (attend - kernel - estimate),
``estimate_share`` (estimate / attend) and the estimator's main step alone with the fused Triton
kernel and with the torch path: the vertical-slash probe (``probe_triton_ms``, ``probe_torch_ms``),
pooled (or query-mean) scoring and coverage (``coverage_triton_ms``, ``coverage_torch_ms``).
``host_ms`` is the host time to issue one attend from an idle GPU (``host_bound``: at least 0.9 of
``attention_ms``, the GPU waits on Python and launches); ``--trace`` adds a `torch.profiler` view of one
attend (``launches``, ``host_ops``, the heaviest ``kernels``) and a `cProfile` view of the estimate's host
side (``estimate_host_top``: the functions with the most own time per call).
``--shape llama-1b`` is Llama-3.2-1B's attention (32 query / 8 key-value heads of 64, block 128).

    python benchmarks/adaptive_bench.py                         # CUDA: 16K and 32K
    python benchmarks/adaptive_bench.py --split --shape llama-1b --seq 32768 131072    # CUDA, ~1-2 min
    python benchmarks/adaptive_bench.py --smoke                 # CPU, short, to check it runs
    python benchmarks/adaptive_bench.py --split --smoke         # CPU, the split at 2048 tokens
    python benchmarks/adaptive_bench.py --split --device cpu --heads 8 --kv-heads 2 --head-dim 64 --block 128 \
        --seq 16384 --repeats 3                                 # CPU at a scaled size
"""

from __future__ import annotations

import argparse
import math
import pathlib

import torch
import torch.nn.functional as F

from bench_rows import RowLog
from sparsify import patterns
from sparsify.cost import CostModel
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite
from timing import device_description, host_issue_ms, host_profile, kernel_table, median_ms

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "adaptive_bench.json"


#: Attention geometries of `--shape` (query heads, key/value heads, head dim, block size).
SHAPES = {"llama-1b": (32, 8, 64, 128)}


def anchored_inputs(length: int, heads: int, dim: int, device, dtype, seed: int = 0, kv_heads: int | None = None):
    """q ``[1, heads, S, D]``, k/v ``[1, kv_heads, S, D]``: keys with input-dependent "anchors" every query looks at."""
    kv_heads = heads if kv_heads is None else kv_heads
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(kv_heads, 1, dim, generator=gen)
    q = torch.randn(1, heads, length, dim, generator=gen) + 0.5 * direction.repeat_interleave(heads // kv_heads, 0)
    k = torch.randn(1, kv_heads, length, dim, generator=gen) * 0.8
    anchors = torch.randint(0, length, (8,), generator=gen)
    k[:, :, anchors] = direction.unsqueeze(0) * 4
    v = torch.randn(1, kv_heads, length, dim, generator=gen)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds per call (CUDA events on a GPU)."""
    return median_ms(fn, device, repeats, warmup=3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="set heads, key/value heads, head dim and block of a model's attention")
    parser.add_argument("--window-density", type=float, default=0.1)
    parser.add_argument("--split", action="store_true",
                        help="time estimation, kernel and glue of each adaptive pattern apart (issue 19)")
    parser.add_argument("--density", type=float, default=0.08, help="--split: target share of the causal blocks")
    parser.add_argument("--trace", action="store_true",
                        help="--split: also profile one attend (torch.profiler): its kernel launches, aten operators "
                             "and heaviest kernels; and the estimate's host side (cProfile), in the row")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="CPU, 2048 tokens, 4 heads of 64")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if args.shape:
        args.heads, args.kv_heads, args.head_dim, args.block = SHAPES[args.shape]
    if args.smoke:
        args.seq, args.heads, args.kv_heads, args.head_dim, args.block, args.repeats = [2048], 4, 2, 64, 64, 3
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.out is None:
        args.out = DEFAULT_OUT.with_name(f"adaptive_split_{device.type}.json") if args.split else DEFAULT_OUT
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log = RowLog(args.out, meta={"benchmark": "adaptive", "device": device_description(device),
                                 "torch": torch.__version__,
                                 "config": {k: v for k, v in vars(args).items() if k != "out"}})
    with log:
        (run_split if args.split else run)(args, device, dtype, log)
        print(log.table(), flush=True)
    print(f"wrote {args.out}")


def run(args, device: torch.device, dtype: torch.dtype, log: RowLog) -> None:
    """One row per length and pattern, each logged as soon as it is measured."""
    for length in args.seq:
        q, k, v = anchored_inputs(length, args.heads, args.head_dim, device, dtype, kv_heads=args.kv_heads)
        dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=args.heads != args.kv_heads),
                         device, args.repeats)
        window = max(args.block, int(args.window_density * length))
        candidates = {
            f"sliding_window({window}) (static)": patterns.sliding_window(window),
            "pooled_coverage(0.9)": patterns.pooled_coverage(0.9, sink_blocks=1),
            "pooled_coverage(0.95, temperature=0.5)": patterns.pooled_coverage(0.95, sink_blocks=1, temperature=0.5),
            "pooled_coverage(0.9, query_mean)": patterns.pooled_coverage(0.9, sink_blocks=1, scoring="query_mean"),
            "estimated_vertical_slash(0.05, 0.05)": patterns.estimated_vertical_slash(0.05, 0.05, sink_blocks=1),
        }
        group = args.heads // args.kv_heads
        reference = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                                   v.float().repeat_interleave(group, 1), is_causal=True)
        for name, pattern in candidates.items():
            site = AttentionSite("bench", 0, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                                 q_len=length, k_len=length, causal=True)
            layer = SparseAttention(site, [pattern] * args.heads, block_size=args.block, backend=args.backend,
                                    cost_model=CostModel.default()).to(device)
            with torch.no_grad():
                call = lambda: layer(q, k, v, None, True, None)  # noqa: E731
                out = call()
                ms = timed(call, device, args.repeats)
                estimate_ms = 0.0
                if pattern.is_adaptive:
                    estimate = lambda: layer.adaptive_source.mask(q, k)  # noqa: E731
                    estimate_ms = timed(estimate, device, args.repeats)
                    mask = layer.adaptive_source.mask(q, k)
                    density = float(mask.kept_counts().sum()) / (mask.num_heads * mask.q_blocks * (mask.k_blocks + 1) / 2)
                else:
                    mask = layer.runtime_mask(length, length, device)
                    density = float(mask.kept_counts().sum()) / (mask.num_heads * mask.q_blocks * (mask.k_blocks + 1) / 2)
            error = float((out.float() - reference).norm() / reference.norm())
            backend = layer.backend_for(dtype, device).name
            log.add(seq=length, pattern=name, backend=backend, ms=round(ms, 4), estimate_ms=round(estimate_ms, 4),
                    dense_ms=round(dense_ms, 4), speedup=round(dense_ms / ms, 3), causal_density=round(density, 4),
                    error=round(error, 5))
        del q, k, v, reference


def split_patterns(density: float) -> dict:
    """The input-adaptive patterns of `llm_prefill_bench.py` at about ``density`` of the causal blocks."""
    return {"vertical_slash": patterns.estimated_vertical_slash(density / 4, density / 4, sink_blocks=1),
            "pooled": patterns.pooled_coverage(0.9, max_fraction=min(1.0, density / 2), sink_blocks=1),
            "query_mean": patterns.pooled_coverage(0.9, max_fraction=min(1.0, density / 2), sink_blocks=1,
                                                   scoring="query_mean")}


def run_split(args, device: torch.device, dtype: torch.dtype, log: RowLog) -> None:
    """One row per length and adaptive pattern: the site's attend, split into estimation, kernel and glue."""
    from sparsify.estimators import pooled_coverage_block_lists, vertical_slash_line_mass

    group = args.heads // args.kv_heads
    kv_head_index = torch.arange(args.heads) // group
    scale = 1.0 / math.sqrt(args.head_dim)
    for length in args.seq:
        q, k, v = anchored_inputs(length, args.heads, args.head_dim, device, dtype, kv_heads=args.kv_heads)
        dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1),
                         device, args.repeats)
        for name, pattern in split_patterns(args.density).items():
            site = AttentionSite("bench", 0, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                                 q_len=length, k_len=length, causal=True)
            layer = SparseAttention(site, [pattern] * args.heads, block_size=args.block, backend=args.backend).to(device)
            source = layer.adaptive_source
            with torch.no_grad():
                attend = lambda: layer.attend(q, k, v, None, scale, is_causal=True)  # noqa: E731
                attention_ms = timed(attend, device, args.repeats)
                host_ms = host_issue_ms(attend, device, args.repeats)
                trace = kernel_table(attend, device) if args.trace else {}
                estimate_ms = timed(lambda: source.mask(q, k, scale=scale), device, args.repeats)
                if args.trace:   # the estimate's host side: what holds it when its kernels take less than it does
                    trace["estimate_host_top"] = host_profile(lambda: source.mask(q, k, scale=scale))
                mask = source.mask(q, k, scale=scale)
                backend = layer.backend_for(dtype, device)
                shapes = dict(q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape), dtype=dtype,
                              device=device)
                prepare_ms = timed(lambda: backend.prepare(mask, **shapes), device, args.repeats)
                plan = backend.prepare(mask, **shapes)
                kernel_ms = timed(lambda: backend.run(plan, q, k, v, attn_mask=None, scale=scale), device, args.repeats)
                parts = {}   # the estimator's main step with each implementation
                for kernel in ["torch"] + (["triton"] if device.type == "cuda" else []):
                    if name == "vertical_slash":
                        step = lambda: vertical_slash_line_mass(  # noqa: E731
                            q, k, block_size=args.block, kv_head_index=kv_head_index, probe_rows=args.block,
                            scale=scale, causal=True, kernel=kernel)
                        parts[f"probe_{kernel}_ms"] = round(timed(step, device, args.repeats), 4)
                    else:
                        blocks = math.ceil(length / args.block)
                        heads = torch.ones(args.heads)
                        step = lambda: pooled_coverage_block_lists(  # noqa: E731
                            q, k, block_size=args.block, kv_head_index=kv_head_index, coverage=0.9 * heads,
                            min_blocks=heads.long(), max_blocks=torch.full((args.heads,), max(1, math.ceil(
                                pattern.max_fraction * blocks)), dtype=torch.long), scale=scale, causal=True,
                            kernel=kernel, scoring=pattern.scoring)
                        parts[f"coverage_{kernel}_ms"] = round(timed(step, device, args.repeats), 4)
            blocks = math.ceil(length / args.block)
            density = float(mask.kept_counts().sum()) / (mask.num_heads * blocks * (blocks + 1) / 2)
            log.add(seq=length, pattern=name, backend=backend.name, attention_ms=round(attention_ms, 4),
                    estimate_ms=round(estimate_ms, 4), kernel_ms=round(kernel_ms, 4), prepare_ms=round(prepare_ms, 4),
                    glue_ms=round(attention_ms - kernel_ms - estimate_ms, 4), host_ms=round(host_ms, 4),
                    host_bound=host_ms >= 0.9 * attention_ms,
                    estimate_share=round(estimate_ms / attention_ms, 4), **parts,
                    widths=f"{mask.full_width}/{mask.partial_width}", causal_density=round(density, 4),
                    dense_ms=round(dense_ms, 4), attention_speedup=round(dense_ms / attention_ms, 3),
                    attention_of_ideal=round(density * dense_ms / attention_ms, 3), **trace)
            del layer, source, mask, plan
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del q, k, v


if __name__ == "__main__":
    main()
