"""Decode at long context: one decode step's attention, dense vs query-aware (Quest-like) page selection, eager and as a CUDA graph.

Per context length and batch size the script times, on one layer of the model's attention
geometry (``llama-1b`` by default: 32 query / 8 key-value heads of 64, bf16):

* ``dense`` — transformers' SDPA attention of one new token over the whole cache;
* ``quest`` — `sparsify.runtime.decode.QueryAwareDecoder` on its fast path (CUDA: the Triton
  kernels — summary update, page scores, top-k, split-K attention reading only the selected pages
  in place, combine): the whole step, as the transformers door runs it;
* ``quest_torch`` — the same step on the torch reference path (gather + SDPA), for comparison.

Each is timed eagerly (``*_us``) and replayed as a captured CUDA graph (``*_graph_us``: one decode
step captured with ``torch.cuda.CUDAGraph``, as ``torch.compile(mode="reduce-overhead")`` runs
decode), in microseconds per layer step, the L2 cache flushed before every timed call (a real
decode step reads each layer's cache cold; ``--warm-l2`` skips the flush). ``read`` is the
fraction of the cache's pages one step reads (sink, window and budget pages); ``speedup`` /
``speedup_graph`` are dense / quest per token. ``--model-step`` also times a whole decode step of
the model (every layer, MLPs included) with a cache filled with random keys, dense vs attached with
``decode=query_aware_decode(...)``. ``--compile`` times the quest step under ``torch.compile`` too.
``--breakdown`` (CUDA) also times each launch of the Triton step alone as a CUDA graph (L2 flushed):
``scores_graph_us`` (summary update + page bounds), ``top_pages_graph_us`` (the step's page selection,
`triton_decode.top_pages`: a radix select in registers per head), ``attention_graph_us``
(split-K pass + combine) and ``combine_graph_us`` — where a batch-1 step's time goes; the pieces'
sum against ``quest_graph_us`` is what running them in one graph saves or costs. ``topk_graph_us``
times what the selection replaced, ``torch.topk`` (the step went back to it if it won);
``attention_<n>_per_sm_graph_us`` the attention with
``n`` split-K programs per multiprocessor instead of `triton_decode.PROGRAMS_PER_MULTIPROCESSOR`
(fewer, longer programs and a shorter combine).

    python benchmarks/llm_decode_bench.py                                   # 32K/64K/128K, batch 1 and 8 (~1-2 min on an H100)
    python benchmarks/llm_decode_bench.py --budget 0.05 --page-size 16 --model-step
    python benchmarks/llm_decode_bench.py --device cpu --shapes tiny --lengths 4096 --batches 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import sparsify
from bench_rows import RowLog
from llm_bench_tools import (SHAPES, add_decode_pattern_arguments, attention_sites, build_model, decode_pattern,
                             machine, time_ms)
from sparsify.integrations.transformers import cache_keyword
from sparsify.runtime.decode import QueryAwareDecoder, read_fraction

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-1b"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    add_decode_pattern_arguments(parser, budget=0.05, page_size=32)
    parser.add_argument("--layers", type=int, default=None, help="layers of the model for --model-step")
    parser.add_argument("--model-step", action="store_true", help="also time a whole decode step of the model")
    parser.add_argument("--compile", action="store_true", help="also time the quest step under torch.compile")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warm-l2", action="store_true", help="do not flush the L2 cache before each timed call")
    parser.add_argument("--no-torch-path", action="store_true", help="skip the torch reference path")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each launch of the Triton step alone (CUDA graphs): scores, top-k, attention, "
                             "combine")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def random_cache(config, batch: int, tokens: int, device: str, dtype: torch.dtype, seed: int):
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, config.num_key_value_heads, tokens, head_dim)
    keys = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    values = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    query = torch.randn(batch, config.num_attention_heads, 1, head_dim, device=device, dtype=dtype, generator=gen)
    return query, keys, values


def model_step_ms(model, attached, batch: int, tokens: int, device: str, dtype: torch.dtype, repeats: int):
    """Milliseconds of one decode step of the whole model, dense and attached, over a cache of random keys."""
    import transformers

    config = model.config
    times = {}
    for name, runner in (("dense", model), ("quest", attached)):
        cache = transformers.DynamicCache(config=config)
        for layer in range(config.num_hidden_layers):
            _, keys, values = random_cache(config, batch, tokens, device, dtype, seed=layer)
            cache.update(keys, values, layer)
            if runner is attached:
                attention = attached.model.layers[layer].self_attn
                attention.sparse_decoder.observe_prefill(keys, 0, tokens)
        token = torch.randint(2, config.vocab_size, (batch, 1), device=device)
        position = torch.full((batch, 1), tokens, device=device)

        keyword = cache_keyword(runner)                      # (read once: a signature costs ~20 µs)

        def step():
            output = runner(token, **{keyword: cache}, use_cache=True, position_ids=position)
            for layer in cache.layers:                       # drop the new slot: every step sees the same cache
                layer.keys, layer.values = layer.keys[:, :, :tokens], layer.values[:, :, :tokens]
            return output

        times[name] = time_ms(step, repeats, warmup=2)
        del cache
    return times


class StepTimer:
    """Median microseconds of one call, eagerly or as a replayed CUDA graph, with the L2 cache flushed before each."""

    def __init__(self, device: str, repeats: int, flush_l2: bool):
        self.device, self.repeats = torch.device(device), repeats
        self.flush = (torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
                      if flush_l2 and self.device.type == "cuda" else None)

    def eager_us(self, function) -> float:
        if self.device.type != "cuda":
            return time_ms(function, self.repeats, 3) * 1e3
        for _ in range(3):
            function()
        times = []
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def graph_us(self, function) -> float | None:
        """Capture one call of ``function`` as a CUDA graph (after a warm-up on a side stream) and time its replay."""
        if self.device.type != "cuda":
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                function()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            function()
        replay = self.eager_us(graph.replay)
        del graph
        return replay


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    device = arguments.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    pattern = decode_pattern(arguments)
    out = arguments.out or os.path.join(RESULTS, f"llm_decode_{'gpu' if device != 'cpu' else 'cpu'}.json")
    timer = StepTimer(device, arguments.repeats, flush_l2=not arguments.warm_l2)
    meta = {"device": machine(), "torch": torch.__version__, "dtype": str(dtype), "pattern": pattern.to_dict(),
            "l2_flushed": timer.flush is not None, "unit": "microseconds per layer decode step"}
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with RowLog(out, meta=meta) as log, torch.no_grad():
        for shape in arguments.shapes:
            model = None
            if arguments.model_step:
                model = build_model(shape, layers=arguments.layers, max_tokens=max(arguments.lengths) + 16,
                                    device=device, dtype=dtype)
            config, attention = _attention_layer(shape)
            scaling = attention.scaling
            attached = None
            if model is not None:
                strategy = sparsify.Strategy.dense(attention_sites(model), block_size=128)
                attached = sparsify.attach(model, strategy, decode=pattern)
            for tokens in arguments.lengths:
                for batch in arguments.batches:
                    query, keys, values = random_cache(config, batch, tokens, device, dtype, seed=tokens + batch)

                    def dense():
                        return sdpa_attention_forward(attention, query, keys, values, None, scaling=scaling)

                    decoders = {}
                    for name, kernels in (("quest", "auto"), ("quest_torch", "torch")):
                        if name == "quest_torch" and arguments.no_torch_path:
                            continue
                        decoder = QueryAwareDecoder(pattern, num_heads=config.num_attention_heads,
                                                    num_kv_heads=config.num_key_value_heads, kernels=kernels)
                        decoder.observe_prefill(keys, 0, tokens - 1)
                        decoders[name] = decoder
                    row = dict(shape=shape, tokens=tokens, batch=batch, read=read_fraction(pattern, tokens),
                               kernels="triton" if decoders["quest"].uses_triton(query, keys, values) else "torch")
                    row["dense_us"] = timer.eager_us(dense)
                    for name, decoder in decoders.items():
                        row[f"{name}_us"] = timer.eager_us(lambda: decoder(query, keys, values, None, scaling))
                    row["speedup"] = row["dense_us"] / row["quest_us"]
                    if timer.device.type == "cuda":
                        row["dense_graph_us"] = timer.graph_us(dense)
                        for name, decoder in decoders.items():
                            row[f"{name}_graph_us"] = timer.graph_us(lambda: decoder(query, keys, values, None,
                                                                                     scaling))
                        row["speedup_graph"] = row["dense_graph_us"] / row["quest_graph_us"]
                    if arguments.breakdown and row["kernels"] == "triton" and timer.device.type == "cuda":
                        row.update(step_breakdown(timer, decoders["quest"], query, keys, values, scaling))
                    if arguments.compile:
                        compiled = torch.compile(decoders["quest"], fullgraph=True)
                        row["quest_compiled_us"] = timer.eager_us(lambda: compiled(query, keys, values, None, scaling))
                        row["speedup_compiled"] = row["dense_us"] / row["quest_compiled_us"]
                    if attached is not None:
                        step = model_step_ms(model, attached, batch, tokens, device, dtype, max(5, arguments.repeats // 4))
                        row.update(model_dense_ms=step["dense"], model_quest_ms=step["quest"],
                                   model_speedup=step["dense"] / step["quest"])
                    log.add(**row)
                    del query, keys, values, decoders
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            del model, attached
    print(log.table(), file=sys.stdout)


def step_breakdown(timer: StepTimer, decoder: QueryAwareDecoder, query, keys, values, scale: float) -> dict:
    """Microseconds of each launch of the decoder's Triton step alone (CUDA graph replays), on its current summaries."""
    from sparsify.backends import triton_decode

    pattern, rows, k_len = decoder.pattern, query.shape[2], keys.shape[2]
    page = pattern.page_size
    pages = -(-k_len // page)
    selected = pattern.selected_pages(pages)
    summaries = decoder.summaries
    summaries.reserve(keys, pages)

    def scores():
        return triton_decode.page_scores(query, summaries.minimum, summaries.maximum, None, pages, page,
                                         pattern.sink_pages, pattern.window_pages, key=keys, new_tokens=rows)

    bounds = scores()
    chosen = triton_decode.top_pages(bounds, selected)
    batch, heads = query.shape[:2]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    block_r = triton_decode._padded(group * rows)
    splits, _ = triton_decode.split_count(batch * kv_heads, selected * page, query.device)
    partial = torch.randn(batch * kv_heads * splits * block_r, triton_decode._padded(values.shape[-1]),
                          device=query.device)
    max_score = torch.randn(batch * kv_heads * splits * block_r, device=query.device)
    total = torch.rand_like(max_score) + 1.0
    out = query.new_empty(batch, heads, rows, values.shape[-1])
    per_multiprocessor = {f"attention_{count}_per_sm_graph_us": timer.graph_us(
        lambda count=count: triton_decode.selected_pages_attention(query, keys, values, chosen, None, None, scale, page,
                                                                   per_multiprocessor=count))
        for count in (1, 2, 8) if count != triton_decode.PROGRAMS_PER_MULTIPROCESSOR}
    return {
        "splits": splits,
        **per_multiprocessor,
        "scores_graph_us": timer.graph_us(scores),
        "top_pages_graph_us": timer.graph_us(lambda: triton_decode.top_pages(bounds, selected)),
        "topk_graph_us": timer.graph_us(lambda: bounds.topk(selected, dim=-1, sorted=False)),
        "attention_graph_us": timer.graph_us(lambda: triton_decode.selected_pages_attention(
            query, keys, values, chosen, None, None, scale, page)),
        "combine_graph_us": timer.graph_us(lambda: triton_decode.combine_splits(
            partial, max_score, total, out, kv_heads, group, rows, splits, block_r)),
    }


def _attention_layer(shape: str):
    """``(config, attention module)`` of ``shape``: one Llama attention layer on the meta device (what SDPA's
    transformers wrapper reads of it: GQA groups, causality, scale), without building the model."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaAttention

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    settings = dict(SHAPES[shape])
    settings.pop("rope_theta")
    config = transformers.LlamaConfig(**settings, attn_implementation="sdpa")
    with torch.device("meta"):
        return config, LlamaAttention(config, layer_idx=0)


if __name__ == "__main__":
    main()
