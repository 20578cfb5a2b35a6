"""Query-aware decode: page summaries, the page selection and the decode step, each against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from sparsify.patterns import query_aware_decode
from sparsify.errors import PatternError
from sparsify.patterns import pattern_from_dict
from sparsify.runtime.decode import KeyPageSummaries, QueryAwareDecoder, page_bounds, select_pages, visible_key_end

from backend_helpers import rel_err


def _keys(seed, batch=2, kv_heads=2, length=70, dim=8):
    return torch.randn(batch, kv_heads, length, dim, generator=torch.Generator().manual_seed(seed))


def _page_reference(keys, page, end):
    """Per page holding a slot before ``end``: min and max of its keys before ``end`` (plain loops)."""
    pages = math.ceil(end / page)
    low = torch.stack([keys[:, :, p * page:min((p + 1) * page, end)].amin(2) for p in range(pages)], 2)
    high = torch.stack([keys[:, :, p * page:min((p + 1) * page, end)].amax(2) for p in range(pages)], 2)
    return low, high


def test_summaries_follow_a_prefill_in_chunks_and_decode_steps_page_by_page():
    keys = _keys(0, length=70)
    summaries = KeyPageSummaries(page_size=8)
    summaries.summarise(keys, 0, 21)                        # a first chunk ending inside page 2
    summaries.summarise(keys, 21, 45)                       # a second chunk
    for end in range(46, 71, 1):                            # decode steps, one slot each
        summaries.update(keys, torch.tensor(end), new_tokens=1)
        low, high = _page_reference(keys, 8, end)
        pages = low.shape[2]
        assert torch.equal(summaries.minimum[:, :, :pages], low) and torch.equal(summaries.maximum[:, :, :pages], high)
    summaries.update(keys, torch.tensor(70), new_tokens=11)   # several new slots across two pages
    low, high = _page_reference(keys, 8, 70)
    assert torch.equal(summaries.minimum[:, :, :9], low) and torch.equal(summaries.maximum[:, :, :9], high)


def test_summaries_of_a_growing_cache_grow_and_keep_what_they_held():
    summaries = KeyPageSummaries(page_size=2)
    keys = _keys(1, batch=1, kv_heads=1, length=300)
    summaries.summarise(keys[:, :, :10], 0, 10)
    capacity = summaries.pages_capacity
    summaries.update(keys, torch.tensor(300), new_tokens=1)           # the cache is longer than the capacity now
    assert summaries.pages_capacity >= 150 > capacity
    low, high = _page_reference(keys, 2, 10)
    assert torch.equal(summaries.minimum[:, :, :5], low) and torch.equal(summaries.maximum[:, :, :5], high)


def test_page_bound_is_an_upper_bound_of_every_score_in_the_page():
    keys = _keys(2, length=64)
    q = torch.randn(2, 2, 3, 8, generator=torch.Generator().manual_seed(3))
    low, high = _page_reference(keys, 16, 64)
    bounds = page_bounds(q, low, high)
    scores = (q @ keys.transpose(-1, -2)).view(2, 2, 3, 4, 16).amax((2, 4))          # best score per page
    assert bool((bounds >= scores - 1e-5).all())
    # The bound of one row is attained by the corner of the page's box that agrees with q's signs.
    corner = torch.where(q[:, :, :1].unsqueeze(3) >= 0, high.unsqueeze(2), low.unsqueeze(2))  # [B, H, 1, pages, D]
    expected = (q[:, :, :1].unsqueeze(3) * corner).sum(-1).squeeze(2)
    assert torch.allclose(page_bounds(q[:, :, :1], low, high), expected, atol=1e-5)


@pytest.mark.parametrize("end", [37, 64, 100])
def test_selection_is_the_brute_force_top_pages_of_the_bound_plus_sinks_and_window(end):
    pattern = query_aware_decode(0.2, page_size=4, sink_pages=1, window_pages=2, min_pages=1)
    pages = 25
    bounds = torch.randn(2, 3, pages, generator=torch.Generator().manual_seed(end))
    chosen = select_pages(bounds, torch.tensor(end), pattern, 4)
    count = pattern.selected_pages(pages)
    assert chosen.shape == (2, 3, count)
    last = (end - 1) // 4
    for b in range(2):
        for h in range(3):
            picked = set(chosen[b, h].tolist())
            assert len(picked) == count
            forced = {0, last, last - 1}
            valid = [p for p in range(pages) if p * 4 < end and p not in forced]
            ranked = sorted(valid, key=lambda p: -float(bounds[b, h, p]))
            expected = forced | set(ranked[:count - len(forced)])
            if len(expected) < count:                            # fewer valid pages than slots: the rest lie past end
                assert expected <= picked and all(p * 4 >= end for p in picked - expected)
            else:
                assert picked == expected


def _dense_decode(q, keys, values, end, scale=None):
    """Dense attention of the last ``rows`` queries (at slots end - rows ...) over cache slots before ``end``."""
    group = q.shape[1] // keys.shape[1]
    k = keys[:, :, :end].repeat_interleave(group, 1).double()
    v = values[:, :, :end].repeat_interleave(group, 1).double()
    rows = q.shape[2]
    visible = torch.arange(end).view(1, -1) <= (end - rows + torch.arange(rows)).view(-1, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v


@pytest.mark.parametrize("rows", [1, 3])
def test_decode_reading_every_page_equals_dense_attention(rows):
    gen = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, 2, 77, 16, generator=gen), torch.randn(2, 2, 77, 16, generator=gen)
    decoder = QueryAwareDecoder(query_aware_decode(1.0, page_size=8), num_heads=4, num_kv_heads=2, block_size=16)
    decoder.observe_prefill(keys, 0, 77 - rows)
    q = torch.randn(2, 4, rows, 16, generator=gen)
    out = decoder(q, keys, values, None, None)
    assert rel_err(out, _dense_decode(q, keys, values, 77)) < 1e-6


def test_sparse_decode_equals_dense_attention_over_the_selected_pages_of_a_static_cache():
    gen = torch.Generator().manual_seed(5)
    capacity, end, page = 128, 90, 8
    keys, values = torch.randn(1, 2, capacity, 16, generator=gen), torch.randn(1, 2, capacity, 16, generator=gen)
    pattern = query_aware_decode(0.25, page_size=page, sink_pages=1, window_pages=1, min_pages=1)
    decoder = QueryAwareDecoder(pattern, num_heads=4, num_kv_heads=2)
    decoder.observe_prefill(keys, 0, end - 1)
    mask = torch.zeros(1, 1, 1, capacity, dtype=torch.bool)
    mask[..., :end] = True                                     # a static cache: the unused slots are hidden
    q = torch.randn(1, 4, 1, 16, generator=gen)
    assert int(visible_key_end(mask, capacity)) == end
    decoder.read_log = []
    out = decoder(q, keys, values, mask, None)
    # Reference: the same pages, chosen by brute force from the exact per-page min/max, then dense attention.
    low, high = _page_reference(keys, page, end)
    grouped = q.view(1, 2, 2, 16)
    bounds = torch.full((1, 2, capacity // page), float("-inf"))
    bounds[..., :low.shape[2]] = page_bounds(grouped, low, high)
    chosen = select_pages(bounds, torch.tensor(end), pattern, page)
    expected = torch.zeros(1, 4, 1, 16, dtype=torch.float64)
    for h in range(2):
        slots = sorted(s for p in chosen[0, h].tolist() for s in range(p * page, (p + 1) * page) if s < end)
        part = _dense_decode(q[:, 2 * h:2 * h + 2], keys[:, h:h + 1, slots], values[:, h:h + 1, slots], len(slots))
        expected[:, 2 * h:2 * h + 2] = part
    assert rel_err(out, expected) < 1e-6
    read = float(decoder.read_log[0])
    assert 0 < read < 0.6 and rel_err(out, _dense_decode(q, keys, values, end)) > 1e-4     # it really is sparse


def test_decode_before_any_prefill_says_what_to_do():
    decoder = QueryAwareDecoder(query_aware_decode(), num_heads=2, num_kv_heads=1)
    with pytest.raises(RuntimeError, match="use_cache=True"):
        decoder(torch.randn(1, 2, 1, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8), None, None)


def test_decode_pattern_round_trips_and_validates():
    pattern = query_aware_decode(0.05, page_size=16, sink_pages=2, window_pages=4, min_pages=8)
    assert pattern_from_dict(pattern.to_dict()) == pattern and pattern.is_decode
    assert pattern.block_mask(3, 3).all()                      # it never sparsifies a prefill
    for bad, message in ((lambda: query_aware_decode(1.5), "budget"),
                         (lambda: query_aware_decode(page_size=0), "page_size"),
                         (lambda: query_aware_decode(window_pages=0), "window_pages")):
        with pytest.raises(PatternError, match=message):
            bad()


@pytest.mark.gpu
def test_decode_on_the_gpu_in_bfloat16_equals_dense_with_every_page_and_compiles_once():
    gen = torch.Generator(device="cuda").manual_seed(8)
    keys = torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    values = torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(2, 32, 1, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    decoder = QueryAwareDecoder(query_aware_decode(1.0, page_size=32), num_heads=32, num_kv_heads=8)
    decoder.observe_prefill(keys, 0, 4095)
    assert rel_err(decoder(q, keys, values, None, None), _dense_decode(q.cpu(), keys.cpu(), values.cpu(), 4096)) < 2e-2
    sparse = QueryAwareDecoder(query_aware_decode(0.05, page_size=32), num_heads=32, num_kv_heads=8)
    sparse.observe_prefill(keys, 0, 4095)
    mask = torch.ones(2, 1, 1, 4096, dtype=torch.bool, device="cuda")
    eager = sparse(q, keys, values, mask, None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()          # reset() keeps the counters: earlier tests' graphs would count
    compiled = torch.compile(sparse, fullgraph=True)
    for _ in range(3):
        got = compiled(q, keys, values, mask, None)
    assert rel_err(got, eager) < 1e-2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("rows,end", [(1, 75), (1, 96), (2, 83)])
def test_pattern_rows_of_a_static_cache_equal_the_site_attending_over_the_filled_slots(rows, end):
    from sparsify import patterns
    from sparsify.runtime.sparse_attention import SparseAttention
    from sparsify.site import AttentionSite

    capacity, block = 128, 16
    site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=2, head_dim=16, q_len=capacity, k_len=capacity,
                         causal=True)
    heads = [patterns.dense(), patterns.sliding_window(32) | patterns.attention_sinks(16), patterns.skip(),
             patterns.sliding_window(16)]
    layer = SparseAttention(site, heads, block_size=block)
    gen = torch.Generator().manual_seed(end)
    keys, values = torch.randn(2, 2, capacity, 16, generator=gen), torch.randn(2, 2, capacity, 16, generator=gen)
    q = torch.randn(2, 4, rows, 16, generator=gen)
    mask = torch.zeros(2, 1, rows, capacity, dtype=torch.bool)
    for r in range(rows):
        mask[:, :, r, :end - rows + r + 1] = True                    # a static cache: row r sees the slots up to its own
    mask[1, :, :, :5] = False                                        # and left padding on the second sequence
    from sparsify.runtime.decode import pattern_rows_decode

    got = pattern_rows_decode(layer, q, keys, values, mask, None)
    # Reference: the site over the filled slots only, at the step's offset (what a growing cache runs).
    expected = layer.attend(q, keys[:, :, :end], values[:, :, :end], mask[..., :end], None, is_causal=True,
                            q_offset=end - rows)
    assert rel_err(got, expected) < 1e-5
    assert bool((got[:, 2] == 0).all())                              # the skipped head
    dense_rows = _dense_decode(q, keys, values, end)
    assert rel_err(got[:, 3], dense_rows[:, 3]) > 1e-3               # the window really cuts
