"""Input-adaptive masks: the estimators against explicit references, their guarantees, and the site running them."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from sparsify import patterns
from sparsify.errors import PatternError
from sparsify.patterns import pattern_from_dict
from sparsify.block_mask import blocks_for
from sparsify import estimators
from sparsify.estimators import (antidiagonal_block_mass, coverage_block_mask, key_validity,
                                       pooled_block_mass, query_mean_block_mass, self_blocks,
                                       vertical_slash_block_mask)
from sparsify.runtime.mask_source import AdaptiveMaskSource
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite

from backend_helpers import mask_reference, rel_err


def _qk(seed, batch=2, heads=3, kv_heads=1, q_len=96, k_len=96, dim=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, dim, generator=gen),
            torch.randn(batch, kv_heads, k_len, dim, generator=gen))


def test_pooled_mass_equals_an_explicit_loop():
    q, k = _qk(0, q_len=70, k_len=50)
    block, scale = 16, 0.3
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 40:] = False
    mass = pooled_block_mass(q, k, block_size=block, kv_head_index=torch.zeros(3, dtype=torch.long), scale=scale,
                             key_valid=valid)
    for b in range(2):
        for h in range(3):
            for i in range(blocks_for(70, block)):
                query = q[b, h, i * block:(i + 1) * block].mean(0)
                logits = []
                for j in range(blocks_for(50, block)):
                    keys = k[b, 0, j * block:(j + 1) * block][valid[b, j * block:(j + 1) * block]]
                    logits.append(query @ keys.mean(0) * scale + math.log(len(keys)) if len(keys) else -math.inf)
                expected = torch.softmax(torch.tensor(logits), 0)
                assert torch.allclose(mass[b, h, i], expected, atol=1e-5)


def test_antidiagonal_mass_equals_strided_antidiagonal_sums():
    q, k = _qk(1, batch=1, heads=1, q_len=32, k_len=32)
    stride, block = 4, 8
    mass = antidiagonal_block_mass(q, k, block_size=block, kv_head_index=torch.tensor([0]), stride=stride, scale=1.0)
    scores = q[0, 0] @ k[0, 0].T
    tiles = torch.zeros(8, 8)
    for i in range(8):
        for j in range(8):
            tiles[i, j] = sum(scores[i * stride + t, j * stride + stride - 1 - t] for t in range(stride)) / stride
    expected = torch.softmax(tiles, -1).view(4, 2, 4, 2).sum((1, 3))
    assert torch.allclose(mass[0, 0], expected / expected.sum(-1, keepdim=True), atol=1e-5)


def _query_mean_reference(q, k, kv_head_index, block, scale, temperature, causal, q_offset, valid):
    """Per batch, head and query block: the block's mean query against every key, softmax, summed per key block."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = blocks_for(q_len, block), blocks_for(k_len, block)
    expected = torch.zeros(batch, heads, q_blocks, k_blocks, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_blocks):
                query = q[b, h, i * block:(i + 1) * block].double().mean(0)
                last = q_offset + min((i + 1) * block, q_len) - 1
                logits = k[b, kv_head_index[h]].double() @ query * scale * temperature[h]
                hidden = ~valid[b] | (torch.arange(k_len) > last if causal else torch.zeros(k_len, dtype=torch.bool))
                probabilities = torch.softmax(logits.masked_fill(hidden, -math.inf), 0)
                for j in range(k_blocks):
                    expected[b, h, i, j] = probabilities[j * block:(j + 1) * block].sum()
    return expected


@pytest.mark.parametrize("causal, q_offset", [(False, 0), (True, 0), (True, 24)])
@pytest.mark.parametrize("tile", [None, 7])
def test_query_mean_mass_equals_an_explicit_loop(causal, q_offset, tile, monkeypatch):
    if tile is not None:   # a tile of a few score rows: the tiled loop must give the same as one tile
        monkeypatch.setattr(estimators, "QUERY_MEAN_TILE_ELEMENTS", tile * 50)
    gen = torch.Generator().manual_seed(5)
    # Projections come transposed (non-contiguous), GQA with an uneven head order, a cut last block.
    q_len = 26 if q_offset else 70          # a chunk at an offset ends inside the keys (keys 50 + offset)
    q = torch.randn(2, q_len, 4, 8, generator=gen).transpose(1, 2)
    k = torch.randn(2, 50 + q_offset, 2, 8, generator=gen).transpose(1, 2)
    kv_head_index = torch.tensor([1, 0, 1, 0])
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0])
    valid = torch.ones(2, k.shape[2], dtype=torch.bool)
    valid[1, 30:40] = False
    scale = 0.3
    mass = query_mean_block_mass(q, k, block_size=16, kv_head_index=kv_head_index, scale=scale, causal=causal,
                                 q_offset=q_offset, key_valid=valid, temperature=temperature.view(1, -1, 1, 1))
    expected = _query_mean_reference(q, k, kv_head_index, 16, scale, temperature, causal, q_offset, valid)
    assert mass.dtype == torch.float32 and mass.shape == expected.shape
    assert torch.allclose(mass.double(), expected, atol=1e-5)
    assert torch.allclose(mass.sum(-1), torch.ones(()), atol=1e-5)


