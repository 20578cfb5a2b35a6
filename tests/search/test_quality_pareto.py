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


class _Site:
    name = "attention"


def _exact_reference(q, k, v, coverage, block):
    """float64 loops: per head and query block, the fewest key blocks (by decreasing mean row mass) reaching
    ``coverage`` plus the diagonal; attention over those blocks; ``(output, kept blocks)``."""
    heads, length = q.shape[1], q.shape[2]
    k, v = k.repeat_interleave(heads // k.shape[1], 1).double(), v.repeat_interleave(heads // v.shape[1], 1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    probabilities = scores.softmax(-1)
    blocks = length // block
    allowed = torch.zeros(heads, length, length, dtype=torch.bool)
    kept = 0
    for head in range(heads):
        for row in range(blocks):
            rows = probabilities[0, head, row * block:(row + 1) * block]
            masses = [float(rows[:, column * block:(column + 1) * block].sum()) / block for column in range(blocks)]
            chosen, total = {row}, 0.0
            for column in sorted(range(row + 1), key=lambda c: -masses[c]):
                if total >= coverage:
                    break
                chosen.add(column)
                total += masses[column]
            kept += len(chosen)
            for column in chosen:
                allowed[head, row * block:(row + 1) * block, column * block:(column + 1) * block] = True
    allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    weights = scores[0].masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ v[0]).unsqueeze(0), kept


def test_exact_coverage_attends_over_the_fewest_blocks_whose_exact_mass_reaches_the_coverage():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, 128, 16, generator=gen) * 2 for heads in (4, 2, 2))
    oracle = quality_pareto.ExactCoverage(block_size=16, coverage=0.7)
    out = oracle(_Site(), q, k, v, None, True, None)
    expected, kept = _exact_reference(q, k, v, 0.7, 16)
    assert oracle.kept == kept and oracle.total == 4 * 8 * 9 // 2
    assert 0.3 < oracle.density() < 1.0                                   # it did drop blocks
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="attends both ways"):
        oracle(_Site(), q, k, v, None, False, None)                       # a bidirectional site has no lower triangle


def test_exact_coverage_fits_its_coverage_to_a_density_and_keeps_everything_at_full_coverage():
    model = model_zoo.llama(vocab=96)[0]
    windows = [torch.randint(0, 96, (1, 128))]
    captured, sites = sparsify.api.capture_attention(model, {"input_ids": windows[0]})
    runner = quality_pareto.StrategyRunner(captured, sites, block_size=16)
    dense, full, fitted = {}, {}, {}
    runner.run(None, windows, lambda index, logits: dense.__setitem__(index, logits))
    oracle = quality_pareto.ExactCoverage(block_size=16)
    runner.run(None, windows, lambda index, logits: full.__setitem__(index, logits), attention=oracle.record)
    torch.testing.assert_close(full[0], dense[0])                          # recording leaves attention dense
    oracle.coverage = 1.0
    runner.run(None, windows, lambda index, logits: full.__setitem__(index, logits), attention=oracle)
    assert oracle.density() == 1.0
    torch.testing.assert_close(full[0], dense[0], rtol=1e-4, atol=1e-4)
    oracle.coverage = oracle.coverage_for(0.6)
    oracle.reset()
    runner.run(None, windows, lambda index, logits: fitted.__setitem__(index, logits), attention=oracle)
    assert abs(oracle.density() - 0.6) < 0.08                              # later layers see the sparse inputs
    assert not torch.allclose(fitted[0], dense[0])
    with pytest.raises(ValueError, match="not both"):
        runner.run(sparsify.Strategy.dense(sites, block_size=16), windows, lambda index, logits: None, attention=oracle)
