"""Benchmark exported ONNX models in onnxruntime: sparse exports (fixed- and any-length) vs the same model exported dense.

How "the attention part" is isolated: the timed model is a single attention layer,
``forward(q, k, v) = F.scaled_dot_product_attention(q, k, v)`` (B=1, H=8, D=64), so the ONNX
graph holds nothing but the attention. Every file goes through the user's path:
``sparsify.compile`` with a strategy (all dense, or ``sliding_window(w) | attention_sinks(64)``
on every head, block 64, ``w`` chosen for the target density) and ``sparsify.export_onnx``:

* ``dense``: the dense model at the default opset (``MatMul → Softmax → MatMul``);
* ``dense_attention_op``: the dense model at opset 23 (one ONNX ``Attention`` node);
* ``fixed``: the sparse model, ``lengths="fixed"`` at the timed length (block tables as constants);
* ``any``: the sparse model, ``lengths="any"``, exported from inputs of another length (tables
  computed in the graph from the run-time length).

Sessions are timed alternately in one run (median of ``--repeats`` calls each, after warm-up),
so machine noise hits all alike; ``speedup = dense / sparse``, ``1 / density`` the ideal, and
``fraction_of_ideal = speedup * density``. ``any_over_fixed`` is the any-length file's time over
the fixed one's. onnxruntime runs with ``--threads`` intra-op threads (one row per count); on a
small machine shared with other jobs, a thread pool as wide as the cores mostly measures the
contention. ``--provider CUDAExecutionProvider`` times on the GPU (inputs and outputs bound on
the device with IO binding, so host copies are not timed).

    python benchmarks/onnx_bench.py --seq 2048 4096 8192 --densities 0.05 0.12 0.25 --threads 1 2
    python benchmarks/onnx_bench.py --device cuda --quick     # GPU: skips with a message without the CUDA provider
"""

from __future__ import annotations

import argparse
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
from bench_rows import RowLog
from sparsify import Strategy, patterns
from sparsify.cost import device_name
from sparsify.export import export_onnx

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "onnx_cpu.json"
SINKS = 64
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: ``--device`` to onnxruntime execution provider.
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: What ``--quick`` runs: one length, one density, one thread count, few repeats.
_QUICK = {"seq": [2048], "densities": [0.12], "threads": [1], "repeats": 3}


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


class Runner:
    """One onnxruntime session and a call that runs it on fixed inputs (bound on the device for GPU providers)."""

    def __init__(self, path: pathlib.Path, provider: str, threads: int, feeds: dict[str, np.ndarray]):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        start = time.perf_counter()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=[provider])
        self.init_s = time.perf_counter() - start
        self.feeds = feeds
        self.binding = None
        if provider != "CPUExecutionProvider":
            device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
            self.binding = self.session.io_binding()
            for name, array in feeds.items():
                self.binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(array, device, 0))
            for output in self.session.get_outputs():
                self.binding.bind_output(output.name, device)

    def __call__(self):
        if self.binding is None:
            return self.session.run(None, self.feeds)
        self.session.run_with_iobinding(self.binding)
        return None

    def output(self) -> np.ndarray:
        if self.binding is None:
            return self.session.run(None, self.feeds)[0]
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[0]


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


def export_files(model, inputs, pattern, block: int, workdir: pathlib.Path, tag: str, other_length_inputs):
    """The four files of one case, and the sparse compiled module (the correctness reference)."""
    # Captured from batch 2 (a batch-1 capture fixes the batch size), exported and timed at batch 1.
    capture_inputs = tuple(torch.cat([t, t]) for t in inputs)
    sites = sparsify.find_attention(model, capture_inputs)
    # dynamic="all": q/k/v are [batch, heads, seq, dim], whose sequence is not where a token input's is.
    dense = sparsify.compile(model, strategy=Strategy.dense(sites, block_size=block), example_inputs=capture_inputs,
                             dynamic="all")
    sparse = sparsify.compile(model, strategy=Strategy.uniform(sites, pattern, block_size=block),
                              example_inputs=capture_inputs, backend="torch", dynamic="all")
    files = {
        "dense": export_onnx(dense, inputs, workdir / f"{tag}_dense.onnx", lengths="fixed"),
        "dense_attention_op": export_onnx(dense, inputs, workdir / f"{tag}_dense_op.onnx", lengths="fixed", opset=23),
        "fixed": export_onnx(sparse, inputs, workdir / f"{tag}_fixed.onnx", lengths="fixed"),
        "any": export_onnx(sparse, other_length_inputs, workdir / f"{tag}_any.onnx", lengths="any"),
    }
    return sparse, files


