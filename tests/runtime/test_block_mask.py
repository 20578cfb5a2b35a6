"""`RuntimeBlockMask`: block classification against a token-level brute force, views, display, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify import patterns
from sparsify.block_mask import RuntimeBlockMask, blocks_for, causal_element_mask, pattern_block_masks
from sparsify.block_mask import block_geometry, block_token_bounds, causal_boundary_blocks


def brute_force(kept: torch.Tensor, block: int, q_len: int, k_len: int, causal: bool, q_offset: int):
    """(full, partial) bool [..., q_blocks, k_blocks] from the token pairs of every block."""
    visible = causal_element_mask(q_len, k_len, q_offset) if causal else torch.ones(q_len, k_len, dtype=torch.bool)
    q_blocks, k_blocks = blocks_for(q_len, block), blocks_for(k_len, block)
    full = torch.zeros(q_blocks, k_blocks, dtype=torch.bool)
    some = torch.zeros(q_blocks, k_blocks, dtype=torch.bool)
    for i in range(q_blocks):
        for j in range(k_blocks):
            tile = visible[i * block:(i + 1) * block, j * block:(j + 1) * block]
            complete = (j + 1) * block <= k_len
            some[i, j] = bool(tile.any())
            full[i, j] = complete and bool(tile.all())
    kept = kept & some
    return kept & full, kept & ~full


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), block=st.sampled_from([4, 8, 16]), q_len=st.integers(1, 60),
       k_len=st.integers(1, 60), causal=st.booleans(), q_offset=st.integers(0, 30), fixed_width=st.booleans(),
       batch=st.sampled_from([None, 2]))
def test_classification_matches_the_token_pairs(seed, block, q_len, k_len, causal, q_offset, fixed_width, batch):
    gen = torch.Generator().manual_seed(seed)
    heads = 3
    kept = torch.rand(batch or 1, heads, blocks_for(q_len, block), blocks_for(k_len, block), generator=gen) < 0.5
    mask = RuntimeBlockMask.from_block_masks(kept if batch else kept[0], block_size=block, q_len=q_len,
                                             k_len=k_len, causal=causal, q_offset=q_offset,
                                             width=blocks_for(k_len, block) if fixed_width else None)
    full, partial = brute_force(kept, block, q_len, k_len, causal, q_offset)
    assert torch.equal(mask.full_block_masks(), full)
    assert torch.equal(mask.partial_block_masks(), partial)
    assert torch.equal(mask.kept_counts(), (full | partial).sum(-1).int())
    # Indices ascend within each row, and padding slots repeat the last real one.
    for counts, indices in ((mask.full_kv_num_blocks, mask.full_kv_indices), (mask.kv_num_blocks, mask.kv_indices)):
        slot = torch.arange(indices.shape[-1])
        real = slot < counts.unsqueeze(-1)
        assert bool((indices.diff(dim=-1)[real[..., 1:]] > 0).all())
        assert bool((indices[~real] == indices.gather(-1, (counts - 1).clamp(min=0).long().unsqueeze(-1))
                     .expand_as(indices)[~real]).all())
    expected = (full | partial).repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :q_len, :k_len]
    if causal:
        expected = expected & causal_element_mask(q_len, k_len, q_offset)
    assert torch.equal(mask.element_mask(), expected)


def test_views_density_and_heads():
    kept = torch.tensor([[[True, False, True], [True, True, False]], [[True, True, True], [False, True, True]]])
    mask = RuntimeBlockMask.from_block_masks(kept, block_size=16, q_len=32, k_len=40, causal=False,
                                             kv_head_index=torch.tensor([0, 0]))
    assert mask.batch == 1 and mask.num_heads == 2 and mask.q_blocks == 2 and mask.k_blocks == 3
    assert torch.equal(mask.to_block_masks()[0], kept)
    assert mask.density() == pytest.approx(9 / 12)
    assert mask.kept_blocks_per_head() == [4.0, 5.0]
    counts, indices = mask.merged()
    assert counts[0].tolist() == [[2, 2], [3, 2]]
    assert indices[0, 1, 1, :2].tolist() == [1, 2]
    second = mask.select_heads([1])
    assert second.num_heads == 1 and torch.equal(second.to_block_masks()[0, 0], kept[1])
    assert mask.to("cpu") is mask


def test_to_string_draws_full_and_partial_blocks():
    mask = RuntimeBlockMask.dense(3, block_size=64, q_len=160, k_len=160, causal=True)
    text = mask.to_string(max_heads=1)
    assert text.splitlines()[0].startswith("RuntimeBlockMask(heads=3, q_len=160, k_len=160, block_size=64, causal")
    assert text.splitlines()[1:5] == ["head 0", "  ░", "  █░", "  ██░"]
    assert text.endswith("… 2 more heads")
    assert repr(mask) == text.splitlines()[0]


def test_dense_mask_at_a_query_offset_is_bottom_right_causal():
    mask = RuntimeBlockMask.dense(1, block_size=4, q_len=4, k_len=12, causal=True, q_offset=8)
    assert torch.equal(mask.element_mask()[0, 0], torch.ones(4, 12, dtype=torch.bool).tril(diagonal=8))
    assert "q_offset=8" in repr(mask)


def test_malformed_masks_are_refused():
    mask = RuntimeBlockMask.dense(2, block_size=16, q_len=32, k_len=32, causal=False)
    with pytest.raises(ValueError, match="kv_indices must be"):
        dataclasses.replace(mask, kv_indices=mask.kv_indices[:, :1])
    with pytest.raises(ValueError, match="kv_head_index must be"):
        dataclasses.replace(mask, kv_head_index=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="q_offset"):
        dataclasses.replace(mask, q_offset=-1)
    with pytest.raises(ValueError, match="do not cover"):
        RuntimeBlockMask.from_block_masks(torch.ones(1, 3, 3, dtype=torch.bool), block_size=16, q_len=32, k_len=32,
                                          causal=False)


@pytest.mark.parametrize("pattern", [patterns.sliding_window(24), patterns.a_shape(16, 32),
                                     patterns.multi_diagonal(48, 8), patterns.dense()])
@pytest.mark.parametrize("q_len, k_len", [(16, 96), (1, 97), (37, 100)])
def test_pattern_rows_at_an_offset_are_the_full_length_rows(pattern, q_len, k_len):
    # A query chunk at the end of the keys sees the rows of the full-length pattern at its position.
    block = 16
    offset = k_len - q_len
    chunk = pattern_block_masks([pattern], block_size=block, q_len=q_len, k_len=k_len, causal=True, q_offset=offset)
    full = pattern.block_mask(blocks_for(k_len, block), blocks_for(k_len, block), block_size=block, causal=True,
                              q_len=k_len, k_len=k_len)
    for row in range(chunk.shape[1]):
        first = (offset + row * block) // block
        last = (offset + min((row + 1) * block, q_len) - 1) // block
        assert torch.equal(chunk[0, row], full[first:last + 1].any(0))


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 70), k_len=st.integers(1, 70), block=st.sampled_from([4, 8, 16]),
       q_offset=st.integers(0, 40), causal=st.booleans())
def test_token_bounds_and_causal_classification_match_the_token_pairs(q_len, k_len, block, q_offset, causal):
    query_first, query_last, key_first, key_last = block_token_bounds(q_len, k_len, block, q_offset)
    q_blocks, k_blocks = blocks_for(q_len, block), blocks_for(k_len, block)
    assert query_first.flatten().tolist() == [q_offset + i * block for i in range(q_blocks)]
    assert query_last.flatten().tolist() == [q_offset + min((i + 1) * block, q_len) - 1 for i in range(q_blocks)]
    assert key_first.flatten().tolist() == [j * block for j in range(k_blocks)]
    assert key_last.flatten().tolist() == [min((j + 1) * block, k_len) - 1 for j in range(k_blocks)]
    visible, full = block_geometry(q_len, k_len, block, causal, q_offset)
    everything = torch.ones(1, q_blocks, k_blocks, dtype=torch.bool)
    expected_full, expected_partial = brute_force(everything, block, q_len, k_len, causal, q_offset)
    assert torch.equal(full, expected_full[0])
    assert torch.equal(visible, (expected_full | expected_partial)[0])
    boundary = causal_boundary_blocks(q_len, k_len, block, q_offset)
    # Crossing the causal boundary: some pair visible, some hidden (keys past k_len aside).
    tokens = causal_element_mask(q_len, k_len, q_offset)
    for i in range(q_blocks):
        for j in range(k_blocks):
            tile = tokens[i * block:(i + 1) * block, j * block:(j + 1) * block]
            assert bool(boundary[i, j]) == (bool(tile.any()) and not bool(tile.all())), (i, j)


def test_density_is_kept_over_causal_visible_work_and_block_fraction_over_all_blocks():
    kept = torch.tensor([[[True, False, False], [True, True, False], [True, False, True]]])
    mask = RuntimeBlockMask.from_block_masks(kept, block_size=16, q_len=48, k_len=48, causal=True)
    # 5 kept blocks; dense causal computes 6 of the 9.
    assert mask.density() == pytest.approx(5 / 6)
    assert mask.block_fraction() == pytest.approx(5 / 9)
    dense = RuntimeBlockMask.dense(2, block_size=16, q_len=40, k_len=72, causal=True, q_offset=32)
    visible, _ = block_geometry(40, 72, 16, True, 32)
    assert dense.density() == 1.0
    assert dense.block_fraction() == pytest.approx(int(visible.sum()) / visible.numel())
    open_mask = RuntimeBlockMask.from_block_masks(kept, block_size=16, q_len=48, k_len=48, causal=False)
    assert open_mask.density() == open_mask.block_fraction() == pytest.approx(5 / 9)
    # The patterns' density is the same quantity.
    window = patterns.sliding_window(20)
    built = RuntimeBlockMask.from_block_masks(window.block_mask(5, 5, block_size=16, causal=True, q_len=70, k_len=70)[None],
                                              block_size=16, q_len=70, k_len=70, causal=True)
    assert built.density() == pytest.approx(window.density(5, 5, block_size=16, causal=True, q_len=70, k_len=70))


@pytest.mark.parametrize("q_offset", [0, 5, 16])
def test_boundary_blocks_are_the_partial_blocks_that_cross_the_causal_boundary(q_offset):
    torch.manual_seed(q_offset)
    kept = torch.rand(2, 4, 5) < 0.7
    mask = RuntimeBlockMask.from_block_masks(kept, block_size=8, q_len=30, k_len=38, causal=True, q_offset=q_offset)
    boundary = mask.boundary_block_masks()[0]
    partial = mask.partial_block_masks()[0]
    expected = kept & causal_boundary_blocks(30, 38, 8, q_offset)
    assert torch.equal(boundary, expected)
    # The other partial blocks hold keys past k_len: the last key block only.
    assert not bool((partial & ~boundary)[..., :-1].any())
    uncausal = RuntimeBlockMask.from_block_masks(kept, block_size=8, q_len=30, k_len=38, causal=False)
    assert not bool(uncausal.boundary_block_masks().any())
