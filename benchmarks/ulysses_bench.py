"""A Ulysses-parallel Wan 1.3B-config step on N GPUs, dense and sparse: time per step, scaling efficiency, output check.

diffusers' `WanTransformer3DModel` at the Wan2.1-T2V-1.3B config (random weights, bf16, 12 heads
of 128, 30 layers; built on the GPU, rank 0's weights broadcast to every rank), one denoising step
on one latent video: 21 x 60 x 104 (480p, 81 frames: 32,760 tokens) and 21 x 90 x 160 (720p,
81 frames: 75,600 tokens), 512 text tokens. For each number of ranks N (1, 2, 4, 8 up to the
world size of the launch; the first N ranks take part, the others wait):

* N = 1 is the one-GPU step: the model itself (dense) and ``sparsify.attach(model, strategy)``;
* N > 1 is Ulysses: ``sequence_parallel(model, group)`` (tokens split over the N ranks, an
  all-to-all before and after every attention), dense, and with rank r's
  ``strategy.shard_heads(r, N)`` attached through the framework door.

The strategy keeps cross attention dense and gives every self-attention head a sliding window
plus attention sinks at ``--density`` of the blocks (as `wan_bench.py`). Each row: median step
time (slowest rank) dense and sparse, the sparse speedup, scaling efficiency T1 / (N · TN) of
both, peak GPU memory per rank, and the relative L2 error of rank 0's output against the
one-GPU step (dense against dense, sparse against sparse: equal up to bf16 rounding) and of the
sparse step against the one-GPU dense step (``equals_one_gpu``: both within `TOLERANCE`). Rows are
printed and written (``RowLog``) as they are measured. An N that does not divide the heads is a
row saying so: Wan 1.3B's 12 heads do not split over 8 ranks (``--config 14b``, 40 heads, does).

    torchrun --nproc-per-node 8 benchmarks/ulysses_bench.py                 # N = 1, 2, 4, 8
    torchrun --nproc-per-node 2 benchmarks/ulysses_bench.py --videos 480p   # N = 1, 2
    python benchmarks/ulysses_bench.py --device cpu --smoke                  # 2 gloo ranks, a tiny config (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparsify  # noqa: E402
from bench_rows import RowLog  # noqa: E402
from sparsify import patterns  # noqa: E402
from sparsify.distributed import init_from_environment  # noqa: E402
from sparsify.integrations.ulysses import sequence_parallel  # noqa: E402
from wan_bench import (  # noqa: E402
    WAN_1_3B,
    WAN_TINY,
    attention_sites,
    make_inputs,
    self_attention_strategy,
    window_for_density,
)
from timing import median_ms, relative_error  # noqa: E402

#: Wan2.1-T2V-14B (its transformer config): 40 heads, so N = 8 divides them.
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
CONFIGS = {"1.3b": WAN_1_3B, "14b": WAN_14B, "tiny": WAN_TINY}
#: Latent videos (frames, height, width) after the VAE: 81 frames at 480p and 720p.
VIDEOS = {"480p": (21, 60, 104), "720p": (21, 90, 160), "tiny": (4, 16, 16)}
TIMEOUT = datetime.timedelta(minutes=5)  # ranks outside the measured group wait at most this long
#: Largest relative L2 error of an N-rank step against the one-GPU step that still counts as equal: bf16 rounding
#: differs where the linear layers see S/N rows instead of S (kernel choice), and 30 layers compound it.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def world_sizes(world: int) -> list[int]:
    """1, 2, 4, ... up to ``world``, and ``world`` itself."""
    sizes = [1]
    while sizes[-1] * 2 <= world:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == world else sizes + [world]


def peak_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def slowest(value: float, group, device: torch.device) -> float:
    """The largest ``value`` over the ranks of ``group``."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return float(tensor.item())


