"""What the long-context LLM benchmarks share: model shapes built from configs, their attention sites, timers, decode pattern options.

Shapes (random weights, no download):

* ``llama-1b``: Llama-3.2-1B's geometry — 16 layers, hidden 2048, 32 query / 8 key-value heads of
  64, MLP 8192, vocabulary 128256, RoPE θ 500000.
* ``qwen-7b``: Qwen2.5-7B's attention geometry — hidden 3584, 28 query / 4 key-value heads of 128,
  MLP 18944, vocabulary 152064, RoPE θ 1e6 (fewer layers than the real 28: ``--layers``).
* ``tiny``: 2 layers, hidden 256, 4 / 2 heads of 64 — CPU smoke runs.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

import sparsify
from timing import median_ms

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     intermediate_size=8192, vocab_size=128256, rope_theta=500000.0),
    "qwen-7b": dict(num_hidden_layers=4, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                    intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0),
    "tiny": dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=512, vocab_size=1024, rope_theta=10000.0),
}


def build_model(shape: str, *, layers: int | None, max_tokens: int, device: str, dtype: torch.dtype, seed: int = 0):
    """A ``LlamaForCausalLM`` of ``shape`` (random weights, SDPA attention, eval mode) on ``device`` in ``dtype``."""
    import transformers

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    settings = dict(SHAPES[shape])
    if layers:
        settings["num_hidden_layers"] = layers
    theta = settings.pop("rope_theta")
    config = transformers.LlamaConfig(**settings, max_position_embeddings=max(max_tokens, 8192),
                                      rope_parameters={"rope_type": "default", "rope_theta": theta},
                                      bos_token_id=0, eos_token_id=1, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval()


def attention_sites(model) -> list[sparsify.AttentionSite]:
    """The model's attention sites read off its modules (graph capture at 1B scale costs more than the benchmark)."""
    from sparsify.integrations.transformers import attention_sites as read_sites

    return read_sites(model)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(function: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``function`` on this process's device (`timing.median_ms`), after ``warmup`` calls."""
    return median_ms(function, "cuda" if torch.cuda.is_available() else "cpu", repeats, warmup)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def add_decode_pattern_arguments(parser: argparse.ArgumentParser, *, budget: float, page_size: int) -> None:
    """The options of a ``query_aware_decode`` pattern (`decode_pattern`), with this script's default budget and page size."""
    parser.add_argument("--budget", type=float, default=budget, help="share of pages chosen by the bound")
    parser.add_argument("--page-size", type=int, default=page_size)
    parser.add_argument("--sink-pages", type=int, default=1)
    parser.add_argument("--window-pages", type=int, default=4)
    parser.add_argument("--min-pages", type=int, default=4,
                        help="pages the bound chooses at least, whatever --budget; with --budget 0 a budget in "
                             "tokens as Quest's: --min-pages 128 --page-size 32 reads 4096 tokens at any length, "
                             "plus the sink and window pages")


def decode_pattern(arguments: argparse.Namespace):
    """The ``query_aware_decode`` pattern of the options `add_decode_pattern_arguments` declared."""
    from sparsify.patterns import query_aware_decode

    return query_aware_decode(arguments.budget, page_size=arguments.page_size, sink_pages=arguments.sink_pages,
                              window_pages=arguments.window_pages, min_pages=arguments.min_pages)
