"""`SparseAttention`, the module that owns a site at run time: masks and plans cached and bounded, query offsets,
backend resolution and its errors, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsify import patterns
from sparsify.backends import BackendUnavailableError
from sparsify.errors import UnsupportedError
from sparsify.runtime import sparse_attention as sparse_attention_module
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite

from backend_helpers import mask_reference, ops_called, rel_err


def _layer(causal=True, heads=4, kv_heads=2, backend="auto", length=128):
    site = AttentionSite("blocks.0.attn", 0, num_heads=heads, num_kv_heads=kv_heads, head_dim=16, q_len=length,
                         k_len=length, causal=causal)
    head_patterns = [patterns.dense(), patterns.sliding_window(24), patterns.skip(),
                     patterns.attention_sinks(16) | patterns.sliding_window(16)][:heads]
    return SparseAttention(site, head_patterns, block_size=16, backend=backend)


def test_masks_are_cached_per_length_and_bounded():
    layer = _layer()
    assert len(layer._masks) == 1                     # the captured length, built (and checked) at construction
    first = layer.runtime_mask(128, 128, "cpu")
    assert layer.runtime_mask(128, 128, "cpu") is first
    for length in range(144, 144 + 16 * (sparse_attention_module.MASK_CACHE_SIZE + 4), 16):
        layer.runtime_mask(length, length, "cpu")
    assert len(layer._masks) == sparse_attention_module.MASK_CACHE_SIZE
    assert (128, 128, 0, "cpu") not in layer._masks     # the least recently used length went first


def test_plans_are_cached_per_call_shape_and_bounded():
    layer = _layer()
    q = torch.randn(1, 4, 64, 16)
    kv = torch.randn(1, 2, 64, 16)
    with torch.no_grad():
        layer(q, kv, kv, None, True, None)
        layer(q, kv, kv, None, True, None)
        assert len(layer._plans) == 1
        for batch in range(2, sparse_attention_module.PLAN_CACHE_SIZE + 5):
            layer(q.expand(batch, -1, -1, -1), kv.expand(batch, -1, -1, -1), kv.expand(batch, -1, -1, -1),
                  None, True, None)
    assert len(layer._plans) == sparse_attention_module.PLAN_CACHE_SIZE


def test_query_chunks_at_an_offset_equal_the_rows_of_the_full_call():
    # Prefill in one call, then the last rows again as a chunk against all keys (bottom-right causal):
    # at block-aligned chunk starts (and for a single decode row) the chunk's output equals the full
    # call's last rows, for dense, sparse and skipped heads.
    layer = _layer()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 160, 16, generator=gen)
    k, v = torch.randn(2, 2, 160, 16, generator=gen), torch.randn(2, 2, 160, 16, generator=gen)
    with torch.no_grad():
        full = layer.attend(q, k, v, is_causal=True)
        for chunk in (1, 7, 16, 48):
            part = layer.attend(q[:, :, -chunk:], k, v, is_causal=True, q_offset=160 - chunk)
            assert rel_err(part, full[:, :, -chunk:]) < 1e-6
        # A chunk that starts inside a block: each of its query blocks keeps the union of the full-length
        # rows it overlaps (never less than the full call kept), and computes exactly that.
        part = layer.attend(q[:, :, -40:], k, v, is_causal=True, q_offset=120)
    chunk_mask = layer.runtime_mask(40, 160, "cpu", q_offset=120)
    full_mask = layer.runtime_mask(160, 160, "cpu")
    for row, (first, last) in enumerate([(7, 8), (8, 9), (9, 9)]):
        rows = full_mask.to_block_masks()[0, :, first:last + 1].any(1)
        assert torch.equal(chunk_mask.to_block_masks()[0, :, row], rows)
    expected = mask_reference(q[:, :, -40:].index_select(1, layer.sparse_heads), k, v, chunk_mask)
    assert rel_err(part.index_select(1, layer.sparse_heads), expected) < 1e-6


def test_output_matches_the_reference_per_head():
    layer = _layer(causal=False)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 100, 16, generator=gen)
    k, v = torch.randn(2, 2, 100, 16, generator=gen), torch.randn(2, 2, 100, 16, generator=gen)
    with torch.no_grad():
        out = layer(q, k, v, None, False, None)
    sparse = layer.runtime_mask(100, 100, "cpu")
    expected = mask_reference(q.index_select(1, layer.sparse_heads), k, v, sparse)
    assert rel_err(out.index_select(1, layer.sparse_heads), expected) < 1e-6
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))                  # the skipped head


@pytest.mark.parametrize("causal, q_offset", [(True, 0), (False, 0), (True, 37)])
def test_dense_heads_the_backend_runs_join_the_sparse_heads_in_one_launch(causal, q_offset):
    # When the cost model says the backend runs dense heads faster than SDPA, a site of dense and sparse heads
    # makes one kernel call over every head (sparse heads their masks, dense heads every block): the same
    # output as the two groups apart, with no head gather or scatter.
    site = AttentionSite("blocks.0.attn", 0, num_heads=4, num_kv_heads=2, head_dim=16, q_len=96, k_len=96,
                         causal=causal)
    head_patterns = [patterns.dense(), patterns.sliding_window(24), patterns.dense(),
                     patterns.attention_sinks(16) | patterns.sliding_window(16)]
    merged = SparseAttention(site, head_patterns, block_size=16, backend="torch")
    apart = SparseAttention(site, head_patterns, block_size=16, backend="torch")
    merged._dense_pays = lambda backend, device: True           # what a GPU backend's cost constants would say
    assert merged.dense_and_sparse_only and not merged.one_group
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 96 - q_offset, 16, generator=gen)
    k, v = torch.randn(2, 2, 96, 16, generator=gen), torch.randn(2, 2, 96, 16, generator=gen)
    calls = []
    kernel = merged._kernel
    merged._kernel = lambda slot, *rest: calls.append(slot) or kernel(slot, *rest)
    with torch.no_grad():
        got = merged.attend(q, k, v, is_causal=causal, q_offset=q_offset)
        expected = apart.attend(q, k, v, is_causal=causal, q_offset=q_offset)
    assert calls == ["every"]                                   # one launch
    assert rel_err(got, expected) < 1e-6
    compiled = torch.compile(lambda q, k, v: merged.attend(q, k, v, is_causal=causal, q_offset=q_offset),
                             backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(q, k, v), expected) < 1e-6      # the same path traces without a break
    every = merged._masks[("every", 96 - q_offset, 96, q_offset, "cpu")]
    assert every.num_heads == 4 and every.to_block_masks()[0, 0].sum() >= every.to_block_masks()[0, 1].sum()


def test_gradients_flow_through_sparse_heads_on_the_torch_backend():
    layer = _layer(causal=True, backend="torch")
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(1, 4, 64, 16, generator=gen, dtype=torch.float64),
              torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64),
              torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64)]
    q, k, v = (t.clone().requires_grad_() for t in inputs)
    layer(q, k, v, None, True, None).pow(2).sum().backward()
    # Reference: sparse heads through the dense masked reference, dense head through SDPA.
    rq, rk, rv = (t.clone().requires_grad_() for t in inputs)
    sparse = layer.runtime_mask(64, 64, "cpu")
    out = mask_reference(rq.index_select(1, layer.sparse_heads), rk, rv, sparse).pow(2).sum()
    dense = torch.nn.functional.scaled_dot_product_attention(rq[:, :1], rk[:, :1], rv[:, :1], is_causal=True)
    (out + dense.pow(2).sum()).backward()
    for ours, expected in ((q.grad, rq.grad), (k.grad, rk.grad), (v.grad, rv.grad)):
        assert rel_err(ours, expected) < 1e-9


def test_a_backend_without_gradients_trains_by_recomputing_with_the_torch_backend():
    # The triton kernel computes no gradients (on CPU it runs in Triton's interpreter): the kernel op's
    # backward recomputes the sparse heads with the torch backend, eagerly as under torch.compile.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = _layer(causal=True, backend="triton").to(device)
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, 4, 64, 16, generator=gen).to(device), torch.randn(1, 2, 64, 16, generator=gen).to(device),
              torch.randn(1, 2, 64, 16, generator=gen).to(device)]
    q, k, v = (t.clone().requires_grad_() for t in inputs)
    output = layer(q, k, v, None, True, None)
    output.pow(2).sum().backward()
    rq, rk, rv = (t.clone().requires_grad_() for t in inputs)
    sparse = layer.runtime_mask(64, 64, device)
    reference = torch.zeros_like(output)
    reference[:, layer.sparse_heads] = mask_reference(rq.index_select(1, layer.sparse_heads), rk, rv, sparse).float()
    reference[:, :1] = torch.nn.functional.scaled_dot_product_attention(rq[:, :1], rk[:, :1], rv[:, :1], is_causal=True)
    reference.pow(2).sum().backward()
    assert rel_err(output.detach(), reference.detach()) < 3e-3       # the forward ran on the triton kernel
    assert {key[1] for key in layer._plans} == {"triton"}
    for ours, expected in ((q.grad, rq.grad), (k.grad, rk.grad), (v.grad, rv.grad)):
        assert rel_err(ours, expected) < 3e-3


@pytest.mark.parametrize("needs_gradients", [False, True])
def test_eager_calls_skip_the_kernel_op_only_when_autograd_records_nothing(needs_gradients):
    layer = _layer(causal=True, backend="torch")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, heads, 64, 16, generator=gen, dtype=torch.float64) for heads in (4, 2, 2))
    q.requires_grad_(needs_gradients)
    outputs = []
    seen = ops_called(lambda: outputs.append(layer(q, k, v, None, True, None)))
    output = outputs[0]
    assert ("sparsify::block_sparse_attention" in seen) == needs_gradients
    with FlopCounterMode(display=False):                     # a dispatch mode watching: the op stays
        assert "sparsify::block_sparse_attention" in ops_called(lambda: layer(q.detach(), k, v, None, True, None))
    sparse = layer.runtime_mask(64, 64, "cpu")
    expected = mask_reference(q.detach().index_select(1, layer.sparse_heads), k, v, sparse)
    assert rel_err(output.detach().index_select(1, layer.sparse_heads), expected) < 1e-12


def test_unavailable_backend_names_what_is_missing():
    layer = _layer(backend="flex")
    q = torch.randn(1, 4, 64, 16)
    kv = torch.randn(1, 2, 64, 16)
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="backend 'flex' is not available: .*CUDA"):
        layer(q, kv, kv, None, True, None)


def test_copies_start_with_empty_caches():
    layer = _layer()
    q = torch.randn(1, 4, 64, 16)
    kv = torch.randn(1, 2, 64, 16)
    with torch.no_grad():
        expected = layer(q, kv, kv, None, True, None)
        clone = copy.deepcopy(layer)
        assert len(clone._plans) == 0 and len(clone._masks) == 0 and len(layer._plans) == 1
        assert clone._site_handle != layer._site_handle           # the kernel op reaches the copy's own plans
        assert torch.equal(clone(q, kv, kv, None, True, None), expected)
        assert len(clone._plans) == 1 and len(layer._plans) == 1


def test_the_kernel_op_of_a_site_that_is_gone_says_so():
    import gc

    layer = _layer()
    mask = layer.runtime_mask(128, 128, "cpu")
    handle = layer._site_handle
    q = torch.randn(1, 2, 128, 16)
    arguments = (q, q, q, None, mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
                 mask.kv_head_index, 16, 128, 128, True, 0, False, None, None, None, "torch", handle, "sparse")
    assert rel_err(torch.ops.sparsify.block_sparse_attention(*arguments), mask_reference(q, q, q, mask)) < 1e-6
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match=f"site handle {handle} no longer exists"):
        torch.ops.sparsify.block_sparse_attention(*arguments)


def test_wrong_head_count_is_refused():
    layer = _layer()
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(UnsupportedError, match="compiled for 4 query / 2 key-value heads"):
        layer(q, q, q, None, False, None)


def test_auto_passes_over_a_backend_that_cannot_take_the_block_size_and_says_so_once(monkeypatch, caplog):
    # What auto does when FA4's tile constraints (sm90) rule it out for a site: the next backend serves
    # the site, and the log says so once, naming the site and the reason.
    from sparsify.backends import base
    from sparsify.backends.torch import TorchBackend

    class TileBound(TorchBackend):
        name = "tile_bound"
        auto_priority = 1

        def block_size_problem(self, block_size, head_dim, device):
            return f"its key tile is 128 keys, not {block_size}"

    monkeypatch.setattr(base, "auto_candidates", lambda device: [TileBound(), TorchBackend()])
    layer = _layer(causal=False)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 64, 16, generator=gen)
    k, v = torch.randn(1, 2, 64, 16, generator=gen), torch.randn(1, 2, 64, 16, generator=gen)
    with torch.no_grad(), caplog.at_level("INFO", logger="sparsify.runtime.sparse_attention"):
        output = layer(q, k, v, None, False, None)
        layer(q, k, v, None, False, None)
    notes = [record.getMessage() for record in caplog.records if "tile_bound" in record.getMessage()]
    assert len(notes) == 1
    assert "blocks.0.attn" in notes[0] and "not 16" in notes[0] and "torch serves it" in notes[0]
    assert {key[1] for key in layer._plans} == {"torch"}
    expected = mask_reference(q.index_select(1, layer.sparse_heads), k, v, layer.runtime_mask(64, 64, "cpu"))
    assert rel_err(output.index_select(1, layer.sparse_heads), expected) < 1e-6
