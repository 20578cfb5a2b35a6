"""Wall time of data-parallel calibration through `torch.distributed` against the one-process search.

Every mode calibrates the same model on the same batches, each in a fresh process (so every mode
pays its own capture), and is timed twice in that process (cold, then warm):

* ``local``           one process, no process group (``process_group=False``);
* ``world-1/<b>``     one rank of a process group (backend ``b``: NCCL on GPU, gloo on CPU) —
                      the distributed code path with every collective, at world size 1;
* ``world-2/gloo``    two ranks sharing the device, gloo collectives (the sums go through the CPU);
* ``world-2/nccl-shared``  two ranks sharing one GPU with NCCL (recent NCCL refuses two ranks per
                      device; the row then says why);
* ``world-N/nccl``    N ranks on N GPUs, one each, for N = 2, 4, 8 up to the GPUs there are
                      (and their count itself): the multi-GPU calibration.

Each rank takes a contiguous share of the batches; the union is the local mode's batch list, so
every mode must choose the local mode's patterns (checked, and reported with the largest
relative difference of the per-head errors). Per rank: warm seconds, peak GPU memory
(``torch.cuda.max_memory_allocated``) and peak resident memory of the process. Each mode's row
is printed and written as it is measured (``RowLog``; default
``benchmarks/results/distributed_<cpu|gpu>.json``).

    python benchmarks/distributed_bench.py                 # GPU when available, else CPU
    python benchmarks/distributed_bench.py --smoke         # tiny model on CPU with gloo (seconds)
    python benchmarks/distributed_bench.py --device cuda --frames 16 --layers 8 --batches 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_rows import RowLog  # noqa: E402
from sparsify.api import search_model  # noqa: E402
from sparsify.cost import device_name  # noqa: E402
from sparsify.distributed import contiguous_shard  # noqa: E402
from sparsify.toy_models import StructuredVideoTransformer  # noqa: E402
from sparsify.options import CompileOptions  # noqa: E402

TIMEOUT = datetime.timedelta(minutes=3)  # collectives wait only for the slowest rank


def build(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = StructuredVideoTransformer(frames=args.frames, height=args.height, width=args.width, heads=args.heads,
                                       layers=args.layers, dim=32 * args.heads).eval().to(device)
    batches = [model.example_tokens(seed=1 + index) for index in range(args.batches)]
    return model, batches


def _worker(rank: int, world_size: int, mode: str, backend: str | None, args: argparse.Namespace, directory: str) -> None:
    torch.set_num_threads(max(1, args.threads // world_size))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank if one_gpu_per_rank(mode) else 0)
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    init_seconds = 0.0
    if backend is not None:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (the GPU machines set it so)
        start = time.perf_counter()
        dist.init_process_group(backend, init_method=f"file://{directory}/store_{mode.replace('/', '_')}", rank=rank,
                                world_size=world_size, timeout=TIMEOUT)
        init_seconds = time.perf_counter() - start
    try:
        model, batches = build(args, device)
        shard = contiguous_shard(batches, rank, world_size)
        config = CompileOptions(max_error=args.max_error, block_size=args.block_size)
        seconds = []
        for _ in range(2):  # cold (capture, first kernels), then warm
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = search_model(model, shard, config, progress=False,
                                  process_group=None if backend is not None else False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        report = {"seconds": seconds, "init_seconds": init_seconds, "batches": len(shard),
                  "strategy": result.compiled.strategy.to_dict(),
                  "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                  # ru_maxrss is in KiB on Linux
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        Path(directory, f"{mode.replace('/', '_')}_{rank}.json").write_text(json.dumps(report))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def one_gpu_per_rank(mode: str) -> bool:
    """``world-N/nccl`` (N > 1): rank r on GPU r; every other mode shares GPU 0."""
    return mode.endswith("/nccl") and not mode.startswith("world-1/")


def nccl_world_sizes(devices: int) -> list[int]:
    """2, 4, 8, ... up to ``devices``, and ``devices`` itself (nothing below two GPUs)."""
    sizes = []
    size = 2
    while size <= devices:
        sizes.append(size)
        size *= 2
    if devices >= 2 and devices not in sizes:
        sizes.append(devices)
    return sizes


def run_mode(mode: str, world_size: int, backend: str | None, args: argparse.Namespace, directory: str) -> list[dict]:
    mp.start_processes(_worker, args=(world_size, mode, backend, args, directory), nprocs=world_size, join=True,
                       start_method="spawn")
    return [json.loads(Path(directory, f"{mode.replace('/', '_')}_{rank}.json").read_text()) for rank in range(world_size)]


def compare(strategy: dict, reference: dict) -> tuple[bool, float]:
    """Same pattern on every head, and the largest relative difference of the per-head errors."""
    same = all(strategy["sites"][name]["heads"] == site["heads"] for name, site in reference["sites"].items())
    worst = 0.0
    for name, site in reference["sites"].items():
        for mine, theirs in zip(strategy["sites"][name]["head_metrics"], site["head_metrics"]):
            scale = max(abs(theirs["error"]), 1e-12)
            worst = max(worst, abs(mine["error"] - theirs["error"]) / scale)
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU with gloo: checks the script in seconds")
    parser.add_argument("--frames", type=int, default=16, help="frames of height x width tokens (16x16x16: 4096)")
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--max-error", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.frames, args.height, args.width, args.heads, args.layers, args.batches = "cpu", 4, 8, 8, 4, 2, 4
        args.block_size = args.block_size or 32
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"distributed_{kind}"
                                        f"{'_smoke' if args.smoke else ''}.json")

    modes: list[tuple[str, int, str | None]] = [("local", 1, None)]
    if kind == "gpu":
        modes += [("world-1/nccl", 1, "nccl"), ("world-2/gloo", 2, "gloo"), ("world-2/nccl-shared", 2, "nccl")]
        modes += [(f"world-{n}/nccl", n, "nccl") for n in nccl_world_sizes(torch.cuda.device_count())]
    else:
        modes += [("world-1/gloo", 1, "gloo"), ("world-2/gloo", 2, "gloo")]

    machine = {"device": device_name(args.device), "torch": torch.__version__, "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "cuda_devices": torch.cuda.device_count(),
               "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    workload = {k: getattr(args, k) for k in ("frames", "height", "width", "heads", "layers", "batches", "block_size",
                                              "max_error", "threads")}
    with tempfile.TemporaryDirectory() as directory, RowLog(args.out, meta={"machine": machine,
                                                                             "workload": workload}) as log:
        reference = None
        for mode, world_size, backend in modes:
            if world_size > args.batches:
                log.add(mode=mode, ranks=world_size, skipped=f"{args.batches} batches cannot feed {world_size} ranks")
                continue
            try:
                ranks = run_mode(mode, world_size, backend, args, directory)
            except Exception as error:  # noqa: BLE001 - a mode that cannot run here is reported, not fatal
                log.add(mode=mode, ranks=world_size, error=f"{type(error).__name__}: {str(error)[:300]}")
                continue
            cold = max(r["seconds"][0] for r in ranks)
            warm = max(r["seconds"][1] for r in ranks)
            strategy = ranks[0]["strategy"]
            if reference is None:
                reference, local_warm = strategy, warm
            same, worst = compare(strategy, reference)
            agree = all(r["strategy"]["sites"] == strategy["sites"] for r in ranks)
            log.add(mode=mode, ranks=world_size, backend=backend, batches_per_rank=[r["batches"] for r in ranks],
                    cold_seconds=round(cold, 3), warm_seconds=round(warm, 3),
                    warm_vs_local=round(warm / local_warm, 3),
                    warm_seconds_per_rank=[round(r["seconds"][1], 3) for r in ranks],
                    peak_gpu_gib_per_rank=[round(r["peak_gpu_gib"], 3) for r in ranks],
                    peak_rss_gib_per_rank=[round(r["peak_rss_gib"], 3) for r in ranks],
                    init_seconds=round(max(r["init_seconds"] for r in ranks), 3),
                    same_patterns_as_local=same, max_relative_error_difference=worst, ranks_agree=agree)
    print(log.table())
    print(f"written {args.out}")

if __name__ == "__main__":
    main()
