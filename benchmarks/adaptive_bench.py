"""Speed of one input-adaptive site against the static choice and dense attention, estimation included.

One site of ``--heads`` heads (``D`` = ``--head-dim``, bf16 on CUDA) at each length: dense SDPA, a
static sliding window of about ``--window-density`` of the blocks, and the input-adaptive patterns
(``pooled_coverage``, ``estimated_vertical_slash``) run through `sparsify.runtime.SparseAttention`
exactly as a compiled model runs them (mask estimated on the device per call, then the backend).
Inputs carry input-dependent "anchor" keys that every query attends to, plus local structure.
Reports per pattern: milliseconds per call (median, CUDA events), the estimation alone, realised
density, speedup over SDPA. Each row is printed and written to the JSON file
(``{"meta", "rows", "complete"}``) as soon as it is measured.

    python benchmarks/adaptive_bench.py                         # CUDA: 16K and 32K
    python benchmarks/adaptive_bench.py --smoke                 # CPU, short, to check it runs
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import torch.nn.functional as F

from bench_rows import RowLog
from sparsify import patterns
from sparsify.cost import CostModel
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite
from timing import device_description, median_ms

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "adaptive_bench.json"


def anchored_inputs(length: int, heads: int, dim: int, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(heads, 1, dim, generator=gen)
    q = torch.randn(1, heads, length, dim, generator=gen) + 0.5 * direction
    k = torch.randn(1, heads, length, dim, generator=gen) * 0.8
    anchors = torch.randint(0, length, (8,), generator=gen)
    k[:, :, anchors] = direction.unsqueeze(0) * 4
    v = torch.randn(1, heads, length, dim, generator=gen)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds per call (CUDA events on a GPU)."""
    return median_ms(fn, device, repeats, warmup=3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--window-density", type=float, default=0.1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU, 2048 tokens, 4 heads of 64")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.seq, args.heads, args.head_dim, args.block, args.repeats = [2048], 4, 64, 64, 3
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log = RowLog(args.out, meta={"benchmark": "adaptive", "device": device_description(device),
                                 "torch": torch.__version__,
                                 "config": {k: v for k, v in vars(args).items() if k != "out"}})
    with log:
        run(args, device, dtype, log)
        print(log.table(), flush=True)
    print(f"wrote {args.out}")


def run(args, device: torch.device, dtype: torch.dtype, log: RowLog) -> None:
    """One row per length and pattern, each logged as soon as it is measured."""
    for length in args.seq:
        q, k, v = anchored_inputs(length, args.heads, args.head_dim, device, dtype)
        dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, args.repeats)
        window = max(args.block, int(args.window_density * length))
        candidates = {
            f"sliding_window({window}) (static)": patterns.sliding_window(window),
            "pooled_coverage(0.9)": patterns.pooled_coverage(0.9, sink_blocks=1),
            "pooled_coverage(0.95, temperature=0.5)": patterns.pooled_coverage(0.95, sink_blocks=1, temperature=0.5),
            "estimated_vertical_slash(0.05, 0.05)": patterns.estimated_vertical_slash(0.05, 0.05, sink_blocks=1),
        }
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        for name, pattern in candidates.items():
            site = AttentionSite("bench", 0, num_heads=args.heads, num_kv_heads=args.heads, head_dim=args.head_dim,
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


if __name__ == "__main__":
    main()
