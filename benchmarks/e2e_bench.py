"""End to end on the GPU: an attention-bound video-diffusion-like stack compiled by sparsify vs dense SDPA.

The model is `sparsify.examples.StructuredVideoTransformer` (heads with window, frame-periodic,
in-frame and sink structure) at 16K-32K tokens in bf16. sparsify.compile searches the strategy on
a few calibration batches, rewrites the graph to the chosen backend, and the script times the
compiled model against the same model with dense `F.scaled_dot_product_attention` (the default
backend: cuDNN on Hopper), reporting the speedup and the output error. With ``--compile`` both are
also timed under ``torch.compile`` (Inductor; sparse kernels are custom ops in the graph), so eager
and compiled speedups sit side by side. Prints a table, writes JSON.

    python benchmarks/e2e_bench.py [--frames 64 128] [--layers 4] [--backend auto|fa4|triton] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tabulate import tabulate

import sparsify
from sparsify.examples import StructuredVideoTransformer


def time_cuda(function, repeats: int) -> float:
    """Median milliseconds of ``function`` over ``repeats`` runs (CUDA events, after warm-up)."""
    for _ in range(2):
        function()
    if not torch.cuda.is_available():  # CPU smoke runs
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        return (time.perf_counter() - start) / repeats * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128], help="frames of 16x16 tokens (64: 16K)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backend", default="auto", help="auto (cost model's pick per site), fa4, triton, flex")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models under torch.compile (warm-up calls include the compilation)")
    parser.add_argument("--max-error", type=float, default=0.05)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "e2e_gpu.json"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("e2e_bench needs a CUDA GPU (or --device cpu for a smoke run)")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    rows = []
    for frames in args.frames:
        if args.device == "cuda":
            torch.cuda.empty_cache()
        model = StructuredVideoTransformer(frames=frames, dim=args.heads * args.head_dim, heads=args.heads,
                                           layers=args.layers).eval().to(args.device, dtype)
        batches = [model.example_tokens(seed=1 + i) for i in range(args.batches)]
        start = time.perf_counter()
        compiled = sparsify.compile(model, batches, max_error=args.max_error, backend=args.backend, block_size=128 if args.device == "cuda" else 64, progress=False)
        search_seconds = time.perf_counter() - start
        test = model.example_tokens(seed=100)
        with torch.no_grad():
            dense_ms = time_cuda(lambda: model(test), args.repeats)
            sparse_ms = time_cuda(lambda: compiled(test), args.repeats)
            reference, output = model(test).float(), compiled(test).float()
            if args.compile:
                dense_compiled, sparse_compiled = torch.compile(model), torch.compile(compiled)
                dense_compiled_ms = time_cuda(lambda: dense_compiled(test), args.repeats)
                sparse_compiled_ms = time_cuda(lambda: sparse_compiled(test), args.repeats)
                compiled_error = float((sparse_compiled(test).float() - output).norm() / output.norm())
        error = float((output - reference).norm() / reference.norm())
        summary = compiled.strategy.summary()
        row = {
            "tokens": test.shape[1], "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
            "backend": args.backend, "mean_density": round(summary["mean_density"], 4),
            "dense_ms": round(dense_ms, 2), "sparsify_ms": round(sparse_ms, 2),
            "speedup": round(dense_ms / sparse_ms, 3), "output_rel_error": round(error, 5),
            "search_s": round(search_seconds, 1),
        }
        if args.compile:
            row.update({"dense_compiled_ms": round(dense_compiled_ms, 2),
                        "sparsify_compiled_ms": round(sparse_compiled_ms, 2),
                        "speedup_compiled": round(dense_compiled_ms / sparse_compiled_ms, 3),
                        "compiled_vs_eager_error": round(compiled_error, 6)})
            del dense_compiled, sparse_compiled
            torch._dynamo.reset()
        rows.append(row)
        print(compiled.report())
        del model, compiled
    print(tabulate(rows, headers="keys", tablefmt="github"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "rows": rows}, file, indent=2)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
