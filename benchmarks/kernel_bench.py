"""Block-sparse attention kernels side by side against dense SDPA on one GPU: fa4, triton, flex, torch.

For every sequence length, block density and pattern it times each backend (`sparsify.backends`:
``prepare`` once, ``run`` timed, as a compiled model calls them) on the same runtime mask, and
dense ``F.scaled_dot_product_attention`` (default backend: cuDNN on Hopper), all in the same
process, and reports per backend

* ``frac_ideal``: ``speedup_vs_sdpa * density`` (1.0 = time proportional to kept blocks),
* for dense rows (100%): the backend's speed over SDPA's,
* host time per call at S=1024 (`host_time`): the backend's ``run`` alone, one sparse site called
  eagerly (a `sparsify.compile`d single-attention module) and the same site under
  ``torch.compile``, next to SDPA eager and compiled, all in the same run.

Host time per call is defined as the wall time the host takes to *issue* ``--host-calls``
back-to-back calls (no synchronisation between them; the clock stops when the last call returns,
before the final synchronise), divided by the number of calls, best of three, after warm-up. At
1K tokens a call's kernels are shorter than its host work, so the GPU never throttles the loop and
this is the host's cost per call. Each row also gives the GPU time per call over the same loop
(``gpu_us``, CUDA events: kernels plus the idle gaps the host leaves — equal to the host time when the
host is the bottleneck), the device time alone (``device_us``: calls queued behind a sleeping kernel,
then run back to back) and ``host_bound`` (host time >= device time: the GPU waits on the host).

Every row is printed and written to the JSON file (``{"meta", "rows", "complete"}``) as soon as it
is measured; rows carry ``table``: ``grid``, ``host`` or ``tune``.

Usage (on the GPU machine)::

    python benchmarks/kernel_bench.py                       # full grid + host time, writes kernel_bench.json
    python benchmarks/kernel_bench.py --seq 8192 16384 --density 10 100 --backends fa4 triton
    python benchmarks/kernel_bench.py --host-time-only --backends fa4 triton   # the host-time table only
    python benchmarks/kernel_bench.py --host-time-only --device cpu --backends torch   # CPU smoke run
    python benchmarks/kernel_bench.py --tune                # sweep the triton kernel's tile configs

Grid timings are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from bench_rows import RowLog
from timing import error_text, profiled

PATTERNS = ("window", "random", "mixed")


def block_masks(pattern: str, heads: int, blocks: int, density: float, causal: bool,
                gen: torch.Generator) -> torch.Tensor:
    """Bool ``[heads, blocks, blocks]`` block masks of about ``density`` (of the causal area if causal)."""
    rows = torch.arange(blocks).view(blocks, 1)
    cols = torch.arange(blocks).view(1, blocks)
    if pattern == "window":
        if causal:  # the last `width` blocks up to the diagonal
            width = max(1, round(density * (blocks + 1) / 2))
            mask = (cols <= rows) & (cols > rows - width)
        else:  # a band of `width` blocks centred on the diagonal, shifted inward at the edges
            width = max(1, round(density * blocks))
            start = (rows - width // 2).clamp(0, blocks - width)
            mask = (cols >= start) & (cols < start + width)
        return mask.expand(heads, blocks, blocks).clone()
    if pattern == "random":
        per_head = [density] * heads
    elif pattern == "mixed":  # heads from 0.2x to 1.8x the mean density: load-balance test
        per_head = [min(1.0, density * (0.2 + 1.6 * h / max(1, heads - 1))) for h in range(heads)]
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    masks = torch.zeros(heads, blocks, blocks, dtype=torch.bool)
    for h, d in enumerate(per_head):
        score = torch.rand(blocks, blocks, generator=gen)
        if causal:
            score = score.masked_fill(cols > rows, 2.0)  # never pick above the diagonal
            keep = (rows + 1).float() * d
        else:
            keep = torch.full((blocks, 1), blocks * d)
        k = keep.round().clamp(min=1).long()
        ranks = score.argsort(-1).argsort(-1)
        masks[h] = ranks < k
        masks[h].diagonal().fill_(True)  # the diagonal block keeps every row non-empty
    return masks


def bench(fn, reps_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(10, reps_ms // 4), rep=reps_ms, return_mode="median")


def bench_graph(fn, reps_ms: int) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (no Python/launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, reps_ms)


def make_inputs(seq, heads, dim, dtype, gen_seed=0):
    torch.manual_seed(gen_seed)
    shape = (1, heads, seq, dim)
    return [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3)]


def mask_for(pattern, seq, heads, density, block, causal, seed=0, device="cuda"):
    """A runtime mask on ``device`` and its density (of the causal area when causal)."""
    from sparsify.block_mask import RuntimeBlockMask

    gen = torch.Generator().manual_seed(seed)
    blocks = -(-seq // block)
    masks = block_masks(pattern, heads, blocks, density, causal, gen)
    mask = RuntimeBlockMask.from_block_masks(masks.to(device), block_size=block, q_len=seq, k_len=seq, causal=causal)
    area = blocks * (blocks + 1) / 2 if causal else blocks * blocks
    return mask, float(masks.sum()) / (heads * area)


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def available_backends(names: list[str], device: torch.device | str = "cuda") -> dict:
    """The named backends that run here (the others are reported and skipped)."""
    from sparsify.backends import get_backend

    found = {}
    for name in names:
        backend = get_backend(name)
        reason = backend.availability(device)
        if reason:
            print(f"backend {name}: skipped ({reason})", flush=True)
        else:
            found[name] = backend
    return found


def run_grid(args, log: RowLog) -> list[dict]:
    backends = available_backends(args.backends)
    log.update_meta(backends=list(backends))
    dtype = getattr(torch, args.dtype)
    rows = []
    for seq in args.seq:
        q, k, v = make_inputs(seq, args.heads, args.dim, dtype)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)  # noqa: E731
        t_sdpa = bench(sdpa, args.rep_ms)
        reference_dense = sdpa()
        flops = 4 * seq * seq * args.dim * args.heads * (0.5 if args.causal else 1.0)
        print(f"S={seq}: sdpa {t_sdpa:.3f} ms ({flops / t_sdpa / 1e9:.0f} TFLOP/s)", flush=True)
        for pattern in args.patterns:
            for pct in args.density:
                if pct >= 100 and pattern != args.patterns[0]:
                    continue  # dense is dense whatever the pattern
                mask, density = mask_for(pattern, seq, args.heads, pct / 100, args.block, args.causal)
                row = {"table": "grid", "seq": seq, "pattern": "dense" if pct >= 100 else pattern,
                       "density_target": pct / 100, "density": density, "sdpa_ms": t_sdpa}
                reference = None
                for name, backend in backends.items():
                    if name == "torch" and seq > args.torch_max_seq:
                        continue
                    plan = None
                    try:
                        plan = backend.prepare(mask, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=dtype,
                                               device=q.device)
                        with torch.no_grad():
                            out = backend.run(plan, q, k, v)
                            if reference is None:
                                reference = get_reference(mask, q, k, v, pct, reference_dense, seq)
                            row[f"{name}_err"] = rel_err(out, reference)
                            t = bench(lambda: backend.run(plan, q, k, v), args.rep_ms)
                        row[f"{name}_ms"] = t
                        row[f"{name}_frac_ideal"] = t_sdpa / t * density
                        if seq <= args.graph_max_seq and backend.features.cuda_graphs:
                            with torch.no_grad():
                                t_graph = bench_graph(lambda: backend.run(plan, q, k, v), args.rep_ms)
                            row[f"{name}_graph_ms"] = t_graph
                    except Exception as err:  # report and keep going
                        row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:300]
                    del plan
                rows.append(log.add(**row))  # written at once: partial results survive a time limit
                print(format_row(row, list(backends)), flush=True)
                del mask
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def get_reference(mask, q, k, v, pct, reference_dense, seq):
    """Dense SDPA for dense rows; the torch backend in float32 for sparse ones (chunked: no seq x seq)."""
    from sparsify.backends import get_backend

    if pct >= 100:
        return reference_dense
    return get_backend("torch").attention(q.float(), k.float(), v.float(), mask)


class SingleAttention(torch.nn.Module):
    """One attention call: the model whose single site the host-time table compiles."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def issue_time_us(function, device: torch.device, calls: int, warmup: int = 20, rounds: int = 3) -> dict:
    """Host microseconds to issue one call (see the module docstring), and GPU microseconds per call over the loop."""
    for _ in range(warmup):
        function()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    best_host, best_wall, gpu_us = float("inf"), float("inf"), None
    for _ in range(rounds):  # best of a few: the host is noisy
        if cuda:
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
        begin = time.perf_counter()
        for _ in range(calls):
            function()
        issued = time.perf_counter()
        if cuda:
            end_event.record()
            torch.cuda.synchronize(device)
        finished = time.perf_counter()
        if (issued - begin) < best_host * calls / 1e6:
            best_host = (issued - begin) / calls * 1e6
            best_wall = (finished - begin) / calls * 1e6
            gpu_us = start_event.elapsed_time(end_event) / calls * 1e3 if cuda else None
    result = {"host_us": round(best_host, 2), "wall_us": round(best_wall, 2)}
    if gpu_us is not None:
        device_us = queued_device_us(function, device, calls=min(calls, 40), host_us=best_host)
        result.update(gpu_us=round(gpu_us, 2), device_us=round(device_us, 2), host_bound=best_host >= device_us)
    return result


