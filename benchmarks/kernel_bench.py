"""Block-sparse attention kernels side by side against dense SDPA on one GPU: fa4, triton, flex, torch.

For every sequence length, block density and pattern it times each backend (`sparsify.backends`:
``prepare`` once, ``run`` timed, as a compiled model calls them) on the same runtime mask, and
dense ``F.scaled_dot_product_attention`` (default backend: cuDNN on Hopper), all in the same
process, and reports per backend

* ``frac_ideal``: ``speedup_vs_sdpa * density`` (1.0 = time proportional to kept blocks),
* for dense rows (100%): the backend's speed over SDPA's,
* host time per call at S=1024 (microseconds, ``run`` only, what the site module calls).

Usage (on the GPU machine)::

    python benchmarks/kernel_bench.py                       # full grid, writes kernel_bench.json
    python benchmarks/kernel_bench.py --seq 8192 16384 --density 10 100 --backends fa4 triton
    python benchmarks/kernel_bench.py --tune                # sweep the triton kernel's tile configs

Timings are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

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


def mask_for(pattern, seq, heads, density, block, causal, seed=0):
    """A runtime mask on the GPU and its density (of the causal area when causal)."""
    from sparsify.runtime import RuntimeBlockMask

    gen = torch.Generator().manual_seed(seed)
    blocks = -(-seq // block)
    masks = block_masks(pattern, heads, blocks, density, causal, gen)
    mask = RuntimeBlockMask.from_block_masks(masks.to("cuda"), block_size=block, q_len=seq, k_len=seq, causal=causal)
    area = blocks * (blocks + 1) / 2 if causal else blocks * blocks
    return mask, float(masks.sum()) / (heads * area)


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def available_backends(names: list[str]) -> dict:
    """The named backends that run here (the others are reported and skipped)."""
    from sparsify.backends import get_backend

    found = {}
    for name in names:
        backend = get_backend(name)
        reason = backend.availability("cuda")
        if reason:
            print(f"backend {name}: skipped ({reason})", flush=True)
        else:
            found[name] = backend
    return found


def run_grid(args, meta: dict) -> list[dict]:
    backends = available_backends(args.backends)
    meta["backends"] = list(backends)
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
                row = {"seq": seq, "pattern": "dense" if pct >= 100 else pattern, "density_target": pct / 100,
                       "density": density, "sdpa_ms": t_sdpa}
                reference = None
                for name, backend in backends.items():
                    if name == "torch" and seq > args.torch_max_seq:
                        continue
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
                rows.append(row)
                print(format_row(row, list(backends)), flush=True)
                del mask
        del q, k, v
        torch.cuda.empty_cache()
        write_json(args.json, meta, rows)  # partial results survive a time limit
    return rows


def get_reference(mask, q, k, v, pct, reference_dense, seq):
    """Dense SDPA for dense rows; the torch backend in float32 for sparse ones (chunked: no seq x seq)."""
    from sparsify.backends import get_backend

    if pct >= 100:
        return reference_dense
    return get_backend("torch").attention(q.float(), k.float(), v.float(), mask)


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def launch_overhead(args) -> dict:
    """Host time per call (microseconds) at S=1024, where the host, not the GPU, is the limit.

    Each backend's ``run`` on a prepared plan, as the site module calls it (for triton: the cached
    direct launch from the second call on; ``triton_full_path``: the same with ``fast_launch`` off).
    """
    from sparsify.backends.triton import TritonBackend

    dtype = getattr(torch, args.dtype)
    q, k, v = make_inputs(1024, args.heads, args.dim, dtype)
    mask, _ = mask_for("random", 1024, args.heads, 0.25, args.block, args.causal)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)}
    for name, backend in available_backends(args.backends).items():
        plan = backend.prepare(mask, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=dtype, device=q.device)
        calls[name] = (lambda b=backend, p=plan: b.run(p, q, k, v))
        if name == "triton":
            full_path = TritonBackend(fast_launch=False)
            calls["triton_full_path"] = (lambda b=full_path, p=plan: b.run(p, q, k, v))
    result = {}
    for name, fn in calls.items():
        try:
            with torch.no_grad():
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                best = float("inf")
                for _ in range(3):  # best of three: the host is noisy
                    start = time.perf_counter()
                    for _ in range(200):
                        fn()
                    torch.cuda.synchronize()
                    best = min(best, (time.perf_counter() - start) / 200 * 1e6)
            result[name] = best
        except Exception as err:
            result[name] = f"{type(err).__name__}: {err}"[:200]
    if getattr(args, "profile_host", False):
        import cProfile
        import pstats

        for name in [n for n in calls if n != "sdpa"]:
            prof = cProfile.Profile()
            prof.enable()
            with torch.no_grad():
                for _ in range(500):
                    calls[name]()
            prof.disable()
            torch.cuda.synchronize()
            print(f"--- cProfile, {name}, 500 calls")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return result


def format_row(row: dict, names: list[str]) -> str:
    cells = []
    for name in names:
        if f"{name}_ms" in row:
            value = row["sdpa_ms"] / row[f"{name}_ms"] if row["pattern"] == "dense" else row[f"{name}_frac_ideal"]
            cells.append(f"{name} {row[f'{name}_ms']:8.3f}ms {value:5.2f}")
        elif f"{name}_error" in row:
            cells.append(f"{name} ERROR")
    return f"{row['seq']:>6} {row['pattern']:>7} {100 * row['density']:6.1f}% sdpa {row['sdpa_ms']:8.3f} | " + " | ".join(cells)


def run_tune(args) -> list[dict]:
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
                    row = {"seq": seq, "dim": dim, "block": block, "density": density, "tma": tma,
                           "config": list(vars(cfg).values()),
                           "ms": t, "sdpa_ms": t_sdpa, "frac_ideal": t_sdpa / t * density, "err": err}
                    results.append(row)
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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    started = time.time()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "args": vars(args)}
    if args.no_fast_launch:
        os.environ["SPARSIFY_TRITON_FAST_LAUNCH"] = "0"   # read by every triton backend made from here on
        meta["fast_launch"] = False
    if args.tune:
        rows = run_tune(args)
    else:
        rows = run_grid(args, meta)
        print(summary(rows, meta["backends"]))
        meta["host_us_per_call_s1024"] = launch_overhead(args)
        print("host time per call at S=1024 (us):",
              {k: round(v, 1) for k, v in meta["host_us_per_call_s1024"].items()})
    meta["seconds"] = time.time() - started
    write_json(args.json, meta, rows)
    print(f"{meta['device']} torch {meta['torch']} triton {meta['triton']}; {meta['seconds']:.0f} s; "
          f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
