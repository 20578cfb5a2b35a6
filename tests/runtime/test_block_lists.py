"""Block lists (the form input-adaptive masks travel in): `RuntimeBlockMask.from_block_lists` and the estimators,
each against the boolean-mask path they replace (kept here as the reference) on fresh random inputs."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify import patterns
from sparsify.patterns.composites import Intersection, Union
from sparsify.block_mask import RuntimeBlockMask, blocks_for, pattern_block_masks
from sparsify.estimators import (antidiagonal_block_mass, block_lists_to_masks, coverage_block_lists,
                                       key_validity, pooled_block_mass, self_blocks, vertical_slash_line_mass)
from sparsify.block_mask import block_token_bounds
from sparsify.runtime.mask_source import AdaptiveMaskSource


def _assert_same_mask(mask: RuntimeBlockMask, reference: RuntimeBlockMask) -> None:
    assert torch.equal(mask.full_block_masks(), reference.full_block_masks())
    assert torch.equal(mask.partial_block_masks(), reference.partial_block_masks())
    assert torch.equal(mask.kept_counts(), reference.kept_counts())
    for counts, indices in ((mask.full_kv_num_blocks, mask.full_kv_indices), (mask.kv_num_blocks, mask.kv_indices)):
        slot = torch.arange(indices.shape[-1])
        real = slot < counts.unsqueeze(-1)
        assert bool((indices.diff(dim=-1)[real[..., 1:]] > 0).all())             # ascending, no repeats
        last = indices.gather(-1, (counts - 1).clamp(min=0).long().unsqueeze(-1)).expand_as(indices)
        assert torch.equal(indices[~real], last[~real])                          # padding repeats the last one


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), block=st.sampled_from([4, 8, 16]), q_len=st.integers(1, 70),
       k_len=st.integers(1, 70), causal=st.booleans(), q_offset=st.integers(0, 30), slots=st.integers(0, 9))
def test_block_lists_compress_like_the_masks_they_name(seed, block, q_len, k_len, causal, q_offset, slots):
    gen = torch.Generator().manual_seed(seed)
    k_blocks = blocks_for(k_len, block)
    shape = (2, 3, blocks_for(q_len, block), slots)
    lists = torch.randint(-2, k_blocks + 2, shape, generator=gen)               # out of range: no block; repeats
    mask = RuntimeBlockMask.from_block_lists(lists, block_size=block, q_len=q_len, k_len=k_len, causal=causal,
                                             q_offset=q_offset, per_input=True)
    reference = RuntimeBlockMask.from_block_masks(block_lists_to_masks(lists, k_blocks), block_size=block,
                                                  q_len=q_len, k_len=k_len, causal=causal, q_offset=q_offset,
                                                  width=k_blocks, per_input=True)
    _assert_same_mask(mask, reference)
    assert mask.full_width <= max(1, slots) and mask.partial_width <= (3 if causal else 1)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("seed", range(8))
def test_the_compress_kernel_equals_the_torch_path(seed):
    # On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU
    # machine it runs compiled (it is what from_block_lists uses for CUDA lists).
    from sparsify.block_list_kernels import compress_block_lists

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(seed)
    block = (4, 8, 16)[seed % 3]
    q_len, k_len, q_offset = (int(v) for v in torch.randint(1, 70, (3,), generator=gen))
    causal = seed % 2 == 0
    k_blocks = blocks_for(k_len, block)
    slots = 1 + seed if seed < 4 else (20, 45, 100, 128)[seed - 4]      # long rows: many repeats, padding slots
    lists = torch.randint(-2, k_blocks + 2, (2, 3, blocks_for(q_len, block), slots), generator=gen)
    reference = RuntimeBlockMask.from_block_lists(lists, block_size=block, q_len=q_len, k_len=k_len, causal=causal,
                                                  q_offset=q_offset)
    fused = compress_block_lists(lists.to(device), block_size=block, q_len=q_len, k_len=k_len, causal=causal,
                                 q_offset=q_offset, full_width=reference.full_width,
                                 partial_width=reference.partial_width)
    expected = (reference.full_kv_num_blocks, reference.full_kv_indices, reference.kv_num_blocks, reference.kv_indices)
    for mine, theirs in zip(fused, expected):
        assert torch.equal(mine.cpu(), theirs)


def test_block_lists_refuse_what_is_not_lists():
    with pytest.raises(ValueError, match="integer"):
        RuntimeBlockMask.from_block_lists(torch.zeros(1, 1, 2, 2), block_size=16, q_len=32, k_len=32, causal=False)
    with pytest.raises(ValueError, match="query blocks"):
        RuntimeBlockMask.from_block_lists(torch.zeros(1, 1, 3, 2, dtype=torch.long), block_size=16, q_len=32,
                                          k_len=32, causal=False)


# --- the boolean-mask path the lists replace (the previous implementation, kept as the reference) -----------------

def _top_fraction(scores, fraction, heads):
    count = torch.ceil(fraction.to(torch.float32) * scores.shape[-1]).clamp(min=1).long()
    order = scores.argsort(dim=-1, descending=True, stable=True)
    keep_sorted = (torch.arange(scores.shape[-1]) < count.view(1, heads, 1)).expand_as(order)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _vertical_slash_reference(q, k, parameters, block_size, kv_head_index, scale, causal, q_offset, key_valid):
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
    column_mass, diagonal_mass = vertical_slash_line_mass(
        q, k, block_size=block_size, kv_head_index=kv_head_index, probe_rows=int(parameters["probe_blocks"].max())
        * block_size, scale=scale, causal=causal, q_offset=q_offset, key_valid=key_valid)
    vertical_keep = _top_fraction(column_mass, parameters["vertical"], heads)
    slash_keep = _top_fraction(diagonal_mass, parameters["slash"], heads)
    query_first = block_token_bounds(q_len, k_len, block_size, q_offset)[0]
    diagonal_of = query_first // block_size - torch.arange(k_blocks).unsqueeze(0)
    diagonal_index = (diagonal_of + (k_blocks - 1)).clamp(0, diagonal_mass.shape[-1] - 1)
    on_slash = slash_keep.gather(2, diagonal_index.reshape(1, 1, -1).expand(batch, heads, -1))
    return vertical_keep.unsqueeze(2) | on_slash.view(batch, heads, q_blocks, k_blocks)


def _coverage_reference(mass, coverage, min_blocks, max_blocks):
    heads = mass.shape[1]
    ordered, order = mass.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered
    rank = torch.arange(mass.shape[-1])
    view = (1, heads, 1, 1)
    keep = (before < coverage.view(view)) & (ordered > 0)
    keep = (keep | (rank < min_blocks.view(view))) & (rank < max_blocks.view(view))
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _pooled_reference(q, k, parameters, settings, block_size, kv_head_index, scale, causal, q_offset, key_valid):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    common = dict(block_size=block_size, kv_head_index=kv_head_index, scale=scale, causal=causal, q_offset=q_offset,
                  key_valid=key_valid, temperature=parameters["temperature"].view(1, -1, 1, 1))
    if settings["scoring"] == "antidiagonal":
        mass = antidiagonal_block_mass(q, k, stride=min(settings["stride"], block_size), **common)
    else:
        mass = pooled_block_mass(q, k, **common)
    max_blocks = torch.ceil(parameters["max_fraction"] * mass.shape[-1]).clamp(min=1).long()
    return _coverage_reference(mass, parameters["coverage"], parameters["min_blocks"].long(), max_blocks)


def _reference_mask(source: AdaptiveMaskSource, q, k, attn_mask=None, q_offset=0, scale=None) -> RuntimeBlockMask:
    """What `AdaptiveMaskSource.mask` built before block lists: bool [B, H, Qb, Kb] masks, OR-ed and compressed."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    k_blocks = blocks_for(k_len, source.block_size)
    key_valid = key_validity(attn_mask, batch, k_len)
    estimates = {}
    for key, (cls, settings, members) in source.groups.items():
        group = [head for head, _ in members]
        parameters = source._parameters[key]
        arguments = dict(block_size=source.block_size, kv_head_index=source.kv_head_index[group], scale=scale,
                         causal=source.causal, q_offset=q_offset, key_valid=key_valid)
        if cls.family == "estimated_vertical_slash":
            kept = _vertical_slash_reference(q[:, group], k, parameters, **arguments)
        else:
            kept = _pooled_reference(q[:, group], k, parameters, settings, **arguments)
        sinks = torch.arange(k_blocks).view(1, 1, 1, -1) < parameters["sink_blocks"].view(1, -1, 1, 1)
        kept = kept | sinks
        for position, (head, leaf) in enumerate(members):
            estimates[(head, id(leaf))] = kept[:, position]

    def evaluate(pattern, head):
        if isinstance(pattern, (Union, Intersection)):
            parts = [evaluate(part, head) for part in pattern.parts]
            combined = parts[0]
            for part in parts[1:]:
                combined = (combined | part) if isinstance(pattern, Union) else (combined & part)
            return combined
        if pattern.is_adaptive:
            return estimates[(head, id(pattern))]
        return pattern_block_masks([pattern], block_size=source.block_size, q_len=q_len, k_len=k_len,
                                   causal=source.causal, q_offset=q_offset)[0].unsqueeze(0)

    kept = torch.stack([evaluate(pattern, head).expand(batch, -1, -1) for head, pattern in enumerate(source.patterns)],
                       1)
    if source.self_attention:
        kept = kept | self_blocks(q_len, k_len, source.block_size, q_offset, "cpu")
    return RuntimeBlockMask.from_block_masks(kept, block_size=source.block_size, q_len=q_len, k_len=k_len,
                                             causal=source.causal, kv_head_index=source.kv_head_index,
                                             q_offset=q_offset, width=k_blocks, per_input=True)