def bench_case(model, inputs: tuple, seq: int, target: float, args, workdir: pathlib.Path, label: str,
               log: RowLog) -> list[dict]:
    block = args.block
    pattern, density = window_pattern(seq, block, target)
    other = tuple(t[..., : seq // 2 + 17, :] if t.dim() == 4 else t[:, : seq // 2 + 17] for t in inputs)
    sparse, files = export_files(model, inputs, pattern, block, workdir, f"{label}_{seq}_{target}", other)
    feeds = {name: t.numpy() for name, t in zip(files["dense"].input_names, inputs)}
    with torch.no_grad():
        expected = sparse(*inputs).float().numpy()
    rows = []
    for threads in args.threads:
        runners = {name: Runner(file.path, args.provider, threads, feeds) for name, file in files.items()}
        errors = {}
        for name in ("fixed", "any"):       # correctness first: the sparse files equal the compiled module
            got = runners[name].output().astype(np.float32)
            errors[name] = float(np.abs(got - expected).max() / np.abs(expected).max())
        times = interleaved_median_ms(runners, args.repeats)
        speedup = times["dense"] / times["fixed"]
        row = {
            "model": label, "seq": seq, "threads": threads, "pattern": str(pattern), "target_density": target,
            "density": round(density, 4),
            **{f"{name}_ms": round(value, 2) for name, value in times.items()},
            "speedup": round(speedup, 2),
            "speedup_any": round(times["dense"] / times["any"], 2),
            "speedup_vs_attention_op": round(times["dense_attention_op"] / times["fixed"], 2),
            "ideal_speedup": round(1 / density, 2),
            # The ideal is for the attention part; end-to-end rows also run unchanged projections/MLPs.
            "fraction_of_ideal": round(speedup * density, 2) if label == "attention" else None,
            "fraction_of_ideal_any": round(times["dense"] / times["any"] * density, 2) if label == "attention" else None,
            "any_over_fixed": round(times["any"] / times["fixed"], 3),
            "max_rel_error_vs_torch": {name: float(f"{value:.2e}") for name, value in errors.items()},
            "session_init_s": {name: round(runner.init_s, 2) for name, runner in runners.items()},
            "load_average": [round(x, 2) for x in os.getloadavg()],          # the machine's, right after timing
            "file_mb": {name: round(file.path.stat().st_size / 2**20, 2) for name, file in files.items()},
        }
        print(f"{label} seq={seq} threads={threads} density={density:.3f}: dense {times['dense']:.1f} ms "
              f"(Attention op {times['dense_attention_op']:.1f}), fixed {times['fixed']:.1f} ms, any "
              f"{times['any']:.1f} ms; {speedup:.2f}x of ideal {1 / density:.2f}x, any/fixed "
              f"{row['any_over_fixed']:.2f} (max rel err {max(errors.values()):.1e})", flush=True)
        rows.append(log.add(**row))  # written at once: a later crash keeps it
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.12, 0.25])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="onnxruntime intra-op thread counts, one row each (0 = onnxruntime's default)")
    parser.add_argument("--device", choices=sorted(_PROVIDERS), default=None,
                        help="cpu or cuda: shorthand for --provider (cuda skips with a message, exit 0, when this "
                             "onnxruntime has no CUDA provider)")
    parser.add_argument("--provider", default=None,
                        help=f"onnxruntime execution provider (default CPUExecutionProvider; available here: "
                             f"{', '.join(onnxruntime.get_available_providers())})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: seq {_QUICK['seq']}, density {_QUICK['densities']}, threads "
                             f"{_QUICK['threads']}, {_QUICK['repeats']} repeats (overrides those options)")
    parser.add_argument("--end-to-end", action="store_true", help="also time VideoTransformer (4 layers, dim 256)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON results (default: benchmarks/results/onnx_<cpu|gpu>.json)")
    args = parser.parse_args(argv)
    if args.device is not None and args.provider is not None and args.provider != _PROVIDERS[args.device]:
        parser.error(f"--device {args.device} and --provider {args.provider} disagree; give one of them")
    args.provider = args.provider or _PROVIDERS[args.device or "cpu"]
    if args.quick:
        for name, value in _QUICK.items():
            setattr(args, name, value)
    if args.device == "cuda" and args.provider not in onnxruntime.get_available_providers():
        print(f"skipped: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (available: "
              f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu for the GPU comparison")
        return
    if args.provider not in onnxruntime.get_available_providers():
        parser.error(f"provider {args.provider!r} is not available in this onnxruntime; available: "
                     f"{', '.join(onnxruntime.get_available_providers())}")
    out = args.out or DEFAULT_OUT.with_name("onnx_cpu.json" if args.provider == "CPUExecutionProvider" else "onnx_gpu.json")
    dtype = _DTYPES[args.dtype]

    meta = {
        "benchmark": "onnx",
        "config": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "block": args.block,
                   "dtype": args.dtype, "pattern": f"sliding_window(w) | attention_sinks({SINKS}), non-causal",
                   "attention_model": "SingleAttention: F.scaled_dot_product_attention(q, k, v) only",
                   "end_to_end_model": "VideoTransformer(dim=256, heads=4, layers=4)" if args.end_to_end else None,
                   "files": {"dense": "default opset, MatMul/Softmax chain", "dense_attention_op": "opset 23, Attention",
                             "fixed": "lengths='fixed'", "any": "lengths='any', exported at seq // 2 + 17 tokens"},
                   "repeats": args.repeats, "statistic": "median, all files' runs interleaved",
                   "provider": args.provider},
        "machine": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "cpu": device_name("cpu"),
                    "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                    "note": "CPU: shared machine; files are interleaved so each ratio is measured under the same load"},
    }
    torch.manual_seed(0)
    with RowLog(out, meta=meta, echo=False) as log, tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        for seq in args.seq:
            qkv = tuple(torch.randn(1, args.heads, seq, args.head_dim).to(dtype) for _ in range(3))
            for target in args.densities:
                bench_case(SingleAttention().eval(), qkv, seq, target, args, workdir, "attention", log)
            if args.end_to_end:
                model = sparsify.toy_models.VideoTransformer(256, 4, 4).eval().to(dtype)
                tokens = (torch.randn(1, seq, 256).to(dtype),)
                for target in args.densities:
                    bench_case(model, tokens, seq, target, args, workdir, "video_transformer", log)

        headers = {"model": "model", "seq": "seq", "threads": "threads", "density": "density", "dense_ms": "dense ms",
                   "dense_attention_op_ms": "dense (Attention op) ms", "fixed_ms": "sparse fixed ms",
                   "any_ms": "sparse any-length ms", "speedup": "speedup", "fraction_of_ideal": "of ideal",
                   "fraction_of_ideal_any": "of ideal (any)", "any_over_fixed": "any / fixed"}
        print(tabulate([[row[key] for key in headers] for row in log.rows], headers=list(headers.values()),
                       tablefmt="github"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
