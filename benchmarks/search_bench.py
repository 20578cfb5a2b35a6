"""Wall time of profile + search on CPU: a 12-layer, 8-head model at 4K tokens with 4 calibration batches.

Prints a table and writes JSON (default benchmarks/results/search_cpu.json).

    python benchmarks/search_bench.py [--layers 12] [--heads 8] [--frames 16] [--batches 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from tabulate import tabulate

import sparsify
from sparsify.api import search_model
from sparsify.cost import device_name
from sparsify.examples import StructuredVideoTransformer
from sparsify.search import SearchConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="also score input-adaptive candidates (default: yes)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16, help="frames of 16x16 tokens (16: 4096 tokens)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--max-error", type=float, default=sparsify.search.DEFAULT_MAX_ERROR)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "search_cpu.json"))
    args = parser.parse_args()

    model = StructuredVideoTransformer(frames=args.frames, heads=args.heads, layers=args.layers, dim=32 * args.heads).eval()
    batches = [model.example_tokens(seed=1 + i) for i in range(args.batches)]
    start = time.perf_counter()
    result = search_model(model, batches, SearchConfig(max_error=args.max_error, adaptive=args.adaptive),
                          progress=False)
    seconds = time.perf_counter() - start
    summary = result.compiled.strategy.summary()
    row = {
        "layers": args.layers, "heads": args.heads, "tokens": model.positions.shape[0], "batches": args.batches,
        "seconds": round(seconds, 2), "mean_density": round(summary["mean_density"], 4),
        "estimated_speedup": summary["estimated_speedup"], "end_to_end_error": summary["end_to_end_error"],
    }
    print(tabulate([row], headers="keys", tablefmt="github"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump({"machine": {"device": device_name("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "python": platform.python_version()}, "result": row}, file, indent=2)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