HEAD_PATTERNS = {
    "vertical_slash": [patterns.estimated_vertical_slash(0.1, 0.05, sink_blocks=1),
                       patterns.estimated_vertical_slash(0.3, 0.1, probe_blocks=2),
                       patterns.estimated_vertical_slash(0.02, 0.2, sink_blocks=3),
                       patterns.estimated_vertical_slash(1.0, 0.01)],
    "pooled": [patterns.pooled_coverage(0.9, sink_blocks=1), patterns.pooled_coverage(0.5, min_blocks=3),
               patterns.pooled_coverage(0.99, max_fraction=0.2, temperature=0.5),
               patterns.pooled_coverage(0.7, max_fraction=0.5, min_blocks=2, sink_blocks=2)],
    "antidiagonal": [patterns.pooled_coverage(0.8, scoring="antidiagonal", stride=4)] * 2
                    + [patterns.pooled_coverage(0.95, scoring="antidiagonal", stride=4, max_fraction=0.3)] * 2,
    "mixed": [patterns.pooled_coverage(0.9), patterns.estimated_vertical_slash(0.1, 0.1),
              patterns.sliding_window(32) | patterns.estimated_vertical_slash(0.05, 0.05),
              patterns.attention_sinks(16) | patterns.pooled_coverage(0.6, max_fraction=0.3)],
    "intersection": [patterns.sliding_window(64) & patterns.pooled_coverage(0.9),
                     patterns.pooled_coverage(0.8) & patterns.estimated_vertical_slash(0.3, 0.3),
                     patterns.estimated_vertical_slash(0.1, 0.1), patterns.pooled_coverage(0.9)],
}


