"""One denoising step of diffusers' WanTransformer3DModel (1.3B configuration, random weights): dense vs sparsified.

The transformer is built from its config (no download) at the Wan2.1-T2V-1.3B shape — 30 layers,
12 heads of 128, FFN 8960, text dim 4096 — and called on one latent video of 21 x 60 x 104
(480p, 81 frames: 32760 tokens) with 512 text tokens, batch 1, bf16. Self attention of every
layer gets a video-local strategy (a sliding window plus attention sinks, the window sized to
``--density`` of the attention blocks; cross attention stays dense), attached through the framework
door (``sparsify.attach``: diffusers' attention processors) or applied through the graph door
(``--door graph``). The script times the step dense and sparsified, eager and under
``torch.compile`` (``--compile``; Inductor, the sparse kernels as custom ops in one graph), with
CUDA events after warm-up, and reports the median, the speedups and the output error.

The ideal beside each speedup is what the attention density allows (`attention_time`): the dense
step minus the time of its attention kernels (torch.profiler, same mode) plus the density x that
time, where the density is the kept work over all attention work (cross attention stays dense and
counts in full); ``fraction_of_ideal = ideal_ms / sparse_ms``. The step with every self-attention
head skipped is kept only as a labelled extra column (``self_attention_skipped_ms``; ``--no-skipped``
leaves it out): under torch.compile Inductor drops the skipped heads' projections as dead code, so
it is no bound.

Each mode's row is printed and written to the JSON file (``{"meta", "rows", "complete"}``) as soon as
it is measured; a mode that fails records its error and the next one runs. The graph-break count
(``--compile``) runs last, under ``torch.no_grad()``, and goes into the file's meta.

Target: the sparsified step at least 0.97 of the ideal, eager and compiled.

    python benchmarks/wan_bench.py --compile [--backend auto|fa4|triton] [--density 0.15]
    python benchmarks/wan_bench.py --device cpu --tiny --compile      # smoke run: a tiny config on CPU
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import sparsify
from attention_time import attention_density, fraction_of_ideal, ideal_step_ms, measure_attention_time
from bench_rows import RowLog
from sparsify import patterns
from timing import device_description, error_text, median_ms, relative_error

#: Wan2.1-T2V-1.3B (its transformer config).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
#: A config of the same structure for CPU smoke runs.
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=128,
                num_layers=2, rope_max_seq_len=64)


def make_inputs(latent_frames: int, height: int, width: int, text_tokens: int, text_dim: int, device, dtype,
                seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 16, latent_frames, height, width, generator=generator).to(device, dtype),
            "timestep": torch.tensor([500], device=device),
            "encoder_hidden_states": torch.randn(1, text_tokens, text_dim, generator=generator).to(device, dtype),
            "return_dict": False}


def window_for_density(tokens: int, block_size: int, target: float, sinks: int) -> int:
    """The smallest sliding window whose (window + sinks) block mask keeps at least ``target`` of all blocks."""
    blocks = -(-tokens // block_size)
    low, high = block_size, tokens
    while low < high:
        middle = (low + high) // 2 // block_size * block_size or block_size
        pattern = patterns.sliding_window(middle) | patterns.attention_sinks(sinks)
        kept = pattern.block_mask(blocks, blocks, block_size=block_size, causal=False, q_len=tokens, k_len=tokens)
        if float(kept.float().mean()) >= target:
            high = middle
        else:
            low = middle + block_size
    return low


def attention_sites(model: torch.nn.Module, tokens: int, text_tokens: int) -> list:
    """`AttentionSite` per diffusers attention module (a module with a processor), from its own attributes."""
    sites = []
    for name, module in model.named_modules():
        if not callable(getattr(module, "set_processor", None)):
            continue
        cross = bool(getattr(module, "is_cross_attention", False))
        sites.append(sparsify.AttentionSite(name, len(sites), num_heads=module.heads, num_kv_heads=module.heads,
                                            head_dim=module.inner_dim // module.heads, q_len=tokens,
                                            k_len=text_tokens if cross else tokens, is_self_attention=not cross))
    return sites


def self_attention_strategy(sites: list, block_size: int, pattern: patterns.Pattern) -> sparsify.Strategy:
    """Every self-attention head runs ``pattern``; cross attention stays dense."""
    strategy = sparsify.Strategy.dense(sites, block_size=block_size)
    for site in sites:
        if site.is_self_attention:
            strategy = strategy.with_heads(site.name, [pattern] * site.num_heads)
    return strategy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny config and video (CPU smoke run)")
    parser.add_argument("--backend", default="auto", help="auto, fa4, triton or flex")
    parser.add_argument("--door", default="framework", choices=["framework", "graph"],
                        help="framework: sparsify.attach (attention processors); graph: sparsify.compile")
    parser.add_argument("--density", type=float, default=0.15, help="target self-attention block density")
    parser.add_argument("--sinks", type=int, default=128, help="attention-sink tokens kept by every query")
    parser.add_argument("--block-size", type=int, default=None, help="default 128 on GPU, 32 with --tiny")
    parser.add_argument("--frames", type=int, default=None, help="latent frames (default 21; 5 with --tiny)")
    parser.add_argument("--height", type=int, default=None, help="latent height (default 60; 16 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="latent width (default 104; 16 with --tiny)")
    parser.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    parser.add_argument("--no-skipped", action="store_true",
                        help="leave out the extra 'self-attention skipped' step (saves one model's timing and "
                             "compilation per mode)")
    parser.add_argument("--no-graph-breaks", action="store_true",
                        help="with --compile: do not count the sparse model's graph breaks at the end")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention-steps", type=int, default=2, help="dense steps profiled for the attention time")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/wan_<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("wan_bench needs a CUDA GPU (or --device cpu --tiny for a smoke run)")
    from diffusers import WanTransformer3DModel

    config = WAN_TINY if args.tiny else WAN_1_3B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames = args.frames or (5 if args.tiny else 21)
    height = args.height or (16 if args.tiny else 60)
    width = args.width or (16 if args.tiny else 104)
    block_size = args.block_size or (32 if args.tiny else 128)
    text_tokens = 16 if args.tiny else 512
    torch.manual_seed(0)
    begin = time.perf_counter()
    model = WanTransformer3DModel(**config).eval().to(device, dtype)
    print(f"model built in {time.perf_counter() - begin:.0f} s", flush=True)
    inputs = make_inputs(frames, height, width, text_tokens, config["text_dim"], device, dtype)
    tokens = frames * (height // 2) * (width // 2)

    # The graph door finds the sites by capture; the framework door needs only their names and shapes, which
    # diffusers' attention modules say themselves (a capture at 32K tokens would cost a minute of GPU time).
    sites = sparsify.find_attention(model, inputs) if args.door == "graph" else attention_sites(model, tokens,
                                                                                               text_tokens)
    sinks = min(args.sinks, block_size)
    window = window_for_density(tokens, block_size, args.density, sinks)
    pattern = patterns.sliding_window(window) | patterns.attention_sinks(sinks)
    strategy = self_attention_strategy(sites, block_size, pattern)
    self_density = float(pattern.block_mask(-(-tokens // block_size), -(-tokens // block_size), block_size=block_size,
                                            causal=False, q_len=tokens, k_len=tokens).float().mean())
    # What the ideal scales: kept work over all attention work (cross attention stays dense and counts in full).
    density = attention_density(strategy, sites)
    if args.door == "graph":
        sparse = sparsify.compile(model, strategy=strategy, example_inputs=inputs, backend=args.backend)
    else:
        sparse = sparsify.attach(model, strategy, backend=args.backend)
    skipped = None
    if not args.no_skipped:  # the labelled extra: the step with every self-attention head skipped
        skipped_strategy = self_attention_strategy(sites, block_size, patterns.skip())
        skipped = (sparsify.compile(model, strategy=skipped_strategy, example_inputs=inputs, backend=args.backend)
                   if args.door == "graph" else sparsify.attach(model, skipped_strategy, backend=args.backend))
    print(f"WanTransformer3DModel ({'tiny' if args.tiny else '1.3B'} config), {tokens} tokens, {dtype}, "
          f"block {block_size}, self-attention {pattern} = density {self_density:.3f} (all attention work: "
          f"{density:.3f}), {args.door} door, backend {args.backend}", flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"wan_{device.type}{'_tiny' if args.tiny else ''}.json")
    log = RowLog(out, meta={"benchmark": "wan", "device": device_description(device), "torch": torch.__version__,
                            "config": "tiny" if args.tiny else "1.3B", "backend": args.backend, "door": args.door,
                            "block_size": block_size, "pattern": str(pattern), "tokens": tokens,
                            "ideal": "dense_ms - attention_ms + attention_density * attention_ms (attention kernels "
                                     "of the dense step, torch.profiler, same mode)", "args": vars(args)})

    def step(module):
        with torch.no_grad():
            return module(**inputs)[0]

    with log:
        reference = step(model)
        modes = ["eager"] + (["torch.compile"] if args.compile else [])
        for mode in modes:
            row = {"mode": mode, "tokens": tokens, "self_attention_density": round(self_density, 4),
                   "attention_density": round(density, 4)}
            try:
                row.update(measure_mode(mode, model, sparse, skipped, step, reference, density, device, args))
            except Exception as error:  # the row says what failed; the next mode still runs
                row["error"] = error_text(error)
            log.add(**row)
        print(log.table(), flush=True)
        if args.compile and not args.no_graph_breaks:
            try:
                with torch.no_grad():
                    explained = torch._dynamo.explain(sparse)(**inputs)
                log.update_meta(graph_breaks=explained.graph_break_count)
                print(f"graph breaks in the sparse model under torch.compile: {explained.graph_break_count}",
                      flush=True)
            except Exception as error:
                log.update_meta(graph_breaks_error=error_text(error))
                print(f"graph-break count failed: {error_text(error)}", flush=True)
    print(f"written {out}")
    return 0


def measure_mode(mode: str, model, sparse, skipped, step, reference, density: float, device, args) -> dict:
    """One mode's numbers: dense, sparse (and skipped) step times, the dense attention time, the ideal."""
    wrap = torch.compile if mode == "torch.compile" else (lambda module: module)
    dense_module, sparse_module = wrap(model), wrap(sparse)
    begin = time.perf_counter()
    dense_ms = median_ms(lambda: step(dense_module), device, args.repeats, args.warmup)
    print(f"{mode}: dense step {dense_ms:.2f} ms ({time.perf_counter() - begin:.0f} s with warm-up)", flush=True)
    begin = time.perf_counter()
    sparse_ms = median_ms(lambda: step(sparse_module), device, args.repeats, args.warmup)
    print(f"{mode}: sparse step {sparse_ms:.2f} ms ({time.perf_counter() - begin:.0f} s with warm-up); measuring the "
          "dense step's attention time", flush=True)
    row = {"dense_ms": round(dense_ms, 2), "sparse_ms": round(sparse_ms, 2), "speedup": round(dense_ms / sparse_ms, 3)}
    try:  # the timings above stay in the row whatever happens here
        attention = measure_attention_time(lambda: step(dense_module), device, steps=args.attention_steps)
        attention_ms = attention.attention_ms_at(dense_ms)
        row.update(**attention.as_row(), attention_share=round(attention_ms / dense_ms, 4))
        row["attention_ms"] = round(attention_ms, 3)
        if attention_ms > 0:
            ideal = ideal_step_ms(dense_ms, attention_ms, density)
            row.update({"ideal_ms": round(ideal, 2), "ideal_speedup": round(dense_ms / ideal, 3),
                        "fraction_of_ideal": round(fraction_of_ideal(ideal, sparse_ms), 3)})
    except Exception as error:
        row["ideal_error"] = error_text(error)
    row["output_rel_error"] = round(relative_error(step(sparse_module), reference), 5)
    if skipped is not None:
        skipped_module = wrap(skipped)
        skipped_ms = median_ms(lambda: step(skipped_module), device, args.repeats, args.warmup)
        row.update({"self_attention_skipped_ms": round(skipped_ms, 2),
                    "speedup_if_self_attention_skipped": round(dense_ms / skipped_ms, 3)})
    return row


if __name__ == "__main__":
    raise SystemExit(main())
