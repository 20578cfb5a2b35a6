"""Benchmark exported ONNX models in onnxruntime (CPU): sparse export vs the same model exported dense.

How "the attention part" is isolated: the timed model is a single attention layer,
``forward(q, k, v) = F.scaled_dot_product_attention(q, k, v)`` (B=1, H=8, D=64, fp32), so the
ONNX graph holds nothing but the attention: the dense export is ``MatMul → Softmax → MatMul``, the
sparse export the block gather of `sparsify.export` (gather kept K/V blocks, MatMul, bias,
Softmax, MatMul). Both go through the same path: ``sparsify.compile`` with a strategy (all
dense, or window + sinks on every head, block 64) and ``sparsify.export_onnx``. ``--end-to-end``
adds `sparsify.examples.VideoTransformer` (4 layers, dim 256, 4 heads) for context, where the
projections and MLPs are not sped up.

Dense and sparse sessions are timed alternately in one run (median of ``--repeats`` calls each,
after warm-up), so machine noise hits both alike; the ratio is the speedup, ``1 / density`` the
ideal. onnxruntime runs with one intra-op thread by default: on a small machine shared with other
jobs, a thread pool as wide as the cores mostly measures the contention (spinning threads waiting
for a core), in both models; ``--threads 0`` uses onnxruntime's default.

    python benchmarks/onnx_bench.py --seq 2048 4096 --densities 0.12 0.25 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
from tabulate import tabulate

import sparsify
from sparsify import Strategy, patterns
from sparsify.export import export_onnx
from sparsify.cost import device_name

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "onnx_cpu.json"
SINKS = 64


class SingleAttention(torch.nn.Module):
    """Just the attention: what the benchmark isolates."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def window_pattern(seq: int, block: int, target: float):
    """``sliding_window(w) | attention_sinks(64)`` with block density closest to ``target``."""
    blocks = -(-seq // block)
    best = None
    for window in range(0, seq, block // 2):
        pattern = patterns.attention_sinks(SINKS)
        if window:
            pattern = patterns.sliding_window(window) | pattern
        density = pattern.density(blocks, blocks, block_size=block, q_len=seq, k_len=seq)
        if best is None or abs(density - target) < abs(best[1] - target):
            best = (pattern, density)
        if density > target * 1.5:
            break
    return best


def session(path: pathlib.Path, threads: int) -> tuple[onnxruntime.InferenceSession, float]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    start = time.perf_counter()
    result = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return result, time.perf_counter() - start


def interleaved_median_ms(runs: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def export_pair(model, inputs, sites, pattern, block: int, workdir: pathlib.Path, tag: str):
    # Captured from batch 2 (a batch-1 capture fixes the batch size), exported and timed at batch 1.
    capture_inputs = tuple(torch.cat([t, t]) for t in inputs)
    dense = sparsify.compile(model, strategy=Strategy.dense(sites, block_size=block), example_inputs=capture_inputs)
    sparse = sparsify.compile(model, strategy=Strategy.uniform(sites, pattern, block_size=block),
                              example_inputs=capture_inputs, backend="torch")
    dense_file = export_onnx(dense, inputs, workdir / f"{tag}_dense.onnx")
    sparse_file = export_onnx(sparse, inputs, workdir / f"{tag}_sparse.onnx")
    return sparse, dense_file, sparse_file


def bench_case(model, inputs: tuple, seq: int, target: float, args, workdir: pathlib.Path, label: str) -> dict:
    block = args.block
    sites = sparsify.find_attention(model, inputs)
    pattern, density = window_pattern(seq, block, target)
    sparse, dense_file, sparse_file = export_pair(model, inputs, sites, pattern, block, workdir, f"{label}_{seq}_{target}")
    dense_session, dense_init = session(dense_file.path, args.threads)
    sparse_session, sparse_init = session(sparse_file.path, args.threads)
    feeds = {name: t.numpy() for name, t in zip(dense_file.input_names, inputs)}
    # Correctness first: the sparse ONNX model equals the compiled PyTorch module.
    with torch.no_grad():
        expected = sparse(*inputs).numpy()
    got = sparse_session.run(None, feeds)[0]
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    times = interleaved_median_ms({"dense": lambda: dense_session.run(None, feeds),
                                   "sparse": lambda: sparse_session.run(None, feeds)}, args.repeats)
    speedup = times["dense"] / times["sparse"]
    row = {
        "model": label,
        "seq": seq,
        "pattern": str(pattern),
        "target_density": target,
        "density": round(density, 4),
        "dense_ms": round(times["dense"], 2),
        "sparse_ms": round(times["sparse"], 2),
        "speedup": round(speedup, 2),
        "ideal_speedup": round(1 / density, 2),
        # The ideal is for the attention part; end-to-end rows also run unchanged projections/MLPs.
        "fraction_of_ideal": round(speedup * density, 2) if label == "attention" else None,
        "max_rel_error_vs_torch": float(f"{error:.2e}"),
        "session_init_s": {"dense": round(dense_init, 2), "sparse": round(sparse_init, 2)},
        "file_mb": {"dense": round(dense_file.path.stat().st_size / 2**20, 2),
                    "sparse": round(sparse_file.path.stat().st_size / 2**20, 2)},
    }
    print(f"{label} seq={seq} density={density:.3f}: dense {times['dense']:.1f} ms, sparse {times['sparse']:.1f} ms, "
          f"{speedup:.2f}x of ideal {1 / density:.2f}x (max rel err {error:.1e})", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.12, 0.25])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads (default 1; 0 = onnxruntime's default, all cores)")
    parser.add_argument("--end-to-end", action="store_true", help="also time VideoTransformer (4 layers, dim 256)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        for seq in args.seq:
            qkv = tuple(torch.randn(1, args.heads, seq, args.head_dim) for _ in range(3))
            for target in args.densities:
                rows.append(bench_case(SingleAttention().eval(), qkv, seq, target, args, workdir, "attention"))
            if args.end_to_end:
                model = sparsify.examples.VideoTransformer(256, 4, 4).eval()
                tokens = (torch.randn(1, seq, 256),)
                for target in args.densities:
                    rows.append(bench_case(model, tokens, seq, target, args, workdir, "video_transformer"))

    headers = {"model": "model", "seq": "seq", "density": "density", "dense_ms": "dense ONNX ms",
               "sparse_ms": "sparse ONNX ms", "speedup": "speedup", "ideal_speedup": "ideal (1/density)",
               "fraction_of_ideal": "of ideal"}
    print(tabulate([[row[key] for key in headers] for row in rows], headers=list(headers.values()),
                   tablefmt="github"))

    result = {
        "benchmark": "onnx_cpu",
        "config": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "block": args.block,
                   "dtype": "float32", "pattern": f"sliding_window(w) | attention_sinks({SINKS}), non-causal",
                   "attention_model": "SingleAttention: F.scaled_dot_product_attention(q, k, v) only",
                   "end_to_end_model": "VideoTransformer(dim=256, heads=4, layers=4)" if args.end_to_end else None,
                   "repeats": args.repeats, "statistic": "median, dense and sparse runs interleaved",
                   "provider": "CPUExecutionProvider", "intra_op_threads": args.threads},
        "machine": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "cpu": device_name("cpu"),
                    "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                    "note": "2 cores shared with other jobs: numbers are noisy; dense and sparse are "
                            "interleaved so each ratio is measured under the same load"},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
