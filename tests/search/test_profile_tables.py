"""The static block tables the search reads off a head's profile (`profile_top_k`)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsify.errors import PatternError
from sparsify.patterns import causal_block_mask
from sparsify.profile import BlockMassProfile
from sparsify.search.candidates import PROFILE_TABLE_KINDS, candidate_patterns, profile_top_k
from sparsify.site import AttentionSite


def _site(causal: bool = True, length: int = 1024) -> AttentionSite:
    return AttentionSite("attn", 0, num_heads=1, num_kv_heads=1, head_dim=8, q_len=length, k_len=length, causal=causal)


def _kept(pattern, blocks: int, causal: bool) -> torch.Tensor:
    return pattern.block_mask(blocks, blocks, block_size=64, causal=causal, q_len=blocks * 64, k_len=blocks * 64)


@pytest.mark.parametrize("kind", PROFILE_TABLE_KINDS)
@pytest.mark.parametrize("causal", [True, False])
def test_tables_keep_diagonal_and_sink_and_meet_the_density(kind, causal):
    generator = torch.Generator().manual_seed(3)
    blocks = 16
    visible = causal_block_mask(blocks, blocks) if causal else torch.ones(blocks, blocks, dtype=torch.bool)
    mass = torch.rand(blocks, blocks, generator=generator).pow(6) * visible
    for density in (0.2, 0.5, 0.8):
        kept = _kept(profile_top_k(mass, density, _site(causal), kind), blocks, causal)
        assert bool(kept.diagonal().all()) and bool(kept[:, 0].all())
        assert not bool((kept & ~visible).any())
        share = float(kept.sum()) / float(visible.sum())
        forced = float((torch.eye(blocks, dtype=torch.bool) | (torch.arange(blocks) == 0)).sum()) / float(visible.sum())
        # Within a block per row of the density (rounding up), never below it unless the forced blocks exceed it.
        assert share <= max(density, forced) + blocks / float(visible.sum()) + 1e-9
        assert share >= min(density, 1.0) - blocks / float(visible.sum()) - 1e-9


def test_coverage_table_keeps_more_mass_than_row_share_on_uneven_rows():
    # Half the rows attend to one far block, half spread evenly: at the same budget, covering a common share of
    # each row's mass keeps more of the head's mass than a fixed share of every row.
    blocks = 16
    mass = torch.zeros(blocks, blocks)
    for row in range(blocks):
        if row % 2:
            mass[row, : row + 1] = 1.0 / (row + 1)
        else:
            mass[row, row // 2] = 1.0
    mass *= causal_block_mask(blocks, blocks)
    recalls = {}
    for kind in PROFILE_TABLE_KINDS:
        kept = _kept(profile_top_k(mass, 0.4, _site(), kind), blocks, True)
        recalls[kind] = (float((mass * kept).sum()) / float(mass.sum()), int(kept.sum()))
    assert recalls["coverage"][1] <= recalls["row_share"][1] + blocks
    assert recalls["coverage"][0] > recalls["row_share"][0]


def test_profile_tables_are_candidates_at_many_densities():
    site = _site(length=1024)
    profile = BlockMassProfile.empty(1, 1024, 1024, 64)
    q = torch.randn(1, 1, 1024, 8, generator=torch.Generator().manual_seed(0))
    profile.add(q, q, q, None, True, None)
    tables = [p for p in candidate_patterns(site, 64, profile)[0] if p.pattern_name == "block_top_k"]
    densities = sorted({round(float(_kept(t, 16, True).sum()) / 136, 2) for t in tables})
    assert len(densities) >= 6 and densities[-1] >= 0.75


@pytest.mark.parametrize("bad", [0.0, 1.5, math.nan])
def test_bad_density_or_kind_is_refused(bad):
    with pytest.raises(PatternError, match="density"):
        profile_top_k(torch.ones(4, 4), bad, _site(), "coverage")
    with pytest.raises(PatternError, match="known: row_share, coverage"):
        profile_top_k(torch.ones(4, 4), 0.5, _site(), "global")
