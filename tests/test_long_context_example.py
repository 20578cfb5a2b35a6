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
