"""The Triton kernels of query-aware decode against float64 references: summaries, page scores, attention over the chosen pages.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py switches it
on for the session; it computes bfloat16 wrongly, so bfloat16 is checked by the ``gpu`` tests).
Every attention check is against dense attention restricted to the pages the step selected.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton): the decode kernels cannot run",
                allow_module_level=True)

from backend_helpers import HAS_CUDA, ops_called, rel_err  # noqa: E402
from sparsify.backends import triton_decode  # noqa: E402
from sparsify.patterns import query_aware_decode  # noqa: E402
from sparsify.runtime.decode import QueryAwareDecoder, page_bounds, select_pages  # noqa: E402


DEVICE = "cuda" if HAS_CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _cache(seed, batch, kv_heads, length, dim, dtype, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, length, dim, generator=gen).to(device, dtype)
    values = torch.randn(batch, kv_heads, length, dim, generator=gen).to(device, dtype)
    return keys, values


def _page_reference(keys, page, end):
    """float64 min / max of every page's keys before ``end`` (plain slicing)."""
    pages = math.ceil(end / page)
    keys = keys.double()
    low = torch.stack([keys[:, :, p * page:min((p + 1) * page, end)].amin(2) for p in range(pages)], 2)
    high = torch.stack([keys[:, :, p * page:min((p + 1) * page, end)].amax(2) for p in range(pages)], 2)
    return low, high


def _visible_user(attention_mask, batch, rows, length):
    """bool ``[B, rows, S]``: what the user's mask shows the step's rows (head 0 of a 4-D mask, as the decoder reads it)."""
    if attention_mask is None:
        return torch.ones(batch, rows, length, dtype=torch.bool)
    user = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask
    user = user[..., -rows:, :].cpu()
    user = user if user.dtype == torch.bool else user > torch.finfo(user.dtype).min / 2
    return user.expand(batch, rows, length)


def _restricted_reference(q, keys, values, chosen, end, page, attention_mask=None, scale=None):
    """float64 attention of each key/value head's query rows over exactly the valid slots of its chosen pages."""
    batch, heads, rows, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    user = _visible_user(attention_mask, batch, rows, length)
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, rows, values.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            slots = sorted(s for p in chosen[b, h].tolist() for s in range(p * page, (p + 1) * page) if s < end)
            slots = torch.tensor(slots)
            k, v = keys[b, h, slots].double().cpu(), values[b, h, slots].double().cpu()
            for g in range(group):
                head = h * group + g
                scores = (q[b, head].double().cpu() @ k.T) * scale                   # [rows, n]
                row_slot = end - rows + torch.arange(rows)
                visible = (slots.view(1, -1) <= row_slot.view(-1, 1)) & user[b][:, slots]
                weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
                out[b, head] = torch.nan_to_num(weights) @ v
    return out


def test_summary_update_kernel_equals_the_exact_page_minimum_and_maximum():
    keys, _ = _cache(0, 2, 3, 90, 24, torch.float32)
    minimum = torch.full((2, 3, 8, 24), 7.0, device=DEVICE)
    maximum = torch.full((2, 3, 8, 24), -7.0, device=DEVICE)
    for end, new_tokens in ((90, 1), (61, 5), (37, 14)):               # within a page, across two, across three
        triton_decode.update_summaries(keys, minimum, maximum, torch.tensor(end, device=DEVICE), new_tokens, 12)
        first, last = (end - new_tokens) // 12, (end - 1) // 12
        end_low, end_high = _page_reference(keys.cpu(), 12, end)
        assert torch.equal(minimum[:, :, first:last + 1].cpu().double(), end_low[:, :, first:last + 1])
        assert torch.equal(maximum[:, :, first:last + 1].cpu().double(), end_high[:, :, first:last + 1])
    untouched = [0, 6]                                                     # pages no new token fell in: left alone
    assert bool((minimum[:, :, untouched] == 7.0).all()) and bool((maximum[:, :, untouched] == -7.0).all())


