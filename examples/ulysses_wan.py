"""A Wan transformer step under Ulysses sequence parallelism, each rank running its head shard of a sparsity strategy.

Launched with ``torchrun`` (one process per GPU; gloo on CPU with ``--device cpu``):

1. every rank builds diffusers' `WanTransformer3DModel` (the Wan2.1-T2V-1.3B config with random
   weights, bf16 on GPU; ``--tiny`` for a 2-layer config) and takes rank 0's weights;
2. the strategy: ``--strategy PATH`` (e.g. one searched on a single GPU with ``sparsify.compile``
   and saved), or a sliding window plus attention sinks on every self-attention head at
   ``--density`` of the blocks, cross attention dense. Rank 0 finds the sites and saves it
   (``Strategy.save`` writes on rank 0 only); every rank loads the same file;
3. ``sequence_parallel(model)`` makes this rank's Ulysses copy — tokens split over the ranks,
   an all-to-all before and after every attention — and ``sparsify.attach`` runs rank r's
   ``strategy.shard_heads(r, N)`` on it through diffusers' attention processors;
4. one denoising step, dense and sparse, timed; with ``--check`` rank 0 also runs the one-GPU
   sparse step and prints how far the Ulysses output is from it.

    torchrun --nproc-per-node 2 examples/ulysses_wan.py --check                 # 480p, 81 frames: 32,760 tokens
    torchrun --nproc-per-node 4 examples/ulysses_wan.py --height 90 --width 160  # 720p, 81 frames: 75,600 tokens
    torchrun --nproc-per-node 2 examples/ulysses_wan.py --device cpu --tiny --check
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import sparsify
from sparsify import patterns
from sparsify.distributed import init_from_environment
from sparsify.integrations.ulysses import sequence_parallel

#: Wan2.1-T2V-1.3B's transformer config, and a 2-layer one of the same structure.
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=128,
                num_layers=2, rope_max_seq_len=64)


def inputs_for(config: dict, frames: int, height: int, width: int, text_tokens: int, device, dtype) -> dict:
    """One latent video and its text embeddings (the same on every rank: a fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, frames, height, width, generator=generator).to(device, dtype),
            "timestep": torch.tensor([500], device=device),
            "encoder_hidden_states": torch.randn(1, text_tokens, config["text_dim"], generator=generator).to(device, dtype),
            "return_dict": False}


def window_strategy(model, config: dict, tokens: int, density: float, block_size: int, device, dtype):
    """Sliding window + sinks at about ``density`` of the blocks on every self-attention head; cross attention dense."""
    small = inputs_for(config, 1, 4, 4, 8, device, dtype)  # sites do not depend on the length: find them cheaply
    sites = sparsify.find_attention(model, small)
    window = max(block_size, int(density * tokens) // block_size * block_size)
    pattern = patterns.sliding_window(window) | patterns.attention_sinks(block_size)
    strategy = sparsify.Strategy.dense(sites, block_size=block_size)
    for site in sites:
        if site.kind == "self":
            strategy = strategy.with_heads(site.name, [pattern] * site.num_heads)
    return strategy


def timed(function, device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = function()[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return output, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer config and a small video (CPU)")
    parser.add_argument("--frames", type=int, default=None, help="latent frames (81 video frames: 21)")
    parser.add_argument("--height", type=int, default=None, help="latent height (480p: 60, 720p: 90)")
    parser.add_argument("--width", type=int, default=None, help="latent width (480p: 104, 720p: 160)")
    parser.add_argument("--strategy", default=None, help="a strategy JSON for this model (default: a window strategy)")
    parser.add_argument("--strategy-out", default="ulysses_wan_strategy.json", help="where rank 0 saves the default one")
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--block-size", type=int, default=None, help="default 128 (32 with --tiny)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--check", action="store_true", help="rank 0 also runs the one-GPU sparse step and compares")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, as the GPU machines set it
    if not init_from_environment(prefer_cuda=args.device == "cuda"):
        raise SystemExit("launch with torchrun --nproc-per-node N (N processes: one per GPU)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = WAN_TINY if args.tiny else WAN_1_3B
    frames = args.frames or (4 if args.tiny else 21)
    height = args.height or (16 if args.tiny else 60)
    width = args.width or (16 if args.tiny else 104)
    block_size = args.block_size or (32 if args.tiny else 128)
    tokens = frames * (height // 2) * (width // 2)
    from diffusers import WanTransformer3DModel

    # 1. The same model on every rank.
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor, 0)
    inputs = inputs_for(config, frames, height, width, 16 if args.tiny else 512, device, dtype)

    # 2. One strategy for the whole model, written by rank 0, read by every rank.
    path = args.strategy
    if path is None:
        path = args.strategy_out
        if rank == 0:
            window_strategy(model, config, tokens, args.density, block_size, device, dtype).save(path)
        dist.barrier()
    strategy = sparsify.Strategy.load(path)

    # 3. This rank's Ulysses copy, and its head shard of the strategy through the framework door.
    parallel = sequence_parallel(model)
    sparse = sparsify.attach(parallel, strategy.shard_heads(rank, world_size), backend=args.backend)

    # 4. One step, dense and sparse (a first call each to warm up).
    for module in (parallel, sparse):
        timed(lambda: module(**inputs), device)
    dense_output, dense_seconds = timed(lambda: parallel(**inputs), device)
    sparse_output, sparse_seconds = timed(lambda: sparse(**inputs), device)
    if rank == 0:
        heads = config["num_attention_heads"]
        print(f"WanTransformer3DModel ({'tiny' if args.tiny else '1.3B'} config, {dtype}), {tokens} tokens over "
              f"{world_size} ranks: {tokens // world_size} tokens outside attention and {heads // world_size} of "
              f"{heads} heads inside it per rank")
        print(f"step: dense {dense_seconds * 1e3:.1f} ms, sparse {sparse_seconds * 1e3:.1f} ms "
              f"({dense_seconds / sparse_seconds:.2f}x)")
        if args.check:
            one_gpu = sparsify.attach(model, strategy, backend=args.backend)
            with torch.no_grad():
                reference = one_gpu(**inputs)[0].float()
            error = float((sparse_output.float() - reference).norm() / reference.norm())
            print(f"Ulysses sparse output vs the one-process sparse step: relative L2 error {error:.2e}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
