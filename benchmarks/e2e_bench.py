"""End to end on the GPU: an attention-bound video-diffusion-like stack compiled by sparsify vs dense SDPA.

The model is `sparsify.toy_models.StructuredVideoTransformer` (heads with window, frame-periodic,
in-frame and sink structure) at 16K-32K tokens in bf16. sparsify.compile searches the strategy on
a few calibration batches, rewrites the graph to the chosen backend, and the script times the
compiled model against the same model with dense `F.scaled_dot_product_attention` (the default
backend: cuDNN on Hopper), reporting the speedup and the output error.

One row per length and mode: ``eager``; with ``--compile`` also ``compiled`` (``torch.compile``,
Inductor; the sparse kernels are custom ops in the graph) and ``reduce-overhead``
(``torch.compile(mode="reduce-overhead")``: CUDA graphs). A mode that fails records its error text
in its row and the run goes on.

The ideal of each row is what the attention density allows (`attention_time`): the dense step
minus its attention-kernel time (torch.profiler, same mode) plus ``density`` x that time;
``fraction_of_ideal = ideal_ms / sparsify_ms``. Each row is printed and written to the JSON file
(``{"meta", "rows", "complete"}``) as soon as it is measured.

    python benchmarks/e2e_bench.py [--frames 64 128] [--layers 4] [--backend auto|fa4|triton] [--compile]
    python benchmarks/e2e_bench.py --device cpu --frames 2 --layers 1 --heads 2 --head-dim 16   # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import sparsify
from attention_time import attention_density, fraction_of_ideal, ideal_step_ms, measure_attention_time
from bench_rows import RowLog
from sparsify.toy_models import StructuredVideoTransformer
from timing import device_description, error_text, median_ms, relative_error

MODES = ("eager", "compiled", "reduce-overhead")


def cudagraph_skips() -> int:
    """How many times Inductor declined CUDA graphs so far in this process (a reduce-overhead row that did not graph)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def wrap(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``module`` as it runs in ``mode``."""
    if mode == "eager":
        return module
    return torch.compile(module, mode="reduce-overhead" if mode == "reduce-overhead" else None)


def ideal_fields(dense_step, sparse_step, dense_ms: float, sparse_ms: float, density: float, device,
                 steps: int, previous_attention_ms: float | None) -> dict:
    """The dense step's attention time (and the sparse step's, for information), the ideal and the fraction of it."""
    attention = measure_attention_time(dense_step, device, steps=steps)
    sparse_attention = measure_attention_time(sparse_step, device, steps=steps)
    attention_ms, source = attention.attention_ms_at(dense_ms), attention.source
    if attention.calls_per_step == 0 and previous_attention_ms is not None:
        # The profiler saw no attention kernels (e.g. replayed from a CUDA graph): they are the previous
        # mode's kernels, so their time is too.
        attention_ms, source = previous_attention_ms, "previous mode's attention kernels (none seen in this mode)"
    fields = {"attention_ms": round(attention_ms, 3), "attention_calls": attention.calls_per_step,
              "attention_source": source, "attention_share": round(attention_ms / dense_ms, 4),
              "sparse_attention_ms": round(sparse_attention.attention_ms_at(sparse_ms), 3)}
    if attention_ms > 0:
        ideal = ideal_step_ms(dense_ms, attention_ms, density)
        fields.update({"ideal_ms": round(ideal, 2), "ideal_speedup": round(dense_ms / ideal, 3),
                       "fraction_of_ideal": round(fraction_of_ideal(ideal, sparse_ms), 3)})
    return fields


def measure_mode(mode: str, model: torch.nn.Module, compiled: sparsify.SparsifiedModule, test: torch.Tensor,
                 reference: torch.Tensor, eager_sparse: torch.Tensor, density: float, args,
                 previous_attention_ms: float | None) -> dict:
    """Time dense and sparse in one mode, measure the dense attention time, and return the row's numbers."""
    device = test.device
    skips_before = cudagraph_skips() if mode == "reduce-overhead" else 0
    dense_module, sparse_module = wrap(model, mode), wrap(compiled, mode)

    def run(module):
        with torch.no_grad():
            return module(test)

    dense_ms = median_ms(lambda: run(dense_module), device, args.repeats, args.warmup)
    sparse_ms = median_ms(lambda: run(sparse_module), device, args.repeats, args.warmup)
    print(f"{mode}: dense {dense_ms:.2f} ms, sparse {sparse_ms:.2f} ms; measuring the attention time", flush=True)
    output = run(sparse_module).float().clone()  # CUDA graphs reuse their output buffers
    row = {"dense_ms": round(dense_ms, 2), "sparsify_ms": round(sparse_ms, 2), "speedup": round(dense_ms / sparse_ms, 3),
           "output_rel_error": round(relative_error(output, reference), 5)}
    try:  # the timings above stay in the row whatever happens here
        row.update(ideal_fields(lambda: run(dense_module), lambda: run(sparse_module), dense_ms, sparse_ms, density,
                                device, args.attention_steps, previous_attention_ms))
    except Exception as error:
        row["ideal_error"] = error_text(error)
    if mode != "eager":
        row["vs_eager_error"] = round(relative_error(output, eager_sparse), 6)
    if mode == "reduce-overhead":
        row["cudagraph_skips"] = cudagraph_skips() - skips_before
    return row