def test_query_mean_finds_a_strong_key_that_pooled_keys_average_away():
    torch.manual_seed(0)
    dim, block = 16, 16
    direction = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    q = direction.expand(1, 1, 64, dim).clone()
    k = torch.randn(1, 1, 64, dim) * 0.05
    k[0, 0, 20] = direction * 12           # one strong key in block 1; block 1's other keys point away from it
    k[0, 0, 16:20] -= direction * 3
    k[0, 0, 21:32] -= direction * 3
    common = dict(block_size=block, kv_head_index=torch.tensor([0]), scale=1.0, causal=True)
    query_mean = query_mean_block_mass(q, k, **common)[0, 0, 3]
    pooled = pooled_block_mass(q, k, **common)[0, 0, 3]
    assert int(query_mean.argmax()) == 1 and query_mean[1] > 0.9       # the strong key's block holds the mass
    assert int(pooled.argmax()) != 1                                    # its block mean points the other way


def test_antidiagonal_mass_takes_transposed_projections():
    q, k = _qk(4, batch=1, heads=2, q_len=32, k_len=32)
    transposed_q = q.transpose(1, 2).contiguous().transpose(1, 2)
    transposed_k = k.transpose(1, 2).contiguous().transpose(1, 2)
    common = dict(block_size=8, kv_head_index=torch.tensor([0, 0]), stride=4, causal=True)
    assert torch.allclose(antidiagonal_block_mass(transposed_q, transposed_k, **common),
                          antidiagonal_block_mass(q, k, **common))


def test_coverage_keeps_the_fewest_blocks_within_bounds():
    mass = torch.tensor([[[[0.5, 0.3, 0.15, 0.05]], [[0.25, 0.25, 0.25, 0.25]]]])
    keep = coverage_block_mask(mass, torch.tensor([0.75, 0.6]), torch.tensor([1, 1]), torch.tensor([4, 2]))
    assert keep[0, 0, 0].tolist() == [True, True, False, False]          # 0.5 + 0.3 >= 0.75
    assert keep[0, 1, 0].sum() == 2                                     # capped at max_blocks
    keep = coverage_block_mask(mass, torch.tensor([0.1, 0.1]), torch.tensor([3, 1]), torch.tensor([4, 4]))
    assert int(keep[0, 0, 0].sum()) == 3                                # raised to min_blocks