@pytest.mark.parametrize("group,rows", [(4, 1), (1, 3), (8, 2)])
def test_page_scores_are_the_bounds_with_sinks_and_window_forced_and_the_tail_excluded(group, rows):
    keys, _ = _cache(1, 2, 2, 200, 64, torch.float32)
    end, page = 170, 8
    low, high = _page_reference(keys.cpu(), page, 200)
    q = torch.randn(2, 2 * group, rows, 64, generator=torch.Generator().manual_seed(2))
    pattern = query_aware_decode(0.2, page_size=page, sink_pages=2, window_pages=3, min_pages=1)
    scores = triton_decode.page_scores(q.to(DEVICE), low.float().to(DEVICE), high.float().to(DEVICE),
                                       torch.tensor(end, device=DEVICE), 25, page, 2, 3).cpu()
    bounds = page_bounds(q.double().view(2, 2, group * rows, 64), low, high)
    last = (end - 1) // page
    forced = [0, 1, last - 2, last - 1, last]
    past_end = [p for p in range(25) if p * page >= end]
    rest = [p for p in range(25) if p not in forced and p not in past_end]
    assert bool((scores[..., forced] == float("inf")).all()) and bool((scores[..., past_end] == float("-inf")).all())
    assert torch.allclose(scores[..., rest].double(), bounds[..., rest], rtol=1e-5, atol=1e-4)
    chosen = scores.topk(pattern.selected_pages(25), dim=-1).indices
    expected = select_pages(bounds, torch.tensor(end), pattern, page)
    assert [sorted(row) for row in chosen.flatten(0, 1).tolist()] == [sorted(row) for row in
                                                                      expected.flatten(0, 1).tolist()]


@pytest.mark.parametrize("end, new_tokens, page", [(170, 1, 8), (133, 5, 8), (96, 20, 12), (61, 1, 64),
                                                   (170, 3, 2)])          # 100 pages: the touched ones in tile 2
