"""Long-context prefill of a Llama-shaped LM: time to first token dense vs sparse (static A-shape, input-adaptive heads).

For each shape and prompt length the script builds the model from a config (random weights, bf16,
see `llm_bench_tools`), attaches a strategy with ``sparsify.attach`` over every
``self_attn`` site and times ``model(ids, use_cache=False, logits_to_keep=1)``:

* ``dense`` — the model as built (transformers' SDPA, PyTorch's default backend);
* ``a_shape`` — attention sinks (one block) + a sliding window sized to ``--density`` of the causal blocks;
* ``vertical_slash`` — `estimated_vertical_slash` (vertical = slash = density / 4, one sink block);
* ``pooled`` — `pooled_coverage(0.9)` capped at ``max_fraction = density / 2`` (one sink block).

Beside the time to first token it measures, per forward, dense attention alone (SDPA over every
layer's q/k/v shapes, CUDA events) and each mode's sparse attention alone (the site's ``attend``),
the adaptive heads' mask estimation alone, the backend kernel alone (``kernel_ms``; ``glue_ms`` is
what the site adds around it: head selection copies, plan, output placement), and the realised
causal density. From those:
``ideal = (dense - dense attention) + density * dense attention`` and ``of_ideal = ideal / sparse``
(1.0 = the sparse step loses nothing beyond its density). ``--chunk N`` also prefills the prompt in
chunks of N tokens through a DynamicCache (``chunked_ratio`` = chunked / one call). ``--profile``
writes a torch.profiler table of one sparse forward (where the sparse step spends its time).

    python benchmarks/llm_prefill_bench.py                         # --quick: ~4 min on an H100: 1B at 32K+128K, 7B-geometry at 128K
    python benchmarks/llm_prefill_bench.py --shapes llama-1b --lengths 32768 65536 131072 --chunk 16384
    python benchmarks/llm_prefill_bench.py --device cpu --shapes tiny --lengths 1024 --block-size 64   # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import sparsify
from bench_rows import RowLog
from llm_bench_tools import attention_sites, build_model, machine, synchronize, time_ms
from sparsify import patterns
from sparsify.integrations import attached_sites
from sparsify.integrations.transformers import cache_keyword

MODES = ("a_shape", "vertical_slash", "pooled")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mode_pattern(mode: str, density: float, tokens: int, block: int):
    """The pattern of ``mode`` at about ``density`` of the causal blocks for a ``tokens``-long prompt."""
    if mode == "a_shape":
        window = max(block, round(density * tokens / 2 / block) * block)
        return patterns.attention_sinks(block) | patterns.sliding_window(window)
    if mode == "vertical_slash":
        return patterns.estimated_vertical_slash(density / 4, density / 4, sink_blocks=1)
    if mode == "pooled":
        return patterns.pooled_coverage(0.9, max_fraction=min(1.0, density / 2), sink_blocks=1)
    raise SystemExit(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


def causal_blocks(tokens: int, block: int) -> int:
    blocks = math.ceil(tokens / block)
    return blocks * (blocks + 1) // 2


def layer_inputs(model, tokens: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Random q ``[1, H, S, D]`` and k/v ``[1, Hkv, S, D]`` of the model's attention geometry."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, config.num_attention_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, config.num_key_value_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, config.num_key_value_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    return q, k, v


def dense_attention_ms(model, q, k, v, repeats: int) -> float:
    """Milliseconds of one layer's dense attention as the model runs it (transformers' SDPA function)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = model.model.layers[0].self_attn
    with torch.no_grad():
        return time_ms(lambda: sdpa_attention_forward(module, q, k, v, None, scaling=module.scaling, is_causal=True),
                       repeats)


def kernel_ms(runtime, mask, q, k, v, scale: float, repeats: int) -> float:
    """Milliseconds of the backend's kernel alone on the site's sparse heads (plan prepared, q already selected)."""
    heads = runtime.adaptive_heads if runtime.adaptive_heads.numel() else runtime.sparse_heads
    backend = runtime.backend_for(q.dtype, q.device)
    selected = q.index_select(1, heads)
    plan = backend.prepare(mask, q_shape=tuple(selected.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
                           dtype=q.dtype, device=q.device)
    return time_ms(lambda: backend.run(plan, selected, k, v, attn_mask=None, scale=scale), repeats)


def chunked_prefill(model, ids: torch.Tensor, chunk: int):
    """Prefill ``ids`` ``chunk`` tokens at a time through a DynamicCache; the last chunk's last logits."""
    import transformers

    cache = transformers.DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], **{keyword: cache}, use_cache=True, logits_to_keep=1).logits
    return logits