@pytest.mark.parametrize("family", sorted(HEAD_PATTERNS))
@pytest.mark.parametrize("q_len, k_len, q_offset, causal, padded", [
    (160, 160, 0, True, False),        # whole blocks
    (150, 150, 0, True, True),         # a cut last block, padding
    (40, 170, 130, True, False),       # a chunk at the end of a longer cache
    (96, 120, 0, False, False),        # not causal
    (1, 97, 96, True, False),          # a decode step
])
def test_estimated_masks_equal_the_boolean_path(family, q_len, k_len, q_offset, causal, padded):
    gen = torch.Generator().manual_seed(q_len * 1000 + k_len + len(family))
    heads, kv_heads, dim, block = 4, 2, 8, 16
    q = torch.randn(2, heads, q_len, dim, generator=gen)
    k = torch.randn(2, kv_heads, k_len, dim, generator=gen)
    k[:, :, 37] *= 4                                                   # a key many queries look at
    attn_mask = None
    if padded:
        attn_mask = torch.ones(2, 1, 1, k_len, dtype=torch.bool)
        attn_mask[1, ..., :20] = False
    pattern_list = HEAD_PATTERNS[family]
    source = AdaptiveMaskSource(pattern_list, block_size=block, causal=causal,
                                kv_head_index=torch.tensor([0, 0, 1, 1]), self_attention=q_offset + q_len <= k_len)
    mask = source.mask(q, k, attn_mask=attn_mask, q_offset=q_offset, scale=0.3)
    reference = _reference_mask(source, q, k, attn_mask=attn_mask, q_offset=q_offset, scale=0.3)
    _assert_same_mask(mask, reference)
    assert mask.per_input and mask.batch == 2


def test_coverage_lists_keep_ties_in_block_order():
    mass = torch.tensor([[[[0.25, 0.0, 0.25, 0.25, 0.25, 0.0]]]])
    one = torch.ones(1, dtype=torch.long)
    lists = coverage_block_lists(mass, torch.tensor([0.6]), one, 6 * one)
    assert lists.tolist() == [[[[0, 2, 3, -1, -1, -1]]]]                      # the first equal blocks win
    lists = coverage_block_lists(mass, torch.tensor([0.1]), 5 * one, 6 * one)
    assert lists.tolist() == [[[[0, 2, 3, 4, 1, -1]]]]                        # min_blocks: then zero-mass blocks
    assert torch.equal(block_lists_to_masks(lists, 6), _coverage_reference(mass, torch.tensor([0.1]), 5 * one, 6 * one))