def test_page_scores_that_re_summarise_the_new_tokens_pages_equal_the_update_then_the_scores(end, new_tokens, page):
    # The decode step's summary update runs inside the page scores' launch (the tile holding each touched page
    # re-summarises it): the same stored summaries and the same scores as the two launches apart.
    keys, _ = _cache(5, 2, 2, 200, 64, torch.float32)
    pages = -(-200 // page)
    low, high = _page_reference(keys.cpu(), page, 200)
    stale_low, stale_high = low.float().to(DEVICE) - 1.0, high.float().to(DEVICE) + 1.0   # the touched pages' old summaries
    q = torch.randn(2, 8, new_tokens, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    end_tensor = torch.tensor(end, device=DEVICE)
    apart_low, apart_high = stale_low.clone(), stale_high.clone()
    triton_decode.update_summaries(keys, apart_low, apart_high, end_tensor, new_tokens, page)
    apart = triton_decode.page_scores(q, apart_low, apart_high, end_tensor, pages, page, 1, 2)
    fused_low, fused_high = stale_low.clone(), stale_high.clone()
    fused = triton_decode.page_scores(q, fused_low, fused_high, end_tensor, pages, page, 1, 2, key=keys,
                                      new_tokens=new_tokens)
    assert torch.equal(fused_low, apart_low) and torch.equal(fused_high, apart_high)
    assert torch.equal(fused, apart)
    first, last = (end - new_tokens) // page, (end - 1) // page
    assert not torch.equal(fused_low[:, :, first:last + 1], stale_low[:, :, first:last + 1])   # it did update


def test_a_growing_caches_step_without_an_end_tensor_equals_the_step_told_its_end():
    # No mask: the cache ends at its size, which the kernels take as a launch argument (end None, no fill kernel).
    keys, values = _cache(21, 2, 2, 181, 64, torch.float32)
    page, pages = 16, -(-181 // 16)
    low, high = _page_reference(keys.cpu(), page, 181)
    q = torch.randn(2, 8, 2, 64, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    results = []
    for end in (None, torch.tensor(181, device=DEVICE)):
        step_low, step_high = low.float().to(DEVICE) - 1.0, high.float().to(DEVICE) + 1.0
        apart_low, apart_high = step_low.clone(), step_high.clone()
        triton_decode.update_summaries(keys, apart_low, apart_high, end, 2, page)
        output, chosen = triton_decode.decode_step(q, keys, values, step_low, step_high, end, None, 0.125, page, 1, 2,
                                                   5)
        results.append((apart_low, apart_high, step_low, step_high, output, chosen.sort(-1).values))
    for without, told in zip(*results):
        assert torch.equal(without, told)
    assert torch.equal(results[0][0], results[0][2])                      # the step's fused update = the update alone


MASKS = ("none", "bool_padding", "additive")


def _mask(kind, batch, rows, length, end, dtype):
    if kind == "none":
        return None
    keep = torch.zeros(batch, 1, rows, length, dtype=torch.bool)
    keep[..., :end] = True
    keep[-1, ..., :13] = False                                            # left padding of the last sequence
    if kind == "bool_padding":
        return keep.to(DEVICE)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).to(DEVICE)


@pytest.mark.parametrize("dtype,dim,group,rows,page,mask_kind", [
    (torch.float32, 64, 4, 1, 16, "none"),
    (torch.float16, 128, 4, 1, 16, "bool_padding"),
    (torch.float32, 128, 1, 3, 8, "additive"),
    (torch.float16, 64, 2, 2, 12, "bool_padding"),                        # a page size that is no power of two
    (torch.float32, 80, 8, 1, 32, "none"),                                # a head dim that is no power of two
])
def test_attention_over_the_chosen_pages_equals_dense_attention_restricted_to_them(dtype, dim, group, rows, page,
                                                                                    mask_kind):
    batch, kv_heads, capacity, end = 2, 2, 260, 241
    keys, values = _cache(3 + dim + page, batch, kv_heads, capacity, dim, dtype)
    gen = torch.Generator().manual_seed(4 + group)
    q = torch.randn(batch, kv_heads * group, rows, dim, generator=gen).to(DEVICE, dtype)
    pages = math.ceil(capacity / page)
    chosen = torch.stack([torch.randperm(pages, generator=gen)[:7] for _ in range(batch * kv_heads)])
    chosen[0, 0] = (end - 1) // page                                      # the new token's page
    chosen = chosen.view(batch, kv_heads, 7)
    attention_mask = _mask(mask_kind, batch, rows, capacity, end, dtype)
    out = triton_decode.selected_pages_attention(q, keys, values, chosen.to(DEVICE), torch.tensor(end, device=DEVICE),
                                                 attention_mask, 0.3, page)
    expected = _restricted_reference(q, keys, values, chosen, end, page, attention_mask, scale=0.3)
    assert out.dtype == dtype and out.shape == (batch, kv_heads * group, rows, dim)
    assert rel_err(out.cpu(), expected) < TOLERANCE[dtype]


def test_many_splits_merge_into_the_attention_over_every_chosen_page():
    keys, values = _cache(11, 1, 1, 2304, 64, torch.float32)
    chosen = torch.randperm(72, generator=torch.Generator().manual_seed(12))[:70].view(1, 1, 70)
    splits, _ = triton_decode.split_count(1, 70 * 32, torch.device(DEVICE))
    assert HAS_CUDA or splits > 16                                         # the combine walks its splits in chunks
    q = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    out = triton_decode.selected_pages_attention(q, keys, values, chosen.to(DEVICE),
                                                 torch.tensor(2304, device=DEVICE), None, 0.125, 32)
    assert rel_err(out.cpu(), _restricted_reference(q, keys, values, chosen, 2304, 32, scale=0.125)) < 1e-5


@pytest.mark.parametrize("per_multiprocessor", [1, 8])
def test_fewer_or_more_split_programs_give_the_same_attention(per_multiprocessor):
    keys, values = _cache(14, 1, 2, 2048, 64, torch.float32)
    chosen = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(15 + h))[:40] for h in range(2)])
    chosen = chosen.view(1, 2, 40)
    splits = {count: triton_decode.split_count(2, 40 * 32, torch.device(DEVICE), count)[0] for count in (1, 4, 8)}
    assert HAS_CUDA or splits[1] < splits[4] < splits[8]                 # the count changes the split
    q = torch.randn(1, 8, 1, 64, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    out = triton_decode.selected_pages_attention(q, keys, values, chosen.to(DEVICE), None, None, 0.125, 32,
                                                 per_multiprocessor=per_multiprocessor)
    assert rel_err(out.cpu(), _restricted_reference(q, keys, values, chosen, 2048, 32, scale=0.125)) < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_triton_decoder_selects_the_torch_pages_and_equals_the_restricted_reference_step_after_step(masked):
    batch, heads, kv_heads, capacity, dim, page = 2, 8, 2, 192, 64, 8
    keys, values = _cache(5, batch, kv_heads, capacity, dim, torch.float32)
    pattern = query_aware_decode(0.15, page_size=page, sink_pages=1, window_pages=2, min_pages=1)
    fast = QueryAwareDecoder(pattern, num_heads=heads, num_kv_heads=kv_heads, kernels="triton")
    reference = QueryAwareDecoder(pattern, num_heads=heads, num_kv_heads=kv_heads, kernels="torch")
    prompt = 150
    for decoder in (fast, reference):
        decoder.observe_prefill(keys, 0, prompt)
        decoder.read_log = []
    gen = torch.Generator().manual_seed(6)
    for end in range(prompt + 1, prompt + 5):
        q = torch.randn(batch, heads, 1, dim, generator=gen).to(DEVICE)
        length = capacity if masked else end
        attention_mask = _mask("bool_padding", batch, 1, capacity, end, torch.float32) if masked else None
        step_keys, step_values = keys[:, :, :length], values[:, :, :length]
        out = fast(q, step_keys, step_values, attention_mask, None)
        expected_out = reference(q, step_keys, step_values, attention_mask, None)
        assert rel_err(out.cpu(), expected_out.cpu()) < 1e-5
        assert torch.equal(fast.summaries.minimum[:, :, :math.ceil(end / page)],
                           reference.summaries.minimum[:, :, :math.ceil(end / page)])
    assert torch.allclose(torch.stack(fast.read_log), torch.stack(reference.read_log))
    assert float(fast.read_log[-1]) < 0.6                                  # it really is sparse


def test_triton_step_returns_the_pages_it_read_and_attends_over_exactly_those():
    batch, heads, kv_heads, length, dim, page = 1, 4, 1, 300, 64, 16
    keys, values = _cache(7, batch, kv_heads, length, dim, torch.float16)
    decoder = QueryAwareDecoder(query_aware_decode(0.1, page_size=page, min_pages=1), num_heads=heads,
                                num_kv_heads=kv_heads, kernels="triton")
    decoder.observe_prefill(keys, 0, length - 1)
    q = torch.randn(batch, heads, 1, dim, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.float16)
    out, chosen = torch.ops.sparsify.query_aware_decode_step(
        q, keys, values, decoder.summaries.minimum, decoder.summaries.maximum, torch.tensor(length, device=DEVICE),
        None, dim ** -0.5, page, 1, 2, decoder.pattern.selected_pages(math.ceil(length / page)))
    assert chosen.shape == (1, 1, 5) and len(set(chosen.flatten().tolist())) == 5
    assert {0, 17, 18} <= set(chosen.flatten().tolist())                 # the sink and the window
    assert rel_err(out.cpu(), _restricted_reference(q, keys, values, chosen.cpu(), length, page)) < 2e-3
    dense = _restricted_reference(q, keys, values, torch.arange(19).view(1, 1, 19), length, page)
    assert rel_err(out.cpu(), dense) > 1e-2                               # fewer pages than dense: a different answer


def test_unknown_or_impossible_kernels_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="unknown decode kernels 'fast'; known: auto, triton, torch"):
        QueryAwareDecoder(query_aware_decode(), num_heads=2, num_kv_heads=1, kernels="fast")
    decoder = QueryAwareDecoder(query_aware_decode(page_size=8), num_heads=2, num_kv_heads=1, kernels="triton")
    keys = torch.randn(1, 1, 40, 16, dtype=torch.float64)
    decoder.observe_prefill(keys, 0, 39)
    with pytest.raises(RuntimeError, match="kernels='triton'.*float64.*kernels='auto'"):
        decoder(torch.randn(1, 2, 1, 16, dtype=torch.float64), keys, keys, None, None)
    auto = QueryAwareDecoder(query_aware_decode(page_size=8), num_heads=2, num_kv_heads=1)
    assert not auto.uses_triton(torch.randn(1, 2, 1, 16), keys.float(), keys.float()) or HAS_CUDA