def run(args: argparse.Namespace) -> None:
    """Every rank: build the model, then per video and per N time the dense and the sparse step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = CONFIGS[args.config]
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor, 0)  # the same weights on every rank, whatever each device's generator did
    sizes = world_sizes(world)
    groups = {n: dist.new_group(list(range(n))) for n in sizes}  # every rank creates every group, in order
    heads = config["num_attention_heads"]
    log = None
    if rank == 0:
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "world_size": world, "config": args.config, "dtype": str(dtype),
                "backend": args.backend, "density": args.density, "block_size": args.block_size,
                "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "repeats": args.repeats,
                "warmup": args.warmup}
        log = RowLog(args.out, meta=meta)
    text_tokens = 16 if args.config == "tiny" else 512
    for video in args.videos:
        frames, height, width = VIDEOS[video]
        tokens = frames * (height // 2) * (width // 2)
        inputs = make_inputs(frames, height, width, text_tokens, config["text_dim"], device, dtype)
        sites = attention_sites(model, tokens, text_tokens)
        sinks = min(args.sinks, args.block_size)
        window = window_for_density(tokens, args.block_size, args.density, sinks)
        pattern = patterns.sliding_window(window) | patterns.attention_sinks(sinks)
        strategy = self_attention_strategy(sites, args.block_size, pattern)
        blocks = -(-tokens // args.block_size)
        density = float(pattern.block_mask(blocks, blocks, block_size=args.block_size, causal=False, q_len=tokens,
                                           k_len=tokens).float().mean())
        one_process: dict[str, float | torch.Tensor] = {}
        for n in sizes:
            if heads % n or tokens % n:
                if log is not None:
                    log.add(video=video, tokens=tokens, ranks=n,
                            skipped=f"{heads} heads / {tokens} tokens do not split over {n} ranks")
                continue
            if rank < n:
                row = measure(model, strategy, inputs, n, groups[n], device, args, one_process)
                if log is not None:
                    log.add(video=video, tokens=tokens, ranks=n, self_attention_density=round(density, 4), **row)
            dist.barrier()
    if log is not None:
        log.close()
        print(log.table())
        print(f"written {args.out}")


def measure(model, strategy, inputs, n: int, group, device: torch.device, args: argparse.Namespace,
            one_process: dict) -> dict:
    """One row on the ``n`` ranks of ``group``: dense and sparse step times, memory, errors against one process."""
    rank = dist.get_rank(group)
    if n == 1:
        dense_model, sparse_model = model, sparsify.attach(model, strategy, backend=args.backend)
    else:
        dense_model = sequence_parallel(model, group)
        sparse_model = sparsify.attach(dense_model, strategy.shard_heads(rank, n), backend=args.backend)

    def step(module):
        with torch.no_grad():
            return module(**inputs)[0]

    row = {}
    outputs = {}
    for label, module in (("dense", dense_model), ("sparse", sparse_model)):
        dist.barrier(group=group)
        reset_peak(device)
        outputs[label] = step(module)
        milliseconds = median_ms(lambda: step(module), device, args.repeats, args.warmup)
        row[f"{label}_ms"] = round(slowest(milliseconds, group, device), 2)
        row[f"{label}_peak_gib"] = round(slowest(peak_gib(device), group, device), 2)
    row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
    if n == 1:
        one_process.update(dense=outputs["dense"], sparse=outputs["sparse"], dense_ms=row["dense_ms"],
                           sparse_ms=row["sparse_ms"])
    for label in ("dense", "sparse"):
        if f"{label}_ms" in one_process:
            row[f"{label}_scaling_efficiency"] = round(one_process[f"{label}_ms"] / (n * row[f"{label}_ms"]), 3)
        if rank == 0 and label in one_process:
            row[f"{label}_error_vs_one_process"] = relative_error(outputs[label], one_process[label])
    if rank == 0 and "dense" in one_process:
        row["sparse_error_vs_dense"] = relative_error(outputs["sparse"], one_process["dense"])
        tolerance = TOLERANCE[outputs["sparse"].dtype]
        row["equals_one_gpu"] = all(row[f"{label}_error_vs_one_process"] <= tolerance for label in ("dense", "sparse"))
    return row


def _spawned(rank: int, world: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--smoke`` sets the tiny CPU run); ``argv`` defaults to ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="a tiny config on CPU, 2 spawned gloo ranks")
    parser.add_argument("--config", default="1.3b", choices=sorted(CONFIGS), help="Wan transformer config")
    parser.add_argument("--videos", nargs="+", default=["480p", "720p"], choices=sorted(VIDEOS))
    parser.add_argument("--backend", default="auto", help="auto, fa4, triton, flex or torch")
    parser.add_argument("--density", type=float, default=0.15, help="self-attention block density of the strategy")
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2, help="ranks to spawn when not launched by torchrun (CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by spawned ranks")
    parser.add_argument("--out", default=None, help="JSON rows (default benchmarks/results/ulysses_<device>.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.config, args.videos, args.block_size, args.density = "cpu", "tiny", ["tiny"], 32, 0.3
        args.repeats, args.warmup, args.sinks = 2, 1, 32
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"ulysses_{args.device}{'_smoke' if args.smoke else ''}.json")
    return args


def main() -> None:
    args = parse_arguments()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ulysses_bench needs CUDA GPUs (or --device cpu --smoke for a smoke run)")
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: one process per GPU
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (the GPU machines set it so)
        init_from_environment(prefer_cuda=args.device == "cuda", timeout=TIMEOUT)
        try:
            run(args)
        finally:
            dist.destroy_process_group()
        return
    if args.device == "cuda":
        raise SystemExit(f"launch it with torchrun --nproc-per-node N (N GPUs; this machine has "
                         f"{torch.cuda.device_count()})")
    with tempfile.TemporaryDirectory() as directory:  # CPU: spawn the gloo ranks here
        mp.start_processes(_spawned, args=(args.processes, args, os.path.join(directory, "store")),
                           nprocs=args.processes, join=True, start_method="spawn")

if __name__ == "__main__":
    main()
