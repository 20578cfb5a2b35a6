"""Greedy decode through transformers' StaticCache under torch.compile: one graph for every step, the eager tokens.

A static cache hands attention its whole capacity and hides the unused slots with the mask, so
a decode step must find its position on the device (no host read, or every step would compile
anew). Checked for ``decode="sparse"`` (the pattern's rows at the step's position) and for a
decode pattern (query-aware pages; the Triton kernels too, interpreted on CPU), against eager
greedy decode: through a growing (dynamic) cache for ``decode="sparse"`` (where the position is the
cache's length), through the same static cache for a decode pattern (whose page count is the
cache's capacity).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import model_zoo
import sparsify
from backend_helpers import HAS_CUDA, rel_err
from sparsify import patterns
from sparsify.integrations.transformers import cache_keyword

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

WINDOW = patterns.sliding_window(32) | patterns.attention_sinks(16)
PROMPT, STEPS, CAPACITY = 80, 8, 112


def _greedy(prefill_model, step_model, ids, cache):
    """``(tokens [B, STEPS], logits [B, STEPS, V])`` of greedy decode after prefilling ``ids`` through ``cache``."""
    tokens, logits = [], []
    with torch.no_grad():
        out = prefill_model(ids, **{cache_keyword(prefill_model): cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for position in range(ids.shape[1], ids.shape[1] + STEPS):
            step = step_model(token, **{cache_keyword(step_model): cache}, use_cache=True,
                              position_ids=torch.full((ids.shape[0], 1), position, device=ids.device))
            logits.append(step.logits[:, -1].clone())                      # CUDA graph outputs are overwritten
            token = step.logits[:, -1:].argmax(-1)
            tokens.append(token)
    assert cache.get_seq_length() == ids.shape[1] + STEPS        # every call wrote into the cache it was handed
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def _greedy_counting_decoder_steps(model, ids, cache) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`_greedy` eagerly, and how many times the attached model's query-aware decoders ran a step: one per layer and
    step when the cache really reaches attention (a forward that ignores its cache argument runs none)."""
    calls = []
    hooks = [module.register_forward_hook(lambda *_: calls.append(1))
             for module in model.modules() if type(module).__name__ == "QueryAwareDecoder"]
    try:
        tokens, logits = _greedy(model, model, ids, cache)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens, logits, len(calls)


# (The torch path of a decode pattern under a compiled static cache: test_transformers.py.)
@pytest.mark.parametrize("decode", ["sparse", "query_aware_triton"])
def test_compiled_static_cache_decode_gives_the_eager_tokens_without_recompiling(decode):
    import transformers

    if decode == "query_aware_triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    model, _ = model_zoo.llama(seq=PROMPT, batch=2)
    sites = sparsify.find_attention(model, {"input_ids": torch.zeros(2, PROMPT, dtype=torch.long)})
    strategy = sparsify.Strategy.uniform(sites, WINDOW, block_size=16)
    # The Triton kernels run compiled on CUDA, interpreted on CPU tensors where there is none.
    device = "cuda" if HAS_CUDA and decode == "query_aware_triton" else "cpu"
    model = model.to(device)
    mode = "sparse" if decode == "sparse" else patterns.query_aware_decode(0.3, page_size=8, min_pages=1)
    attached = sparsify.attach(model, strategy, decode=mode)
    reference = sparsify.attach(model, strategy, decode=mode)
    if decode == "query_aware_triton":
        for module in attached.modules():
            if hasattr(module, "sparse_decoder"):
                module.sparse_decoder.kernels = "triton"
    ids = torch.randint(2, model_zoo.VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(21)).to(device)

    # decode="sparse" reads the rows at the step's position whatever the cache; a decode pattern picks a share of the
    # cache's pages, and a static cache's page count is its capacity: its eager reference is the same static cache.
    reference_cache = (transformers.DynamicCache(config=model.config) if decode == "sparse"
                       else transformers.StaticCache(config=model.config, max_cache_len=CAPACITY))
    expected_tokens, expected_logits, decoder_steps = _greedy_counting_decoder_steps(reference, ids, reference_cache)
    assert decoder_steps == (0 if decode == "sparse" else STEPS * model.config.num_hidden_layers)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(attached)
    static = transformers.StaticCache(config=model.config, max_cache_len=CAPACITY)
    with torch._dynamo.config.patch(error_on_recompile=True):                 # a second graph for any step fails
        tokens, logits = _greedy(attached, compiled, ids, static)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(tokens, expected_tokens)
    assert rel_err(logits, expected_logits) < (1e-4 if device == "cpu" else 1e-3)
    if decode == "sparse":                                                    # the window really cuts the context
        dense_logits = _greedy(model, model, ids, transformers.DynamicCache(config=model.config))[1]
        assert rel_err(logits, dense_logits) > 1e-3


def test_sparse_decode_through_a_static_cache_reads_the_pattern_rows_at_the_step_position():
    import transformers

    model, _ = model_zoo.llama(seq=PROMPT, batch=1)
    sites = sparsify.find_attention(model, {"input_ids": torch.zeros(1, PROMPT, dtype=torch.long)})
    attached = sparsify.attach(model, sparsify.Strategy.uniform(sites, WINDOW, block_size=16), decode="sparse")
    ids = torch.randint(2, model_zoo.VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(22))
    growing = _greedy(attached, attached, ids, transformers.DynamicCache(config=model.config))[1]
    static = _greedy(attached, attached, ids, transformers.StaticCache(config=model.config, max_cache_len=CAPACITY))[1]
    longer = _greedy(attached, attached, ids, transformers.StaticCache(config=model.config, max_cache_len=144))[1]
    assert rel_err(static, growing) < 1e-5 and rel_err(longer, growing) < 1e-5   # the capacity does not matter


@pytest.mark.gpu
def test_query_aware_decode_replays_as_cuda_graphs_under_reduce_overhead():
    import transformers

    model, _ = model_zoo.llama(seq=PROMPT, batch=2)
    sites = sparsify.find_attention(model, {"input_ids": torch.zeros(2, PROMPT, dtype=torch.long)})
    model = model.to("cuda")
    pattern = patterns.query_aware_decode(0.3, page_size=8, min_pages=1)
    strategy = sparsify.Strategy.uniform(sites, WINDOW, block_size=16)
    attached = sparsify.attach(model, strategy, decode=pattern)
    reference = sparsify.attach(model, strategy, decode=pattern)
    ids = torch.randint(2, model_zoo.VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(23)).to("cuda")
    expected_tokens, expected_logits, decoder_steps = _greedy_counting_decoder_steps(
        reference, ids, transformers.StaticCache(config=model.config, max_cache_len=CAPACITY))
    assert decoder_steps == STEPS * model.config.num_hidden_layers         # each step decoded through the cache
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(attached, mode="reduce-overhead")
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, logits = _greedy(attached, compiled, ids,
                                 transformers.StaticCache(config=model.config, max_cache_len=CAPACITY))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])     # really replayed as graphs
    assert torch.equal(tokens, expected_tokens)
    assert rel_err(logits, expected_logits) < 1e-3
