"""A diffusers video pipeline end to end: calibrate through the pipeline, search, attach, generate frames.

The pipeline is diffusers' `WanPipeline` built from small configs with random weights (no
download; no text encoder either: it is called with prompt embeddings): a 2-layer
`WanTransformer3DModel` (4 heads of 32), a tiny `AutoencoderKLWan`, the flow-matching scheduler.
Guidance runs as two transformer calls per denoising step, as in Wan. Self-attention heads are
given positional structure (`give_heads_positional_structure`: each attends to a 3D neighbourhood,
as trained video models' heads largely do); ``--sharpness 0`` keeps plain random weights.

1. calibration is a ``forward_loop`` that runs the pipeline for a few steps on a few prompts
   (`pipeline_forward_loop`); `sparsify.compile` (the graph door) searches per site and head;
2. the strategy is saved as JSON and attached to the pipeline's transformer through the
   framework door: ``pipe.transformer = sparsify.attach(pipe.transformer, strategy)``; the first
   ``--dense-steps`` denoising steps stay dense (keyed by the pipeline's timestep);
3. the pipeline generates frames dense and sparsified from the same seed; the script prints the
   strategy, the time per generation and the difference of the decoded frames.

    python examples/wan_pipeline.py [--frames 33] [--size 192] [--steps 6] [--max-error 0.1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import sparsify
from sparsify.integrations.diffusers import pipeline_forward_loop

TEXT_DIM = 64


def give_heads_positional_structure(transformer, sharpness: float) -> None:
    """Make each self-attention head attend by relative position, as trained video models' heads largely do.

    Random weights give diffuse attention (nothing to sparsify). Here the queries and keys of a head
    are dominated by one shared bias vector, so after Wan's 3D rotary embedding a score depends on
    the offset in frames, rows and columns only: each head sees a 3D neighbourhood (its own mix of
    frequencies), which in token order is a diagonal band plus bands one row and one frame away.
    """
    with torch.no_grad():
        for block in transformer.blocks:
            attention = block.attn1
            bias = torch.randn(attention.inner_dim)
            for projection in (attention.to_q, attention.to_k):
                projection.weight.mul_(0.05)
                projection.bias.copy_(bias)
            attention.norm_q.weight.fill_(sharpness)
            attention.norm_k.weight.fill_(sharpness)


def build_pipeline(seed: int = 0, sharpness: float = 4.0):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                                        in_channels=16, out_channels=16, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=256,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=256).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    if sharpness:
        give_heads_positional_structure(transformer, sharpness)
    pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def prompt(seed: int) -> dict:
    """Random prompt embeddings (a text encoder's output stands in: 16 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, 16, TEXT_DIM, generator=generator),
            "negative_prompt_embeds": torch.randn(1, 16, TEXT_DIM, generator=generator)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=33, help="video frames (4k+1; 33 -> 9 latent frames)")
    parser.add_argument("--size", type=int, default=192, help="height and width in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps of the generation")
    parser.add_argument("--calibration-prompts", type=int, default=2)
    parser.add_argument("--calibration-steps", type=int, default=3)
    parser.add_argument("--max-error", type=float, default=0.1, help="per-site output error budget")
    parser.add_argument("--target-density", type=float, default=0.0, help="optional global density target")
    parser.add_argument("--sharpness", type=float, default=4.0,
                        help="how sharply heads attend by relative position (0: plain random weights, whose diffuse "
                             "attention the search rightly keeps dense)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dense-steps", type=int, default=2, help="first denoising steps that stay dense")
    parser.add_argument("--out", default=None, help="strategy JSON (default: a temporary file)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared machine: 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = build_pipeline(sharpness=args.sharpness)
    call = dict(height=args.size, width=args.size, num_frames=args.frames, guidance_scale=5.0)
    tokens = ((args.frames - 1) // 4 + 1) * (args.size // 16) ** 2
    print(f"WanPipeline (tiny config, random weights): {args.frames} frames at {args.size}x{args.size} = {tokens} "
          f"latent tokens per transformer call\n")

    # 1. Calibrate through the pipeline and search (graph door).
    calibration = [dict(call, **prompt(seed), num_inference_steps=args.calibration_steps, output_type="latent")
                   for seed in range(args.calibration_prompts)]
    start = time.perf_counter()
    compiled = sparsify.compile(pipeline.transformer, pipeline_forward_loop(pipeline, calibration),
                                max_error=args.max_error, target_density=args.target_density or None,
                                block_size=args.block_size, progress=False)
    print(compiled.report())
    print(f"\nsearch: {time.perf_counter() - start:.1f} s over {args.calibration_prompts} prompts x "
          f"{args.calibration_steps} steps x 2 guidance calls")
    strategy = compiled.strategy
    for name, site in strategy.sites.items():                 # keep the first denoising steps dense
        strategy = strategy.with_heads(name, list(site.heads), dense_steps=args.dense_steps)
    path = args.out or os.path.join(tempfile.mkdtemp(), "wan_strategy.json")
    strategy.save(path)

    # 2. Attach the saved strategy to the pipeline's transformer (framework door).
    original = pipeline.transformer
    sparse = sparsify.attach(original, path)

    # 3. Generate dense and sparsified from the same seed: time the denoising loop, then decode the frames.
    def generate(transformer, output_type: str) -> tuple[torch.Tensor, float]:
        pipeline.transformer = transformer
        begin = time.perf_counter()
        with torch.no_grad():
            frames = pipeline(**call, **prompt(100), num_inference_steps=args.steps, output_type=output_type,
                              generator=torch.Generator().manual_seed(7)).frames
        return frames, time.perf_counter() - begin

    generate(original, "latent")                            # warm-up
    _, dense_seconds = generate(original, "latent")
    _, sparse_seconds = generate(sparse, "latent")
    dense_frames, _ = generate(original, "pt")
    sparse_frames, _ = generate(sparse, "pt")
    pipeline.transformer = original
    difference = float((sparse_frames - dense_frames).norm() / dense_frames.norm())
    summary = strategy.summary()
    print(f"\nstrategy {path}: {summary['sparse_heads']} of {summary['num_heads']} heads sparse, mean density "
          f"{summary['mean_density']:.3f}, first {args.dense_steps} of {args.steps} steps dense")
    print(f"denoising ({args.steps} steps x 2 guidance calls): dense {dense_seconds:.2f} s, sparsified "
          f"{sparse_seconds:.2f} s ({dense_seconds / sparse_seconds:.2f}x)")
    print(f"decoded frames {tuple(sparse_frames.shape)} differ from dense by {difference:.2e} (relative L2)")


if __name__ == "__main__":
    main()