def test_vertical_slash_finds_planted_columns_and_diagonals():
    torch.manual_seed(0)
    q_len, dim, block = 256, 16, 32
    direction = torch.randn(dim)
    q = torch.randn(1, 1, q_len, dim) * 0.1 + direction
    k = torch.randn(1, 1, q_len, dim) * 0.1
    k[:, :, 70] = direction * 6                                        # every query looks at key 70
    mask = vertical_slash_block_mask(q, k, block_size=block, kv_head_index=torch.tensor([0]),
                                     vertical=torch.tensor([0.1]), slash=torch.tensor([0.05]), probe_rows=32,
                                     causal=True)
    assert bool(mask[0, 0, 3:, 70 // block].all())                      # the column, for every later row
    # A diagonal: queries attend to the key 64 tokens back.
    q2 = torch.randn(1, 1, q_len, dim)
    k2 = torch.zeros(1, 1, q_len, dim)
    k2[0, 0, :q_len - 64] = q2[0, 0, 64:] * 4
    mask = vertical_slash_block_mask(q2, k2, block_size=block, kv_head_index=torch.tensor([0]),
                                     vertical=torch.tensor([0.01]), slash=torch.tensor([0.05]), probe_rows=32,
                                     causal=True)
    assert bool(mask[0, 0, torch.arange(3, 8), torch.arange(1, 6)].all())    # block offset 2 (64 tokens)


def test_key_validity_and_self_blocks():
    additive = torch.zeros(2, 1, 5, 6)
    additive[1, ..., 4:] = torch.finfo(torch.float32).min
    assert key_validity(additive, 2, 6).tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert self_blocks(16, 48, 16, 32, "cpu").int().tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("pattern", [patterns.pooled_coverage(0.9), patterns.pooled_coverage(0.8, scoring="antidiagonal",
                                                                                              stride=4),
                                     patterns.pooled_coverage(0.8, scoring="query_mean", sink_blocks=1),
                                     patterns.estimated_vertical_slash(0.1, 0.1),
                                     patterns.sliding_window(32) | patterns.pooled_coverage(0.5, max_fraction=0.3)])
@pytest.mark.parametrize("causal", [False, True])
def test_estimated_masks_keep_the_own_block_and_never_an_empty_row(pattern, causal):
    q, k = _qk(2, kv_heads=3, q_len=100, k_len=100)
    source = AdaptiveMaskSource([pattern] * 3, block_size=16, causal=causal, kv_head_index=torch.arange(3),
                                self_attention=True)
    mask = source.mask(q, k)
    kept = mask.to_block_masks()
    # The estimate alone (cross attention: no own block to add) keeps a block in every row ...
    estimated = AdaptiveMaskSource([pattern] * 3, block_size=16, causal=causal, kv_head_index=torch.arange(3),
                                   self_attention=False).mask(q, k)
    assert bool((estimated.kept_counts() > 0).all())
    # ... and self attention adds each query block's own key block to it, and changes nothing else.
    assert mask.batch == 2 and mask.per_input and kept.shape == (2, 3, 7, 7)
    assert torch.equal(kept, estimated.to_block_masks() | torch.eye(7, dtype=torch.bool))


def test_each_input_gets_its_own_mask_and_batch_elements_do_not_mix():
    q, k = _qk(3, batch=2, kv_heads=1)
    source = AdaptiveMaskSource([patterns.pooled_coverage(0.7)] * 3, block_size=16, causal=True,
                                kv_head_index=torch.zeros(3, dtype=torch.long))
    together = source.mask(q, k).to_block_masks()
    alone = source.mask(q[1:], k[1:]).to_block_masks()
    assert torch.equal(together[1:], alone)
    assert not torch.equal(together[0], together[1])


def test_fully_padded_key_blocks_are_never_estimated_kept():
    q, k = _qk(4, batch=1, kv_heads=1, q_len=64, k_len=96)
    padding = torch.ones(1, 1, 1, 96, dtype=torch.bool)
    padding[..., 64:] = False
    source = AdaptiveMaskSource([patterns.pooled_coverage(0.99)] * 3, block_size=16, causal=False,
                                kv_head_index=torch.zeros(3, dtype=torch.long), self_attention=False)
    kept = source.mask(q, k, attn_mask=padding).to_block_masks()
    assert not bool(kept[..., 4:].any())


def test_patterns_round_trip_and_validate():
    for pattern in (patterns.pooled_coverage(0.95, min_blocks=2, sink_blocks=1, scoring="antidiagonal", stride=16),
                    patterns.estimated_vertical_slash(0.02, 0.1, probe_blocks=2),
                    patterns.attention_sinks(64) | patterns.estimated_vertical_slash()):
        assert pattern_from_dict(pattern.to_dict()) == pattern and pattern.is_adaptive
    assert not patterns.sliding_window(64).is_adaptive
    for bad, message in ((lambda: patterns.pooled_coverage(1.5), "coverage"),
                         (lambda: patterns.pooled_coverage(0.9, scoring="max"), "scoring"),
                         (lambda: patterns.pooled_coverage(0.9, stride=6), "power of two"),
                         (lambda: patterns.estimated_vertical_slash(0.0), "vertical"),
                         (lambda: patterns.estimated_vertical_slash(probe_blocks=10**6), "probe_blocks")):
        with pytest.raises(PatternError, match=message):
            bad()


@pytest.mark.parametrize("causal", [False, True])
def test_site_runs_adaptive_heads_beside_static_dense_and_skipped_ones(causal):
    site = AttentionSite("blocks.0.attn", 0, num_heads=4, num_kv_heads=2, head_dim=16, q_len=128, k_len=128,
                         causal=causal)
    layer = SparseAttention(site, [patterns.dense(), patterns.pooled_coverage(0.8), patterns.skip(),
                                   patterns.sliding_window(32) | patterns.estimated_vertical_slash(0.1, 0.1)],
                            block_size=16)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 128, 16, generator=gen)
    k, v = torch.randn(2, 2, 128, 16, generator=gen), torch.randn(2, 2, 128, 16, generator=gen)
    layer.adaptive_density_log = []
    with torch.no_grad():
        out = layer(q, k, v, None, causal, None)
    adaptive_q = q.index_select(1, layer.adaptive_heads)
    mask = layer.adaptive_source.mask(adaptive_q, k)
    assert rel_err(out.index_select(1, layer.adaptive_heads), mask_reference(adaptive_q, k, v, mask)) < 1e-6
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    density = layer.adaptive_density_log[0]
    assert density.shape == (2,) and bool(((density > 0) & (density <= 1)).all())


def test_a_site_whose_sparse_heads_are_all_adaptive_prices_its_backends_without_crashing():
    # Issue 19: on a GPU, backend="auto" prices its candidates with the site's static mask; a site whose sparse heads
    # are all input-adaptive has a static mask of zero heads, and building it crashed in amax() at every length.
    site = AttentionSite("model.layers.0.self_attn", 0, num_heads=4, num_kv_heads=2, head_dim=16, q_len=192,
                         k_len=192, causal=True)
    layer = SparseAttention(site, [patterns.estimated_vertical_slash(0.05, 0.05, sink_blocks=1)] * 4, block_size=32)
    static = layer.runtime_mask(site.q_len, site.k_len, "cpu")        # what _resolve_backend prices
    assert static.num_heads == 0 and static.kept_blocks_per_head() == []
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 192, 16, generator=gen)
    k, v = torch.randn(1, 2, 192, 16, generator=gen), torch.randn(1, 2, 192, 16, generator=gen)
    with torch.no_grad():
        out = layer(q, k, v, None, True, None)
    mask = layer.adaptive_source.mask(q, k)
    assert rel_err(out, mask_reference(q, k, v, mask)) < 1e-6


