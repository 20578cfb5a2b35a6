"""Peak memory of profiling one attention site on CPU at S = 2K..16K: it grows linearly, not quadratically.

Each length runs in a fresh subprocess; the peak resident set size above the inputs' own memory
is what profiling added. A seq × seq fp32 score matrix for 8 heads is shown for comparison.
Prints each row and writes it to the JSON file (default benchmarks/results/profile_memory_cpu.json,
``{"meta", "rows", "complete"}``) as soon as it is measured, then a table.

    python benchmarks/profile_memory_bench.py [--lengths 2048 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from bench_rows import RowLog

HEADS, HEAD_DIM, BLOCK = 8, 64, 64


def measure(length: int, rows_per_block: int | None) -> dict:
    """Run in a child: allocate q/k/v, then profile; report peak RSS before/after (MiB)."""
    import torch

    from sparsify.profile import BlockMassProfile

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    profile = BlockMassProfile.empty(HEADS, length, length, BLOCK)
    profile.add(q, k, v, None, True, None, rows_per_block=rows_per_block, generator=torch.Generator().manual_seed(0))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seq": length, "rows_per_block": rows_per_block or BLOCK, "inputs_mib": round(3 * q.numel() * 4 / 2**20, 1),
            "profiling_peak_mib": round(after - before, 1),
            "dense_scores_mib": round(HEADS * length * length * 4 / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows-per-block", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "profile_memory_cpu.json"))
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rows_per_block)))
        return
    with RowLog(args.out, meta={"benchmark": "profile_memory", "heads": HEADS, "head_dim": HEAD_DIM,
                                "block_size": BLOCK}) as log:
        for rows_per_block in (None, 16):
            for length in args.lengths:
                command = [sys.executable, __file__, "--child", str(length)]
                if rows_per_block:
                    command += ["--rows-per-block", str(rows_per_block)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                log.add(**json.loads(output.strip().splitlines()[-1]))
        print(log.table(floatfmt=".1f"))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