def queued_device_us(function, device: torch.device, calls: int, host_us: float) -> float:
    """GPU microseconds per call with no host gaps: the calls are queued behind a sleeping kernel first.

    In the issue loop the GPU time per call equals the host's whenever the host is the bottleneck
    (the GPU waits in between), so it cannot tell host-bound from device-bound. Here the device
    sleeps while the host queues ``calls`` calls (few enough not to fill the launch queue), then
    runs them back to back: the events time the kernels alone.
    """
    torch.cuda.synchronize(device)
    sleep_cycles = int(2.0e9 * max(0.05, 3 * calls * host_us / 1e6))   # ~3x the issue time at <= 2 GHz
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(sleep_cycles)
    start_event.record()
    for _ in range(calls):
        function()
    end_event.record()
    torch.cuda.synchronize(device)
    return start_event.elapsed_time(end_event) / calls * 1e3


def host_time(args, log: RowLog) -> list[dict]:
    """Host time per call at S=1024: SDPA, each backend's ``run``, and one sparse site eager and under torch.compile.

    Rows (``table="host"``), one per call kind: ``sdpa eager``, ``sdpa torch.compile``, and per
    available backend ``<name> run`` (``prepare`` once, ``run`` per call), ``<name> site eager``
    (a `sparsify.compile`d module whose one site runs the backend) and ``<name> site torch.compile``
    (that module under ``torch.compile``). A call that fails records its error and the others go on.
    """
    import sparsify
    from sparsify import patterns

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    seq = args.host_seq
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, seq, args.dim, generator=generator).to(device, dtype) for _ in range(3))
    model = SingleAttention().eval()
    sites = sparsify.find_attention(model, (q, k, v))
    pattern = patterns.sliding_window(2 * args.block) | patterns.attention_sinks(args.block)
    strategy = sparsify.Strategy.uniform(sites, pattern, block_size=args.block)
    density = strategy.summary()["mean_density"]
    calls = {"sdpa eager": lambda: lambda: model(q, k, v),
             "sdpa torch.compile": lambda: (lambda compiled: lambda: compiled(q, k, v))(torch.compile(model))}
    for name, backend in available_backends(args.backends, device).items():
        def run_call(backend=backend):
            mask, _ = mask_for("window", seq, args.heads, density, args.block, False, device=device)
            plan = backend.prepare(mask, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=dtype, device=device)
            return lambda: backend.run(plan, q, k, v)

        def site_call(compile_it: bool, name=name):
            sparse = sparsify.compile(model, strategy=strategy, example_inputs=(q, k, v), backend=name)
            sparse = torch.compile(sparse) if compile_it else sparse
            return lambda: sparse(q, k, v)

        calls[f"{name} run"] = run_call
        calls[f"{name} site eager"] = lambda site_call=site_call: site_call(False)
        calls[f"{name} site torch.compile"] = lambda site_call=site_call: site_call(True)
    rows = []
    for label, make in calls.items():
        row = {"table": "host", "call": label, "seq": seq, "heads": args.heads, "dim": args.dim,
               "site_density": round(density, 4), "calls": args.host_calls}
        try:
            with torch.no_grad():
                row.update(issue_time_us(make(), device, args.host_calls))
        except Exception as error:  # report and keep going
            row["error"] = error_text(error)
        rows.append(log.add(**row))
        if args.profile_host and label != "sdpa eager" and "error" not in row:
            profile_host(label, make(), device)
        print(f"host time, {label}: " + (f"{row['host_us']:.1f} us per call" if "host_us" in row else row["error"])
              + (f" (GPU {row['gpu_us']:.1f} us per call)" if "gpu_us" in row else ""), flush=True)
    torch._dynamo.reset()
    return rows


