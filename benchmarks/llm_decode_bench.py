"""Decode at long context: one decode step's attention, dense vs query-aware (Quest-like) page selection.

Per context length and batch size the script times, on one layer of the model's attention
geometry (``llama-1b`` by default: 32 query / 8 key-value heads of 64, bf16):

* ``dense`` — transformers' SDPA attention of one new token over the whole cache;
* ``quest`` — `sparsify.runtime.decode.QueryAwareDecoder`: the new token's page summary update,
  the page bounds and top-k selection, the gather of the selected pages and SDPA over them
  (the whole step, as the transformers door runs it).

``read`` is the fraction of the cache one step reads (sink, window and budget pages);
``speedup`` dense / quest per token. ``--model-step`` also times a whole decode step of the model
(every layer, MLPs included) with a cache filled with random keys, dense vs attached with
``decode=query_aware_decode(...)``. ``--compile`` times the quest step under ``torch.compile``
too (one graph for every step).

    python benchmarks/llm_decode_bench.py                                   # 32K/64K/128K, batch 1 and 8 (~1 min on an H100)
    python benchmarks/llm_decode_bench.py --budget 0.05 --page-size 16 --model-step
    python benchmarks/llm_decode_bench.py --device cpu --shapes tiny --lengths 4096 --batches 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import sparsify
from bench_rows import RowLog
from llm_bench_tools import attention_sites, build_model, machine, time_ms
from sparsify.patterns import query_aware_decode
from sparsify.runtime.decode import QueryAwareDecoder, read_fraction

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-1b"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=float, default=0.05, help="share of pages chosen by the bound")
    parser.add_argument("--page-size", type=int, default=32)
    parser.add_argument("--sink-pages", type=int, default=1)
    parser.add_argument("--window-pages", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="layers of the model for --model-step")
    parser.add_argument("--model-step", action="store_true", help="also time a whole decode step of the model")
    parser.add_argument("--compile", action="store_true", help="also time the quest step under torch.compile")
    parser.add_argument("--repeats", type=int, default=20)
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

        def step():
            output = runner(token, cache=cache, use_cache=True, position_ids=position)
            for layer in cache.layers:                       # drop the new slot: every step sees the same cache
                layer.keys, layer.values = layer.keys[:, :, :tokens], layer.values[:, :, :tokens]
            return output

        times[name] = time_ms(step, repeats, warmup=2)
        del cache
    return times


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    device = arguments.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    pattern = query_aware_decode(arguments.budget, page_size=arguments.page_size, sink_pages=arguments.sink_pages,
                                 window_pages=arguments.window_pages)
    out = arguments.out or os.path.join(RESULTS, f"llm_decode_{'gpu' if device != 'cpu' else 'cpu'}.json")
    meta = {"device": machine(), "torch": torch.__version__, "dtype": str(dtype), "pattern": pattern.to_dict()}
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with RowLog(out, meta=meta) as log, torch.no_grad():
        for shape in arguments.shapes:
            model = build_model(shape, layers=arguments.layers, max_tokens=max(arguments.lengths) + 16, device=device,
                                dtype=dtype)
            config = model.config
            module = model.model.layers[0].self_attn
            attached = None
            if arguments.model_step:
                strategy = sparsify.Strategy.dense(attention_sites(model), block_size=128)
                attached = sparsify.attach(model, strategy, decode=pattern)
            for tokens in arguments.lengths:
                for batch in arguments.batches:
                    query, keys, values = random_cache(config, batch, tokens, device, dtype, seed=tokens + batch)
                    dense = time_ms(lambda: sdpa_attention_forward(module, query, keys, values, None,
                                                                   scaling=module.scaling), arguments.repeats, 3)
                    decoder = QueryAwareDecoder(pattern, num_heads=config.num_attention_heads,
                                                num_kv_heads=config.num_key_value_heads).to(device)
                    decoder.observe_prefill(keys, 0, tokens - 1)
                    quest = time_ms(lambda: decoder(query, keys, values, None, module.scaling), arguments.repeats, 3)
                    row = dict(shape=shape, tokens=tokens, batch=batch, read=read_fraction(pattern, tokens),
                               dense_us=dense * 1e3, quest_us=quest * 1e3, speedup=dense / quest)
                    if arguments.compile:
                        compiled = torch.compile(decoder, fullgraph=True)
                        row["quest_compiled_us"] = time_ms(lambda: compiled(query, keys, values, None, module.scaling),
                                                           arguments.repeats, 3) * 1e3
                        row["speedup_compiled"] = dense * 1e3 / row["quest_compiled_us"]
                    if attached is not None:
                        step = model_step_ms(model, attached, batch, tokens, device, dtype, max(5, arguments.repeats // 4))
                        row.update(model_dense_ms=step["dense"], model_quest_ms=step["quest"],
                                   model_speedup=step["dense"] / step["quest"])
                    log.add(**row)
                    del query, keys, values, decoder
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            del model, attached
    print(log.table(), file=sys.stdout)


if __name__ == "__main__":
    main()