def _line_mass_by_loop(q, k, valid, kv, block, scale, probe_rows, causal, q_offset):
    """(column, diagonal) masses of the probe rows from a loop over every probe row and key, in float64."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    k_blocks, total = blocks_for(k_len, block), blocks_for(q_offset + q_len, block)
    columns = torch.zeros(batch, heads, k_blocks, dtype=torch.float64)
    tiles = torch.zeros(batch, heads, k_blocks + total + 1, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for r in range(q_len - probe_rows, q_len):
                position = q_offset + r
                seen = [j for j in range(k_len) if valid[b, j] and (not causal or j <= position)]
                if not seen:
                    continue
                scores = torch.stack([q[b, h, r].double() @ k[b, kv[h], j].double() * scale for j in seen])
                for j, p in zip(seen, torch.softmax(scores, 0)):
                    columns[b, h, j // block] += p
                    tiles[b, h, (position - j) // block + k_blocks] += p
    offsets = torch.arange(-(k_blocks - 1), total + 1)
    return columns, tiles[..., offsets - 1 + k_blocks] + tiles[..., offsets + k_blocks]


@pytest.mark.parametrize("q_len, k_len, q_offset, probe_rows, causal, kv", [
    (70, 70, 0, 16, True, [0, 0, 1, 1]),          # partial blocks, probe not block-aligned, GQA (a grouped matmul)
    (40, 100, 60, 32, True, [1, 0, 1, 0]),        # a chunk at an offset, irregular head-to-key map
    (64, 80, 0, 16, False, [0, 1, 0, 1]),         # not causal
    (5, 77, 72, 5, True, [0, 0, 1, 1]),           # a few rows at the end of a long cache
])
def test_line_masses_equal_a_loop_over_every_probe_row_and_key(q_len, k_len, q_offset, probe_rows, causal, kv):
    from sparsify.estimators import vertical_slash_line_mass

    gen = torch.Generator().manual_seed(q_len + k_len)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k = torch.randn(2, 2, k_len, 8, generator=gen)
    valid = torch.ones(2, k_len, dtype=torch.bool)
    valid[1, :3] = False
    block, scale = 16, 0.4
    columns, diagonals = vertical_slash_line_mass(q, k, block_size=block, kv_head_index=torch.tensor(kv),
                                                  probe_rows=probe_rows, scale=scale, causal=causal,
                                                  q_offset=q_offset, key_valid=valid, kernel="torch")
    expected_columns, expected_diagonals = _line_mass_by_loop(q, k, valid, kv, block, scale, probe_rows, causal,
                                                              q_offset)
    assert torch.allclose(columns.double(), expected_columns, atol=1e-5)
    assert torch.allclose(diagonals.double(), expected_diagonals, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("q_len, k_len, q_offset, probe_rows, causal, padded", [
    (40, 40, 0, 32, True, True),          # probe rows over two blocks, a cut last block, a row that sees nothing
    (20, 70, 50, 16, True, False),        # a chunk at an offset, probe not aligned to blocks
    (24, 50, 0, 16, False, False),        # not causal
])
def test_the_probe_kernel_equals_a_loop_over_every_probe_row_and_key(q_len, k_len, q_offset, probe_rows, causal,
                                                                     padded):
    # On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
    from sparsify.estimators import vertical_slash_line_mass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(q_len * k_len + probe_rows)
    q = torch.randn(1, 3, q_len, 16, generator=gen)
    k = torch.randn(1, 2, k_len, 16, generator=gen)
    valid = torch.ones(1, k_len, dtype=torch.bool)
    if padded:
        valid[0, :12] = False                           # the first probe rows see no key at all
    kv, block, scale = [1, 0, 1], 16, 0.5
    columns, diagonals = vertical_slash_line_mass(
        q.to(device), k.to(device), block_size=block, kv_head_index=torch.tensor(kv), probe_rows=probe_rows,
        scale=scale, causal=causal, q_offset=q_offset, key_valid=valid.to(device) if padded else None,
        kernel="triton")
    expected_columns, expected_diagonals = _line_mass_by_loop(q, k, valid, kv, block, scale, probe_rows, causal,
                                                              q_offset)
    assert torch.allclose(columns.cpu().double(), expected_columns, atol=1e-5)
    assert torch.allclose(diagonals.cpu().double(), expected_diagonals, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("k_blocks, total_blocks, first_block, classes", [
    (7, 7, 6, 2),          # self attention: the probe in the last block
    (12, 5, 3, 3),         # a chunk (fewer query blocks than key blocks), probe over two blocks
    (5, 9, 7, 2),          # more query positions than keys (a cross-attention-like offset)
])
def test_the_top_lines_kernel_picks_what_the_torch_masses_and_top_k_pick(k_blocks, total_blocks, first_block, classes):
    # Same split in, same lines out (exactly: the kernel sums the classes in the torch path's order), ties included.
    from sparsify.estimator_kernels import top_lines_of_split
    from sparsify.estimators import _line_counts, _line_mass_of_split, _top_lines

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(k_blocks * 10 + total_blocks)
    split = torch.rand(2, 3, k_blocks, classes, generator=gen)
    split[0, 1] = 0.25                                   # every line ties: the lower indices win
    split[1, 2, :, 1:] = 0.0
    vertical, slash = torch.tensor([0.2, 0.5, 1.0]), torch.tensor([0.1, 0.3, 0.05])
    column_mass, diagonal_mass = _line_mass_of_split(split, first_block, total_blocks)
    column_count, column_limit = _line_counts(vertical, k_blocks)
    slash_count, slash_limit = _line_counts(slash, k_blocks + total_blocks)
    columns, diagonals = top_lines_of_split(
        split.to(device), first_block=first_block, total_blocks=total_blocks,
        column_count=column_count.int().to(device), slash_count=slash_count.int().to(device),
        column_limit=column_limit, slash_limit=slash_limit)
    assert torch.equal(columns.cpu(), _top_lines(column_mass, vertical))
    assert torch.equal(diagonals.cpu(), _top_lines(diagonal_mass, slash))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("q_len, k_len, q_offset, causal", [(96, 96, 0, True), (40, 120, 80, True), (64, 80, 0, False)])
def test_vertical_slash_lists_by_the_kernels_equal_the_torch_path(q_len, k_len, q_offset, causal):
    # The whole Triton path (two probe launches, top lines, lists with sinks) against plain torch: the same lists.
    from sparsify.estimators import vertical_slash_block_lists

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(q_len + k_len)
    q = torch.randn(2, 4, q_len, 16, generator=gen)
    k = torch.randn(2, 2, k_len, 16, generator=gen)
    k[:, :, 5] *= 4                                       # a strong column
    arguments = dict(block_size=16, kv_head_index=torch.tensor([0, 0, 1, 1]), vertical=torch.tensor([0.2, 0.3, 0.1, 0.5]),
                     slash=torch.tensor([0.1, 0.2, 0.3, 0.05]), probe_rows=24, scale=0.3, causal=causal,
                     q_offset=q_offset, sink_blocks=torch.tensor([0, 2, 1, 0]))
    expected = vertical_slash_block_lists(q, k, kernel="torch", **arguments)
    fused = vertical_slash_block_lists(q.to(device), k.to(device), kernel="triton", **arguments)
    assert torch.equal(fused.cpu(), expected)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("length, padded, dtype", [(80, False, torch.float32), (70, True, torch.float32),
                                                   (37, True, torch.bfloat16)])
def test_the_block_mean_kernel_equals_the_torch_block_mean(length, padded, dtype):
    from sparsify.estimator_kernels import block_means
    from sparsify.estimators import _blocked_mean

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(2, 3, length, 24, generator=gen).to(dtype)
    valid = None
    if padded:
        valid = torch.ones(2, length, dtype=torch.bool)
        valid[1, :20] = False                     # the first block of the second row: no valid key at all
    means, counts = block_means(x.to(device), 16, None if valid is None else valid.to(device))
    expected_means, expected_counts = _blocked_mean(x, 16, valid)       # the torch path (CPU)
    assert torch.equal(counts.cpu(), expected_counts)
    assert torch.allclose(means.cpu(), expected_means, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("chunk_blocks, probe_rows, q_offset", [(4, 40, 0), (2, 16, 13), (8, 33, 0)])
def test_the_probe_kernel_over_chunks_of_key_blocks_equals_the_torch_split(chunk_blocks, probe_rows, q_offset):
    # Programs of several key blocks (the last chunk cut by k_len) and several tiles of probe rows: pass 1's
    # per-chunk row statistics combine into the same split as the torch path's one softmax.
    from sparsify.estimator_kernels import probe_block_split
    from sparsify.estimators import _probe_split_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(chunk_blocks * 100 + probe_rows)
    q_len, k_len = 90, 90 + q_offset
    q = torch.randn(1, 2, q_len, 16, generator=gen)
    k = torch.randn(1, 1, k_len, 16, generator=gen)
    valid = torch.ones(1, k_len, dtype=torch.bool)
    valid[0, 20:30] = False
    arguments = dict(block_size=16, kv_head_index=torch.tensor([0, 0]), probe_rows=probe_rows, scale=0.5,
                     causal=True, q_offset=q_offset)
    fused = probe_block_split(q.to(device), k.to(device), key_valid=valid.to(device), chunk_blocks=chunk_blocks,
                              **arguments)
    expected = _probe_split_torch(q, k, key_valid=valid, **arguments).double()
    assert fused.shape == expected.shape
    assert torch.allclose(fused.cpu().double(), expected, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_probes_chunks_stay_within_the_grid_and_an_explicit_chunk_that_overflows_it_is_refused():
    from sparsify.estimator_kernels import MAX_GRID_CHUNKS, _chunk_blocks, probe_block_split

    k_blocks = MAX_GRID_CHUNKS * 16 + 1                  # 16M keys at block 16
    assert -(-k_blocks // _chunk_blocks(k_blocks, 1)) <= MAX_GRID_CHUNKS
    assert _chunk_blocks(1024, 32) == 16 and _chunk_blocks(10, 1) == 1
    keys = torch.zeros(1, 1, 1, 16).expand(1, 1, (MAX_GRID_CHUNKS + 1) * 16, 16)   # shapes only: refused before work
    with pytest.raises(ValueError, match="65536 programs along the grid's second dimension"):
        probe_block_split(torch.zeros(1, 1, 16, 16), keys, block_size=16, kv_head_index=torch.tensor([0]),
                          probe_rows=16, scale=0.25, causal=False, q_offset=0, key_valid=None, chunk_blocks=1)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("probe_rows, q_offset", [(128, 0), (100, 37)])
def test_the_probe_kernel_with_every_probe_row_in_one_tile_equals_the_torch_split(probe_rows, q_offset):
    # Block 128 (a model's): all probe rows of a head in one tile of up to 128 rows, the heads of a key/value head
    # side by side in the grid; the first probe row off a block edge (q_offset 37) spans three offset classes.
    from sparsify.estimator_kernels import probe_block_split
    from sparsify.estimators import _probe_split_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(probe_rows + q_offset)
    q_len = 300
    k_len = q_len + q_offset
    q = torch.randn(1, 4, q_len, 64, generator=gen)
    k = torch.randn(1, 2, k_len, 64, generator=gen)
    arguments = dict(block_size=128, kv_head_index=torch.tensor([0, 0, 1, 1]), probe_rows=probe_rows, scale=0.125,
                     causal=True, q_offset=q_offset)
    fused = probe_block_split(q.to(device), k.to(device), key_valid=None, chunk_blocks=2, **arguments)
    expected = _probe_split_torch(q, k, key_valid=None, **arguments).double()
    assert fused.shape == expected.shape
    assert torch.allclose(fused.cpu().double(), expected, atol=1e-5)
    assert torch.allclose(fused.sum((-1, -2)).cpu().double(), torch.full((1, 4), float(probe_rows),
                                                                          dtype=torch.float64), rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("q_len, k_len, q_offset, causal, padded", [
    (100, 100, 0, True, True),          # a cut last block, padding (a row of blocks that sees no valid key)
    (40, 170, 130, True, False),        # a chunk at the end of a longer cache
    (96, 120, 0, False, False),         # not causal
    (1, 97, 96, True, False),           # a decode step
])
@pytest.mark.parametrize("scoring", ["mean", "query_mean"])
def test_the_coverage_kernel_equals_the_torch_path(q_len, k_len, q_offset, causal, padded, scoring):
    # On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
    from sparsify.estimators import pooled_coverage_block_lists

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(q_len + k_len)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k = torch.randn(2, 2, k_len, 8, generator=gen)
    valid = None
    if padded:
        valid = torch.ones(2, k_len, dtype=torch.bool)
        valid[1, :20] = False
    k_blocks = blocks_for(k_len, 16)
    arguments = dict(block_size=16, kv_head_index=torch.tensor([0, 0, 1, 1]),
                     coverage=torch.tensor([0.9, 0.5, 0.99, 0.7]), min_blocks=torch.tensor([1, 3, 1, 2]),
                     max_blocks=torch.tensor([k_blocks, k_blocks, max(1, k_blocks // 5), k_blocks // 2]), scale=0.3,
                     causal=causal, q_offset=q_offset, temperature=torch.tensor([1.0, 1.0, 0.5, 2.0]).view(1, -1, 1, 1))
    for sinks in (None, torch.tensor([0, 2, 1, 0])):                 # the sink slots come out of the kernel too
        expected = pooled_coverage_block_lists(q, k, key_valid=valid, kernel="torch", sink_blocks=sinks,
                                               scoring=scoring, **arguments)
        fused = pooled_coverage_block_lists(
            q.to(device), k.to(device), key_valid=None if valid is None else valid.to(device), kernel="triton",
            sink_blocks=sinks, scoring=scoring, **{**arguments, "temperature": arguments["temperature"].to(device)})
        assert torch.equal(fused.cpu(), expected)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("q_len, k_len, q_offset, causal, padded, dtype", [
    (100, 100, 0, True, True, torch.float32),      # a cut last block, padding (a block with no valid key: -inf)
    (40, 170, 130, True, False, torch.float32),    # a chunk at the end of a longer cache
    (96, 120, 0, False, False, torch.float32),     # not causal
    (1, 97, 96, True, False, torch.float32),       # a decode step
    (600, 600, 0, True, False, torch.float16),     # several tiles of 16 query blocks; 16-bit keys
])
def test_the_query_mean_kernel_equals_the_torch_logits(q_len, k_len, q_offset, causal, padded, dtype):
    # One launch per call: each query block's mean query against every key, reduced per key block to its
    # log-sum-exp. On CPU in Triton's interpreter.
    from sparsify.estimators import query_mean_block_logits

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(q_len + 7 * k_len)
    q = torch.randn(2, 4, q_len, 16, generator=gen).to(dtype)
    k = torch.randn(2, 2, k_len, 16, generator=gen).to(dtype)
    valid = None
    if padded:
        valid = torch.ones(2, k_len, dtype=torch.bool)
        valid[1, :40] = False                                      # batch 1: its first key blocks hold no valid key
    arguments = dict(block_size=16, kv_head_index=torch.tensor([1, 0, 1, 0]), scale=0.3, causal=causal,
                     q_offset=q_offset)
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0]).view(1, -1, 1, 1)
    expected = query_mean_block_logits(q.float(), k.float(), key_valid=valid, temperature=temperature, kernel="torch",
                                       **arguments)
    fused = query_mean_block_logits(q.to(device), k.to(device), key_valid=None if valid is None else valid.to(device),
                                    temperature=temperature.to(device), kernel="triton", **arguments).cpu()
    assert fused.shape == expected.shape == (2, 4, blocks_for(q_len, 16), blocks_for(k_len, 16))
    hidden = expected == -math.inf
    assert torch.equal(fused == -math.inf, hidden)
    assert bool(hidden.any()) == (causal and q_len > 16)           # blocks after every query of a row: -inf
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fused[~hidden], expected[~hidden], atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True)])
def test_the_coverage_kernel_ranking_a_preselected_tile_equals_the_torch_path(causal, padded):
    # Rows of 82 blocks (padded to 128) keeping at most 20: the kernel first radix-selects each row's 20 best blocks
    # (PRESELECT_WIDTH_RATIO); heads with zero queries score every block alike, so the ties at the selection's edge
    # must go to the lower blocks, as in the torch path's ranking; early causal rows see fewer blocks than 20.
    from sparsify.estimator_kernels import PRESELECT_WIDTH_RATIO
    from sparsify.estimators import pooled_coverage_block_lists

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(82)
    length = 1300
    q = torch.randn(1, 4, length, 8, generator=gen)
    q[:, 1] = 0                                              # every block alike: ties everywhere
    k = torch.randn(1, 2, length, 8, generator=gen)
    valid = None
    if padded:
        valid = torch.ones(1, length, dtype=torch.bool)
        valid[0, 100:400] = False
    k_blocks = blocks_for(length, 16)
    assert PRESELECT_WIDTH_RATIO * 32 <= 128                 # (the kernel takes the pre-selecting path here)
    arguments = dict(block_size=16, kv_head_index=torch.tensor([0, 0, 1, 1]),
                     # (0.537 of n equal masses is never a whole count: no float32 tie at the coverage line)
                     coverage=torch.tensor([0.9, 0.537, 0.99, 0.7]), min_blocks=torch.tensor([1, 3, 2, 1]),
                     max_blocks=torch.tensor([20, 8, 3, 12]), scale=0.3, causal=causal, q_offset=0,
                     temperature=torch.tensor([1.0, 1.0, 0.5, 2.0]).view(1, -1, 1, 1))
    expected = pooled_coverage_block_lists(q, k, key_valid=valid, kernel="torch", sink_blocks=torch.tensor([1, 0, 2, 0]),
                                           **arguments)
    fused = pooled_coverage_block_lists(
        q.to(device), k.to(device), key_valid=None if valid is None else valid.to(device), kernel="triton",
        sink_blocks=torch.tensor([1, 0, 2, 0]), **{**arguments, "temperature": arguments["temperature"].to(device)})
    assert expected.shape[-1] == 20 + 2 and k_blocks == 82
    assert torch.equal(fused.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_probe_kernel_on_the_gpu_matches_the_torch_path_and_the_masks_agree():
    # The Llama-3.2-1B geometry at 8K tokens, bf16: the kernel's float32 scores against the torch path on the same
    # values in float32; the masks the site estimates with each agree block for block (ties aside).
    from sparsify.estimators import vertical_slash_line_mass

    gen = torch.Generator().manual_seed(19)
    q = torch.randn(1, 32, 8192, 64, generator=gen).cuda().bfloat16()
    k = torch.randn(1, 8, 8192, 64, generator=gen).cuda().bfloat16()
    k[:, :, 1000] *= 6
    arguments = dict(block_size=128, kv_head_index=torch.arange(32) // 4, probe_rows=128, scale=0.125, causal=True)
    fused = vertical_slash_line_mass(q, k, kernel="triton", **arguments)
    reference = vertical_slash_line_mass(q.float(), k.float(), kernel="torch", **arguments)
    for mine, theirs in zip(fused, reference):
        assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-3)
    source = AdaptiveMaskSource([patterns.estimated_vertical_slash(0.02, 0.02, sink_blocks=1)] * 32, block_size=128,
                                causal=True, kv_head_index=torch.arange(32) // 4)
    on_gpu = source.mask(q, k).to_block_masks().cpu()
    on_cpu = source.mask(q.float().cpu(), k.float().cpu()).to_block_masks()
    assert (on_gpu == on_cpu).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("scoring", ["mean", "query_mean"])
def test_the_coverage_kernel_on_the_gpu_agrees_with_the_torch_path(scoring):
    from sparsify.estimators import pooled_coverage_block_lists

    gen = torch.Generator().manual_seed(20)
    q = torch.randn(1, 32, 16384, 64, generator=gen).cuda().bfloat16()
    k = torch.randn(1, 8, 16384, 64, generator=gen).cuda().bfloat16()
    heads = torch.ones(32)
    arguments = dict(block_size=128, kv_head_index=torch.arange(32) // 4, coverage=0.9 * heads,
                     min_blocks=heads.long(), max_blocks=6 * heads.long(), causal=True)
    fused = pooled_coverage_block_lists(q, k, kernel="triton", scoring=scoring, **arguments)
    reference = pooled_coverage_block_lists(q, k, kernel="torch", scoring=scoring, **arguments)
    assert fused.shape == reference.shape == (1, 32, 128, 6)
    assert (fused == reference).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern", [patterns.estimated_vertical_slash(0.05, 0.05, sink_blocks=1),
                                     patterns.pooled_coverage(0.9, max_fraction=0.1, sink_blocks=1),
                                     patterns.pooled_coverage(0.9, max_fraction=0.1, sink_blocks=1, scoring="query_mean")])
def test_a_site_of_adaptive_heads_on_the_gpu_equals_dense_math_under_its_estimated_mask(pattern):
    # The whole path on the GPU, bf16: estimators (Triton), per-call block lists, the backend `auto` picks.
    site = AttentionSite("model.layers.0.self_attn", 0, num_heads=8, num_kv_heads=2, head_dim=64, q_len=4096,
                         k_len=4096, causal=True)
    layer = SparseAttention(site, [pattern] * 8, block_size=128).cuda()
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(1, 8, 4096, 64, generator=gen).cuda().bfloat16()
    k, v = (torch.randn(1, 2, 4096, 64, generator=gen).cuda().bfloat16() for _ in range(2))
    with torch.no_grad():
        out = layer(q, k, v, None, True, None)
    mask = layer.adaptive_source.mask(q, k)
    assert mask.full_width < mask.k_blocks and mask.density() < 0.5
    assert rel_err(out.float(), mask_reference(q.float(), k.float(), v.float(), mask).float()) < 2e-2


def test_an_estimate_reuses_its_device_copies_of_the_per_head_values():
    from sparsify.estimators import DeviceCopies

    source = AdaptiveMaskSource([patterns.pooled_coverage(0.9, sink_blocks=1),
                                 patterns.pooled_coverage(0.7, sink_blocks=2)], block_size=16, causal=True,
                                kv_head_index=torch.tensor([0, 0]))
    q = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(3))
    first = source.mask(q, q[:, :1]).to_block_masks()
    made = dict(source._copies._copies)
    assert made                                            # the per-head values went through the cache
    second = source.mask(q, q[:, :1]).to_block_masks()
    assert source._copies._copies.keys() == made.keys()    # and came from it the second time
    assert all(source._copies._copies[key] is made[key] for key in made)
    assert torch.equal(first, second)
    copies = DeviceCopies(size=2)
    for value in range(3):
        copies.of(torch.tensor([value]), "cpu")
    assert len(copies._copies) == 2                        # bounded: the oldest went first
