"""benchmarks/estimator_missing_mass.py's selection and reading of its curves (random inputs: no model, no download)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for folder in ("benchmarks", "examples"):
    if os.path.join(ROOT, folder) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, folder))

pytest.importorskip("transformers")
missing_mass = pytest.importorskip("estimator_missing_mass")


def _exact_block_mass(q, k, block):
    """One head's true block masses: mean over each query block's rows of their causal attention per key block."""
    length = q.shape[2]
    scores = (q[0, 0] @ k[0, 0].T) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    probabilities = scores.softmax(-1)
    blocks = length // block
    return probabilities.view(blocks, block, blocks, block).sum(3).mean(1)


def test_each_row_keeps_the_fewest_best_blocks_reaching_the_coverage_plus_the_forced_ones():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 256, 16, generator=gen) * 2, torch.randn(1, 1, 256, 16, generator=gen) * 2
    exact = _exact_block_mass(q, k, 16)
    blocks = 16
    lower = torch.ones(blocks, blocks, dtype=torch.bool).tril()
    nothing_forced = torch.zeros(blocks, blocks, dtype=torch.bool)
    for coverage in (0.5, 0.9, 0.99):
        keep = missing_mass.kept_blocks(exact, coverage, nothing_forced, lower)
        for row in range(blocks):
            kept = exact[row][keep[row]]
            assert float(kept.sum()) >= coverage - 1e-6                       # reaches the coverage ...
            assert float(kept.sum() - kept.min()) < coverage                  # ... and no block fewer would
            left = exact[row][~keep[row] & lower[row]]
            assert left.numel() == 0 or float(kept.min()) >= float(left.max())   # the best ones
    diagonal = torch.eye(blocks, dtype=torch.bool)
    for method in ("pooled_mean", "query_mean", "antidiagonal_stride8"):
        estimate = missing_mass.estimated_mass(method, q, k, exact, block_size=16, scale=None)
        assert estimate.shape == (blocks, blocks) and torch.allclose(estimate.sum(-1), torch.ones(blocks), atol=1e-5)
        keep = missing_mass.kept_blocks(estimate, 0.5, diagonal, lower)
        assert bool((keep <= lower).all()) and bool(keep.diagonal().all())


def test_at_density_interpolates_and_refuses_outside_the_measured_range():
    points = [(0.2, 0.1), (0.4, 0.05)]
    assert missing_mass.at_density(points, 0.3) == pytest.approx(0.075)
    assert missing_mass.at_density(points, 0.1) is None and missing_mass.at_density(points, 0.5) is None
