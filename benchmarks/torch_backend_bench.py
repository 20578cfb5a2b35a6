"""Benchmark the `torch` backend against dense `F.scaled_dot_product_attention` on CPU.

Sliding-window block tables (non-causal) at about 5, 12 and 25% block density; B=1, H=8, D=64,
fp32, block 64. Prints each row and writes it to the JSON file (``{"meta", "rows", "complete"}``, machine
info in ``meta``) as soon as it is measured, then a table of median times and speedups.

    python benchmarks/torch_backend_bench.py --seq 2048 4096 --repeats 10
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from bench_rows import RowLog
from sparsify.backends.torch import TorchBackend
from sparsify.block_mask import RuntimeBlockMask
from sparsify.cost import device_name

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "torch_backend_cpu.json"


def sliding_window_mask(seq: int, block: int, heads: int, target_density: float) -> RuntimeBlockMask:
    """A banded block mask of about ``target_density`` (clipped at the sequence edges)."""
    blocks = -(-seq // block)
    width = max(1, round(target_density * blocks))
    before = (width - 1) // 2
    after = width - 1 - before
    i = torch.arange(blocks).view(-1, 1)
    j = torch.arange(blocks).view(1, -1)
    band = (j >= i - before) & (j <= i + after)
    masks = band.expand(heads, blocks, blocks).contiguous()
    return RuntimeBlockMask.from_block_masks(masks, block_size=block, q_len=seq, k_len=seq, causal=False)


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.12, 0.25])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    meta = {
        "benchmark": "torch_backend_cpu",
        "config": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "block": args.block,
                   "dtype": "float32", "pattern": "sliding_window (non-causal)",
                   "repeats": args.repeats, "statistic": "median"},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": device_name("cpu"), "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    torch.manual_seed(0)
    backend = TorchBackend()
    with RowLog(args.out, meta=meta) as log:
        for seq in args.seq:
            q, k, v = (torch.randn(1, args.heads, seq, args.head_dim) for _ in range(3))
            dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
            for target in args.densities:
                mask = sliding_window_mask(seq, args.block, args.heads, target)
                density = mask.density()
                plan = backend.prepare(mask, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=q.dtype,
                                       device=q.device)
                sparse_ms = median_ms(lambda: backend.run(plan, q, k, v), args.repeats)
                log.add(seq=seq, target_density=target, density=round(density, 4), dense_ms=round(dense_ms, 3),
                        sparse_ms=round(sparse_ms, 3), speedup=round(dense_ms / sparse_ms, 2),
                        ideal_speedup=round(1.0 / density, 2))

        headers = {"seq": "seq", "density": "density", "dense_ms": "dense SDPA ms",
                   "sparse_ms": "torch backend ms", "speedup": "speedup", "ideal_speedup": "ideal (1/density)"}
        print(tabulate([[row[key] for key in headers] for row in log.rows], headers=list(headers.values()),
                       tablefmt="github"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