def profile_table(function, path: str) -> None:
    """Write a torch.profiler table (top ops by device time, then by host time) of one call of ``function``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        function()
        synchronize()
    averages = profiler.key_averages()
    device_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = (averages.table(sort_by=device_key, row_limit=30) + "\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=30))
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    print(f"profile written to {path}", flush=True)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="llama-1b, qwen-7b, tiny (default, with --lengths unset: the --quick plan)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 32K 64K 128K)")
    parser.add_argument("--layers", type=int, default=None, help="layers of every shape (default: the shape's own)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--density", type=float, default=0.08, help="target share of the causal blocks")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--chunk", type=int, default=0, help="also time a chunked prefill with chunks of this size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table of one sparse forward")
    parser.add_argument("--quick", action="store_true",
                        help="the ~4-minute H100 run (the default without --shapes/--lengths): llama-1b at 32K and "
                             "128K, qwen-7b (2 layers) at 128K, chunks of 16K")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def plan(arguments) -> list[tuple[str, int | None, int]]:
    """(shape, layers, tokens) cases in order."""
    if arguments.quick:
        return [("llama-1b", None, 32768), ("llama-1b", None, 131072), ("qwen-7b", 2, 131072)]
    shapes = arguments.shapes or ["llama-1b", "qwen-7b"]
    lengths = arguments.lengths or [32768, 65536, 131072]
    return [(shape, arguments.layers, tokens) for shape in shapes for tokens in lengths]


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    arguments.quick = arguments.quick or (arguments.shapes is None and arguments.lengths is None)
    if arguments.quick and not arguments.chunk:
        arguments.chunk = 16384
    device = arguments.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    block = arguments.block_size
    out = arguments.out or os.path.join(RESULTS, f"llm_prefill_{'gpu' if device != 'cpu' else 'cpu'}.json")
    meta = {"device": machine(), "torch": torch.__version__, "dtype": str(dtype), "block_size": block,
            "density_target": arguments.density, "backend": arguments.backend, "chunk": arguments.chunk}
    cases = plan(arguments)
    with RowLog(out, meta=meta) as log, torch.no_grad():
        built = None
        for shape, layers, tokens in cases:
            if built is None or built[0] != (shape, layers):
                model = build_model(shape, layers=layers, max_tokens=max(t for _, _, t in cases), device=device,
                                    dtype=dtype)
                built = ((shape, layers), model)
            model = built[1]
            layer_count = model.config.num_hidden_layers
            ids = torch.randint(2, model.config.vocab_size, (1, tokens), device=device,
                                generator=torch.Generator(device=device).manual_seed(tokens))
            dense_ms = time_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), arguments.repeats)
            q, k, v = layer_inputs(model, tokens, device, dtype)
            dense_attention = dense_attention_ms(model, q, k, v, max(arguments.repeats, 3)) * layer_count
            other = dense_ms - dense_attention
            log.add(shape=shape, layers=layer_count, tokens=tokens, mode="dense", density=1.0, ttft_ms=dense_ms,
                    speedup=1.0, attention_ms=dense_attention, attention_share=dense_attention / dense_ms)
            sites = attention_sites(model)
            for mode in arguments.modes:
                pattern = mode_pattern(mode, arguments.density, tokens, block)
                strategy = sparsify.Strategy.uniform(sites, pattern, block_size=block)
                attached = sparsify.attach(model, strategy, backend=arguments.backend)
                runtime = next(iter(attached_sites(attached).values()))
                scale = 1.0 / math.sqrt(q.shape[-1])
                estimation = 0.0
                if runtime.adaptive_heads.numel():
                    mask = runtime.adaptive_source.mask(q, k, scale=scale)
                    kept = float(mask.kept_counts().sum()) / (q.shape[1] * causal_blocks(tokens, block))
                    estimation = time_ms(lambda: runtime.adaptive_source.mask(q, k, scale=scale),
                                         max(arguments.repeats, 3)) * layer_count
                else:
                    mask = runtime.runtime_mask(tokens, tokens, q.device)
                    kept = float(mask.kept_counts().sum()) / (mask.num_heads * causal_blocks(tokens, block))
                sparse_attention = time_ms(lambda: runtime.attend(q, k, v, None, scale, is_causal=True),
                                           max(arguments.repeats, 3)) * layer_count
                kernel = kernel_ms(runtime, mask, q, k, v, scale, max(arguments.repeats, 3)) * layer_count
                sparse_ms = time_ms(lambda: attached(ids, use_cache=False, logits_to_keep=1), arguments.repeats)
                ideal = other + kept * dense_attention
                row = dict(shape=shape, layers=layer_count, tokens=tokens, mode=mode, density=kept, ttft_ms=sparse_ms,
                           speedup=dense_ms / sparse_ms, attention_ms=sparse_attention,
                           attention_speedup=dense_attention / sparse_attention, estimation_ms=estimation,
                           estimation_share=estimation / sparse_attention, ideal_ms=ideal, of_ideal=ideal / sparse_ms,
                           attention_of_ideal=kept * dense_attention / sparse_attention, kernel_ms=kernel,
                           kernel_of_ideal=kept * dense_attention / kernel,
                           glue_ms=sparse_attention - kernel - estimation,
                           backend=runtime.backend_for(q.dtype, q.device).name)
                if arguments.chunk and arguments.chunk < tokens:
                    chunked_ms = time_ms(lambda: chunked_prefill(attached, ids, arguments.chunk), 1)
                    row.update(chunked_ms=chunked_ms, chunked_ratio=chunked_ms / sparse_ms)
                log.add(**row)
                if arguments.profile:
                    profile_table(lambda: attached(ids, use_cache=False, logits_to_keep=1),
                                  os.path.join(RESULTS, f"llm_prefill_profile_{shape}_{tokens}_{mode}.txt"))
                del attached, runtime, mask
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            del q, k, v
    print(log.table(), file=sys.stdout)


if __name__ == "__main__":
    main()
