"""benchmarks/quality_pareto.py's strategy runner (a tiny random-weight Llama built from a config: no downloads)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import model_zoo
import sparsify
from sparsify import patterns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for folder in ("benchmarks", "examples"):
    if os.path.join(ROOT, folder) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, folder))

transformers = pytest.importorskip("transformers")
quality_pareto = pytest.importorskip("quality_pareto")


def test_runner_gives_the_compiled_modules_logits_and_density():
    model = model_zoo.llama(vocab=96)[0]
    windows = [torch.randint(0, 96, (1, 128)) for _ in range(2)]
    captured, sites = sparsify.api.capture_attention(model, {"input_ids": windows[0]})
    runner = quality_pareto.StrategyRunner(captured, sites, block_size=16)
    strategy = sparsify.Strategy.uniform(sites, patterns.a_shape(16, 32), 16)
    strategy = strategy.with_heads(sites[0].name, [patterns.pooled_coverage(0.9, sink_blocks=1)] * sites[0].num_heads)
    got: dict[int, torch.Tensor] = {}
    density = runner.run(strategy, windows, lambda index, logits: got.__setitem__(index, logits))
    dense: dict[int, torch.Tensor] = {}
    assert runner.run(None, windows, lambda index, logits: dense.__setitem__(index, logits)) is None
    compiled = sparsify.compile(model, strategy=strategy, example_inputs={"input_ids": windows[0]})
    with quality_pareto.RealisedDensity(compiled) as realised, torch.no_grad():
        for index, window in enumerate(windows):
            torch.testing.assert_close(got[index], compiled(input_ids=window).logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dense[index], model(input_ids=window).logits, rtol=1e-5, atol=1e-5)
    assert density == pytest.approx(realised.result()["mean_density"], rel=1e-9)
    assert not torch.allclose(got[0], dense[0])  # the sparse strategy did change the logits


def test_streaming_window_meets_the_density():
    model = model_zoo.llama(vocab=96)[0]
    window = torch.randint(0, 96, (1, 256))
    sites = sparsify.find_attention(model, {"input_ids": window})
    def density(size: int) -> float:
        return sparsify.Strategy.uniform(sites, patterns.a_shape(16, size), 16).summary()["mean_density"]

    for target in (0.5, 0.8):
        size = quality_pareto.window_for_density(sites, 16, target, 16)
        assert size > 1 and density(size) >= target > density(size - 1)