def profile_host(label: str, function, device: torch.device, calls: int = 500) -> None:
    """Print cProfile's top entries for ``calls`` calls of ``function`` (where a call's host time goes)."""
    with torch.no_grad():
        stats = profiled(function, calls, warmup=10)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"--- cProfile, {label}, {calls} calls")
    stats.sort_stats("tottime").print_stats(12)


def format_row(row: dict, names: list[str]) -> str:
    cells = []
    for name in names:
        if f"{name}_ms" in row:
            value = row["sdpa_ms"] / row[f"{name}_ms"] if row["pattern"] == "dense" else row[f"{name}_frac_ideal"]
            cells.append(f"{name} {row[f'{name}_ms']:8.3f}ms {value:5.2f}")
        elif f"{name}_error" in row:
            cells.append(f"{name} ERROR")
    return f"{row['seq']:>6} {row['pattern']:>7} {100 * row['density']:6.1f}% sdpa {row['sdpa_ms']:8.3f} | " + " | ".join(cells)


def run_tune(args, log: RowLog) -> list[dict]:
    """Time the kernel over a small list of tile configs (per head dim and block size)."""
    from sparsify.backends import triton_kernels as kernels

    dtype = getattr(torch, args.dtype)
    configs = [(kernels.KernelConfig(*c), tma) for c, tma in (
        ((128, 128, 8, 3), True), ((128, 128, 8, 2), True), ((128, 64, 8, 3), True),
        ((128, 64, 8, 2), True), ((64, 64, 4, 3), True), ((128, 128, 8, 2), False))]
    results = []
    for seq, dim in [(s, d) for s in args.seq for d in args.tune_dims]:
        q, k, v = make_inputs(seq, args.heads, dim, dtype)
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal), args.rep_ms)
        for block in args.tune_blocks:
            for pct in (5, 25, 100):
                mask, density = mask_for("random", seq, args.heads, pct / 100, block, args.causal)
                plan = kernels.plan_launch(mask, q.device)
                reference = kernels.block_sparse_attention(q, k, v, plan, use_tma=False,
                                                           config=kernels.KernelConfig(64, 64, 4, 2))
                for cfg, tma in configs:
                    if block % cfg.block_m or block % cfg.block_n:
                        continue
                    try:
                        fn = lambda: kernels.block_sparse_attention(  # noqa: E731
                            q, k, v, plan, config=cfg, use_tma=tma)
                        err = rel_err(fn(), reference)
                        t = bench(fn, args.rep_ms)
                    except Exception as err:
                        print(f"D={dim} bs={block} {cfg}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                        continue
                    row = {"table": "tune", "seq": seq, "dim": dim, "block": block, "density": density, "tma": tma,
                           "config": list(vars(cfg).values()),
                           "ms": t, "sdpa_ms": t_sdpa, "frac_ideal": t_sdpa / t * density, "err": err}
                    results.append(log.add(**row))
                    print(f"S={seq} D={dim:3} bs={block:3} dens={100 * density:5.1f}% {cfg} tma={tma:d} {t:7.3f} ms "
                          f"ideal {row['frac_ideal']:.3f} err {err:.1e}", flush=True)
        del q, k, v
    return results


def summary(rows: list[dict], names: list[str]) -> str:
    lines = ["", "fraction of ideal (speedup vs SDPA x density) per backend; dense rows: speed over SDPA"]
    seqs = sorted({r["seq"] for r in rows})
    keys = sorted({(r["pattern"], r["density_target"]) for r in rows}, key=lambda x: (x[0] == "dense", x))
    for name in names:
        lines.append(f"-- {name}")
        lines.append(f"{'pattern':>8} {'dens':>5} " + " ".join(f"{s:>8}" for s in seqs))
        for pattern, dens in keys:
            cells = []
            for s in seqs:
                hit = [r for r in rows if r["seq"] == s and r["pattern"] == pattern and r["density_target"] == dens]
                if not hit or f"{name}_ms" not in hit[0]:
                    cells.append(f"{'-':>8}")
                    continue
                r = hit[0]
                value = r["sdpa_ms"] / r[f"{name}_ms"] if pattern == "dense" else r[f"{name}_frac_ideal"]
                cells.append(f"{value:>8.2f}")
            lines.append(f"{pattern:>8} {int(100 * dens):>4}% " + " ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--density", type=float, nargs="+", default=[5, 10, 25, 50, 100], help="percent")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backends", nargs="+", default=["fa4", "triton", "flex", "torch"])
    parser.add_argument("--torch-max-seq", type=int, default=8192, help="time the torch backend up to this length")
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition budget (ms)")
    parser.add_argument("--json", default="kernel_bench.json")
    parser.add_argument("--graph-max-seq", type=int, default=16384,
                        help="also time SDPA and ours from CUDA graphs up to this length")
    parser.add_argument("--tune", action="store_true", help="sweep kernel tile configs instead")
    parser.add_argument("--profile-host", action="store_true", help="cProfile the host side of a call")
    parser.add_argument("--no-fast-launch", action="store_true",
                        help="time the grid with the triton backend's fast_launch off (full host path per call)")
    parser.add_argument("--tune-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--tune-blocks", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--host-time-only", action="store_true", help="only the host-time table (no grid)")
    parser.add_argument("--host-seq", type=int, default=1024, help="tokens of the host-time calls")
    parser.add_argument("--host-calls", type=int, default=200, help="back-to-back calls per host-time measurement")
    parser.add_argument("--device", default="cuda",
                        help="cuda, or cpu for a smoke run of the host-time table (with --host-time-only)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.host_time_only:
        parser.error("--device cpu runs only the host-time table: add --host-time-only")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU (or --device cpu --host-time-only for a smoke run)", file=sys.stderr)
        return 2
    started = time.time()
    meta = {"benchmark": "kernel", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "args": vars(args)}
    if args.device == "cuda":
        import triton

        meta["triton"] = triton.__version__
    if args.no_fast_launch:
        os.environ["SPARSIFY_TRITON_FAST_LAUNCH"] = "0"   # read by every triton backend made from here on
        meta["fast_launch"] = False
    with RowLog(args.json, meta=meta, echo=False) as log:
        if args.tune:
            run_tune(args, log)
        else:
            if not args.host_time_only:
                rows = run_grid(args, log)
                print(summary(rows, log.meta["backends"]))
            host_time(args, log)
        log.update_meta(seconds=round(time.time() - started, 1))
    print(f"{meta['device']} torch {meta['torch']} triton {meta.get('triton', '-')}; {time.time() - started:.0f} s; "
          f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