def bench_length(frames: int, modes: tuple[str, ...], device: torch.device, dtype: torch.dtype, args,
                 log: RowLog) -> None:
    """Search a strategy for one length, then one row per mode (a mode that fails logs its error and the next runs)."""
    model = StructuredVideoTransformer(frames=frames, dim=args.heads * args.head_dim, heads=args.heads,
                                       layers=args.layers).eval().to(device, dtype)
    batches = [model.example_tokens(seed=1 + i) for i in range(args.batches)]
    start = time.perf_counter()
    budget = ({"max_error": args.max_error} if args.max_error is not None
              else {"max_output_error": args.max_output_error})
    compiled = sparsify.compile(model, batches, **budget, backend=args.backend,
                                block_size=128 if device.type == "cuda" else 64, progress=False)
    search_seconds = time.perf_counter() - start
    print(compiled.report(), flush=True)
    test = model.example_tokens(seed=100)
    with torch.no_grad():
        reference = model(test).float()
        eager_sparse = compiled(test).float()
    density = attention_density(compiled.strategy, compiled.sites)
    common = {"tokens": test.shape[1], "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
              "backend": args.backend, **budget, "mean_density": round(compiled.strategy.summary()["mean_density"], 4),
              "attention_density": round(density, 4), "search_s": round(search_seconds, 1)}
    previous_attention_ms = None
    for mode in modes:
        try:
            row = measure_mode(mode, model, compiled, test, reference, eager_sparse, density, args,
                               previous_attention_ms)
        except Exception as error:  # the row says what failed; the other modes still run
            row = {"error": error_text(error)}
        log.add(mode=mode, **common, **row)
        if row.get("attention_calls"):
            previous_attention_ms = row["attention_ms"]
        if mode != "eager":
            torch._dynamo.reset()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128], help="frames of 16x16 tokens (64: 16K)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backend", default="auto", help="auto (cost model's pick per site), fa4, triton, flex")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models under torch.compile and torch.compile(mode='reduce-overhead') "
                             "(warm-up calls include the compilation)")
    parser.add_argument("--max-output-error", type=float, default=0.0017,
                        help="the model-level budget (relative L2 of the output; 0.0017: the error the per-site "
                             "5%% budget gave in earlier runs, so speeds compare at equal quality)")
    parser.add_argument("--max-error", type=float, default=None,
                        help="a per-site budget instead (the search before the model-level budget; 0.05 then)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (3: CUDA graphs record)")
    parser.add_argument("--attention-steps", type=int, default=3, help="steps profiled for the attention time")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/e2e_<cuda|cpu>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("e2e_bench needs a CUDA GPU (or --device cpu for a smoke run)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"e2e_{device.type}.json")
    modes = MODES if args.compile else MODES[:1]
    log = RowLog(out, meta={"benchmark": "e2e", "device": device_description(device), "torch": torch.__version__,
                            "dtype": str(dtype).replace("torch.", ""), "modes": list(modes),
                            "ideal": "dense_ms - attention_ms + density * attention_ms (attention kernels of the "
                                     "dense step, torch.profiler, same mode)", "args": vars(args)})
    with log:
        for frames in args.frames:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                bench_length(frames, modes, device, dtype, args, log)
            except Exception as error:  # e.g. out of memory in the search: the next length still runs
                log.add(mode="search", tokens=frames * 16 * 16, error=error_text(error))
        print(log.table(), flush=True)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
