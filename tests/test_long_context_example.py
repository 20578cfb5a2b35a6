"""examples/long_context.py's checks on a tiny random-weight Llama: what they report against dense references."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import model_zoo

from sparsify.patterns import query_aware_decode

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import long_context  # noqa: E402

transformers = pytest.importorskip("transformers")


def test_decode_check_reading_every_page_agrees_with_dense_and_a_small_budget_reads_less():
    model = model_zoo.llama(layers=3, vocab=96)[0]
    prompt = torch.randint(0, 96, (1, 96), generator=torch.Generator().manual_seed(1))
    every_page = long_context.decode_check(model, prompt, 6, query_aware_decode(1.0, page_size=8), dense_layers=1)
    assert every_page["agreement"] == 1.0 and every_page["free_run_prefix"] == 6
    assert abs(every_page["ppl_ratio"] - 1.0) < 1e-4 and every_page["read"] == pytest.approx(1.0)
    sparse = long_context.decode_check(model, prompt, 6, query_aware_decode(0.05, page_size=8, min_pages=1,
                                                                            window_pages=1), dense_layers=1)
    assert sparse["read"] < 0.5 and sparse["ppl_ratio"] != pytest.approx(1.0, abs=1e-6)


def test_chunked_check_static_pattern_gives_the_one_call_logits():
    from sparsify import patterns

    model = model_zoo.llama(layers=3, vocab=96)[0]
    ids = torch.randint(0, 96, (1, 128), generator=torch.Generator().manual_seed(2))
    row = long_context.chunked_check(model, ids, 32, 16, patterns.estimated_vertical_slash(0.2, 0.2, sink_blocks=1))
    assert row["static_difference"] < 1e-5 and row["static_error"] > 1e-3
    assert row["one_call_error"] > 0 and row["chunked_error"] > 0


def test_exact_mass_decoder_ranks_pages_by_their_softmax_mass():
    decoder = long_context.ExactMassDecoder(query_aware_decode(0.5, page_size=4), num_heads=4, num_kv_heads=2,
                                            kernels="torch")
    gen = torch.Generator().manual_seed(3)
    grouped, keys = torch.randn(1, 2, 2, 8, generator=gen), torch.randn(1, 2, 14, 8, generator=gen)
    end = torch.tensor(11)                                                # slots 11.. are past the cache's end
    scores = decoder.page_scores(grouped, keys, end, None)
    assert scores.shape == (1, 2, 4)
    for head in range(2):
        for page in range(4):
            masses = []
            for row in range(2):
                weights = torch.softmax(grouped[0, head, row] @ keys[0, head, :11].T / 8 ** 0.5, -1)
                masses.append(float(weights[page * 4:min(page * 4 + 4, 11)].sum()))
            assert scores[0, head, page].item() == pytest.approx(max(masses), abs=1e-6)


def test_decode_check_with_exact_page_choice_reads_the_same_share_and_agrees_at_every_page():
    model = model_zoo.llama(layers=3, vocab=96)[0]
    prompt = torch.randint(0, 96, (1, 96), generator=torch.Generator().manual_seed(4))
    every_page = long_context.decode_check(model, prompt, 4, query_aware_decode(1.0, page_size=8), dense_layers=1,
                                           page_choice="exact")
    assert every_page["agreement"] == 1.0 and abs(every_page["ppl_ratio"] - 1.0) < 1e-4
    pattern = query_aware_decode(0.05, page_size=8, min_pages=1, window_pages=1)
    bound = long_context.decode_check(model, prompt, 4, pattern, dense_layers=1)
    exact = long_context.decode_check(model, prompt, 4, pattern, dense_layers=1, page_choice="exact")
    assert exact["read"] == pytest.approx(bound["read"]) and exact["read"] < 0.5


def test_reranking_every_page_ranks_as_the_exact_mass_and_few_candidates_score_only_them():
    pattern = query_aware_decode(0.25, page_size=4, min_pages=1, window_pages=1, sink_pages=0)
    gen = torch.Generator().manual_seed(5)
    grouped, keys = torch.randn(1, 2, 2, 8, generator=gen), torch.randn(1, 2, 30, 8, generator=gen)
    end = torch.tensor(27)
    exact = long_context.ExactMassDecoder(pattern, num_heads=4, num_kv_heads=2, kernels="torch")
    every = long_context.RerankedDecoder(pattern, num_heads=4, num_kv_heads=2, kernels="torch", factor=100)
    few = long_context.RerankedDecoder(pattern, num_heads=4, num_kv_heads=2, kernels="torch", factor=1)
    for decoder in (exact, every, few):
        decoder.observe_prefill(keys, 0, 27)
    valid = slice(0, 7)                                                    # pages holding a slot before the end
    expected = exact.page_scores(grouped, keys, end, None)[..., valid]
    assert torch.equal(every.page_scores(grouped, keys, end, None)[..., valid].argsort(-1), expected.argsort(-1))
    scored = few.page_scores(grouped, keys, end, None).isfinite().sum(-1)
    assert scored.tolist() == [[pattern.selected_pages(8)] * 2]            # only the bound's candidates