def _gpu_mask(kind, batch, length, dtype):
    if kind == "none":
        return None
    keep = torch.ones(batch, 1, 1, length, dtype=torch.bool, device="cuda")
    keep[-1, ..., :100] = False                                            # left padding of the last sequence
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device="cuda").masked_fill(~keep, torch.finfo(dtype).min)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,dim,mask_kind", [(torch.bfloat16, 128, "none"), (torch.float16, 64, "bool"),
                                                 (torch.bfloat16, 64, "additive"), (torch.float32, 64, "none")])
def test_gpu_kernels_equal_the_restricted_reference_and_replay_in_a_cuda_graph(dtype, dim, mask_kind):
    batch, heads, kv_heads, length, page = 8, 32, 8, 16384, 32
    keys, values = _cache(9, batch, kv_heads, length, dim, dtype, device="cuda")
    pattern = query_aware_decode(0.05, page_size=page)
    decoder = QueryAwareDecoder(pattern, num_heads=heads, num_kv_heads=kv_heads)
    assert decoder.uses_triton(keys, keys, values)
    decoder.observe_prefill(keys, 0, length - 1)
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=dtype)
    attention_mask = _gpu_mask(mask_kind, batch, length, dtype)
    end = torch.tensor(length, device="cuda")
    arguments = (q, keys, values, decoder.summaries.minimum, decoder.summaries.maximum, end, attention_mask,
                 dim ** -0.5, page, 1, 2, pattern.selected_pages(length // page))
    out, chosen = torch.ops.sparsify.query_aware_decode_step(*arguments)
    expected = _restricted_reference(q, keys, values, chosen.cpu(), length, page, attention_mask)
    assert rel_err(out.cpu(), expected) < TOLERANCE[dtype]
    if dtype == torch.float32:                                             # the same pages as the torch path
        reference = QueryAwareDecoder(pattern, num_heads=heads, num_kv_heads=kv_heads, kernels="torch")
        reference.observe_prefill(keys, 0, length - 1)
        assert rel_err(decoder(q, keys, values, attention_mask, None),
                       reference(q, keys, values, attention_mask, None)) < 1e-4
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decoder(q, keys, values, attention_mask, None)                     # warm-up: compiled kernels, summaries
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decoder(q, keys, values, attention_mask, None)
    q.copy_(torch.randn_like(q))
    graph.replay()
    assert rel_err(static_out, decoder(q, keys, values, attention_mask, None)) < 1e-3


@pytest.mark.parametrize("pages, selected", [(1, 1), (37, 5), (300, 300), (2048, 210), (5000, 260)])
def test_top_pages_are_torch_topks_pages_with_ties_to_the_lower_page(pages, selected):
    gen = torch.Generator().manual_seed(pages)
    scores = torch.randn(1, 2, pages, generator=gen)
    scores[..., :1] = float("inf")                                        # sinks and window: forced
    scores[..., -2:] = float("inf")
    scores[0, 0, pages // 2:] = float("-inf")                            # past the cache's end
    scores[0, 1] = scores[0, 1].round(decimals=0)                        # many ties, -0.0 among them
    chosen = triton_decode.top_pages(scores.to(DEVICE), selected).cpu()
    assert chosen.shape == (1, 2, selected) and chosen.dtype == torch.int64
    # The reference: sort by (score descending, page ascending), the first `selected`; stored in page order.
    order = sorted(range(pages), key=lambda page: (-scores[0, 1, page].item(), page))[:selected]
    assert chosen[0, 1].tolist() == sorted(order)
    assert chosen[0, 0].tolist() == sorted(chosen[0, 0].tolist())
    for head_scores, head_chosen in zip(scores.flatten(0, 1), chosen.flatten(0, 1)):
        expected = head_scores.topk(selected).values
        assert torch.equal(head_scores[head_chosen].sort(descending=True).values, expected)
        assert len(set(head_chosen.tolist())) == selected


def test_top_pages_refuses_a_count_outside_the_pages():
    with pytest.raises(ValueError, match="selected must lie in"):
        triton_decode.top_pages(torch.zeros(1, 1, 4, device=DEVICE), 5)


def test_an_eager_step_runs_the_kernels_without_the_op_and_gives_the_ops_answer():
    batch, heads, kv_heads, length, dim, page = 1, 4, 2, 200, 32, 16
    keys, values = _cache(9, batch, kv_heads, length, dim, torch.float32)
    pattern = query_aware_decode(0.2, page_size=page, min_pages=1)
    direct, through_op = (QueryAwareDecoder(pattern, num_heads=heads, num_kv_heads=kv_heads, kernels="triton")
                          for _ in range(2))
    for decoder in (direct, through_op):
        decoder.observe_prefill(keys, 0, length - 1)
    q = torch.randn(batch, heads, 1, dim, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    outputs = []
    with torch.no_grad():
        seen = ops_called(lambda: outputs.append(direct(q, keys, values, None, None)))
    out = outputs[0]
    assert "sparsify::query_aware_decode_step" not in seen
    with torch.no_grad():
        expected, _ = torch.ops.sparsify.query_aware_decode_step(
            q, keys, values, through_op.summaries.minimum, through_op.summaries.maximum,
            torch.tensor(length, device=DEVICE), None, dim ** -0.5, page, pattern.sink_pages, pattern.window_pages,
            pattern.selected_pages(math.ceil(length / page)))
    assert torch.equal(out, expected)
    pages = math.ceil(length / page)                     # (slots past the cache's pages hold stale values)
    for summary in ("minimum", "maximum"):                # both re-summarised the new slot's page
        assert torch.equal(getattr(direct.summaries, summary)[:, :, :pages],
                           getattr(through_op.summaries, summary)[:, :, :pages])
    # With something for autograd to record, the step goes through the op (as under torch.compile).
    assert "sparsify::query_aware_decode_step" in ops_called(
        lambda: direct(q.clone().requires_grad_(), keys, values, None, None))
