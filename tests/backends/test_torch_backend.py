"""The `torch` backend against dense attention: random runtime masks, user masks, GQA, dtypes, chunking, errors.

(Cases every backend shares live in test_backend_suite.py; these are the torch backend's own.)
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify import patterns
from sparsify.backends import get_backend
from sparsify.backends import torch as torch_backend
from sparsify.backends.torch import TorchBackend, _tiled_mask
from sparsify.errors import UnsupportedError
from sparsify.block_mask import RuntimeBlockMask
from sparsify.site import AttentionSite

from backend_helpers import assert_close, mask_reference

FP32_TOL = 1e-5
LOW_PRECISION_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


reference = mask_reference  # dense float64 attention under the runtime mask and attn_mask


def random_mask(gen, kind, batch, heads, q_len, k_len):
    if kind == "none":
        return None
    if kind == "bool":                                          # full [B, H, Sq, Sk]
        return torch.rand(batch, heads, q_len, k_len, generator=gen) < 0.7
    if kind == "bool_padding":                                  # HF style [B, 1, Sq, Sk]
        return torch.rand(batch, 1, q_len, k_len, generator=gen) < 0.8
    if kind == "bool_expanded":                                 # an expand() view, stride 0
        keep = torch.rand(batch, 1, 1, k_len, generator=gen) < 0.8
        return keep.expand(batch, heads, q_len, k_len)
    if kind == "additive":                                      # [1, H, Sq, Sk] with -inf holes
        bias = torch.randn(1, heads, q_len, k_len, generator=gen)
        return bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.2, float("-inf"))
    if kind == "additive_2d":                                   # [Sq, Sk]
        return torch.randn(q_len, k_len, generator=gen)
    raise ValueError(kind)


MASK_KINDS = ["none", "bool", "bool_padding", "bool_expanded", "additive", "additive_2d"]


def random_tables(gen, *, heads, q_len, k_len, block, causal, kv_head_index, density=0.4):
    """A random runtime mask shared by the batch; every row keeps at least one block."""
    q_blocks, k_blocks = -(-q_len // block), -(-k_len // block)
    masks = torch.rand(heads, q_blocks, k_blocks, generator=gen) < density
    first = torch.randint(0, k_blocks, (heads, q_blocks), generator=gen)
    masks.scatter_(-1, first.unsqueeze(-1), True)               # every row keeps one block
    return RuntimeBlockMask.from_block_masks(masks, block_size=block, q_len=q_len, k_len=k_len,
                                             causal=causal, kv_head_index=kv_head_index)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    block=st.sampled_from([16, 32, 64]),
    q_len=st.integers(1, 200),
    k_len=st.integers(1, 200),
    self_attention=st.booleans(),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    custom_mapping=st.booleans(),
    causal=st.booleans(),
    mask_kind=st.sampled_from(MASK_KINDS),
    batch=st.integers(1, 2),
    head_dim=st.sampled_from([8, 16]),
    value_dim=st.sampled_from([8, 12]),
    density=st.floats(0.05, 1.0),
    small_chunks=st.booleans(),
)
def test_random_tables_match_dense_reference(seed, block, q_len, k_len, self_attention, kv_heads,
                                             group, custom_mapping, causal, mask_kind, batch,
                                             head_dim, value_dim, density, small_chunks):
    gen = torch.Generator().manual_seed(seed)
    if self_attention:
        k_len = q_len
    heads = kv_heads * group
    if custom_mapping:                                          # any head may read any kv head
        kv_head_index = torch.randint(0, kv_heads, (heads,), generator=gen)
    else:
        kv_head_index = torch.arange(heads) // group
    tables = random_tables(gen, heads=heads, q_len=q_len, k_len=k_len, block=block, causal=causal,
                           kv_head_index=kv_head_index, density=density)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, k_len, value_dim, generator=gen)
    mask = random_mask(gen, mask_kind, batch, heads, q_len, k_len)
    backend = TorchBackend(chunk_bytes=1 if small_chunks else None)   # 1 byte: one row per chunk

    output = backend.attention(q, k, v, tables, attn_mask=mask)
    assert output.dtype == q.dtype and output.is_contiguous()
    assert_close(output, reference(q, k, v, tables, mask), FP32_TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool_padding", "additive"])
def test_full_tables_equal_sdpa(causal, mask_kind):
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, length, block = 2, 4, 2, 150, 32
    blocks = -(-length // block)
    tables = RuntimeBlockMask.from_block_masks(torch.ones(heads, blocks, blocks, dtype=torch.bool),
                                          block_size=block, q_len=length, k_len=length,
                                          causal=causal, kv_head_index=torch.arange(heads) // 2)
    q = torch.randn(batch, heads, length, 32, generator=gen)
    k = torch.randn(batch, kv_heads, length, 32, generator=gen)
    v = torch.randn(batch, kv_heads, length, 32, generator=gen)
    mask = random_mask(gen, mask_kind, batch, heads, length, length)
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True                                     # SDPA gives NaN on empty rows
    expected_mask = mask
    if causal and mask is not None:                             # SDPA takes one or the other
        tril = torch.ones(length, length, dtype=torch.bool).tril()
        expected_mask = mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, float("-inf"))
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=expected_mask,
        is_causal=causal and mask is None)
    output = TorchBackend().attention(q, k, v, tables, attn_mask=mask)
    assert_close(output, expected, FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, causal):
    gen = torch.Generator().manual_seed(2)
    tables = random_tables(gen, heads=4, q_len=130, k_len=130, block=32, causal=causal,
                           kv_head_index=torch.tensor([0, 0, 1, 1]))
    q = torch.randn(2, 4, 130, 64, generator=gen).to(dtype)
    k = torch.randn(2, 2, 130, 64, generator=gen).to(dtype)
    v = torch.randn(2, 2, 130, 64, generator=gen).to(dtype)
    mask = random_mask(gen, "bool_padding", 2, 4, 130, 130)
    output = TorchBackend().attention(q, k, v, tables, attn_mask=mask)
    assert output.dtype == dtype
    assert_close(output, reference(q, k, v, tables, mask), LOW_PRECISION_TOL[dtype])


def test_additive_mask_in_low_precision():
    gen = torch.Generator().manual_seed(3)
    tables = random_tables(gen, heads=2, q_len=64, k_len=96, block=16, causal=False,
                           kv_head_index=torch.tensor([0, 1]))
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen).bfloat16() for n in (64, 96, 96))
    mask = torch.randn(1, 1, 64, 96, generator=gen).bfloat16()
    output = TorchBackend().attention(q, k, v, tables, attn_mask=mask)
    assert_close(output, reference(q, k, v, tables, mask), LOW_PRECISION_TOL[torch.bfloat16])


def test_fully_masked_rows_are_zero():
    gen = torch.Generator().manual_seed(4)
    tables = random_tables(gen, heads=2, q_len=100, k_len=80, block=16, causal=False,
                           kv_head_index=torch.tensor([0, 0]))
    q = torch.randn(1, 2, 100, 16, generator=gen)
    k, v = torch.randn(1, 1, 80, 16, generator=gen), torch.randn(1, 1, 80, 16, generator=gen)
    for mask in (torch.ones(1, 2, 100, 80, dtype=torch.bool),
                 torch.zeros(1, 2, 100, 80)):
        if mask.dtype == torch.bool:
            mask[:, :, 10:20] = False
        else:
            mask[:, :, 10:20] = float("-inf")
        output = TorchBackend().attention(q, k, v, tables, attn_mask=mask)
        assert not torch.isnan(output).any()
        assert torch.equal(output[:, :, 10:20], torch.zeros_like(output[:, :, 10:20]))
        assert_close(output, reference(q, k, v, tables, mask), FP32_TOL)


def test_rows_hidden_by_causal_blocks_are_zero():
    # Query block 0 keeps only key block 2: under causal masking it sees nothing.
    masks = torch.tensor([[[False, False, True], [True, True, False], [False, True, True]]])
    tables = RuntimeBlockMask.from_block_masks(masks, block_size=16, q_len=48, k_len=48, causal=True,
                                          kv_head_index=torch.tensor([0]))
    q, k, v = (torch.randn(1, 1, 48, 8) for _ in range(3))
    output = TorchBackend().attention(q, k, v, tables)
    assert torch.equal(output[:, :, :16], torch.zeros(1, 1, 16, 8))
    assert_close(output, reference(q, k, v, tables), FP32_TOL)


def test_mixed_density_heads_and_batch_use_sorted_rows():
    # One dense head among sparse ones: rows are regrouped by width, gathered and scattered back.
    gen = torch.Generator().manual_seed(5)
    heads, length, block = 4, 256, 16
    blocks = length // block
    masks = torch.eye(blocks, dtype=torch.bool).expand(heads, blocks, blocks).clone()
    masks[1] = True
    masks[3, :, :4] = True
    tables = RuntimeBlockMask.from_block_masks(masks, block_size=block, q_len=length, k_len=length,
                                          causal=False, kv_head_index=torch.arange(heads) % 2)
    q = torch.randn(3, heads, length, 16, generator=gen)
    k, v = torch.randn(3, 2, length, 16, generator=gen), torch.randn(3, 2, length, 16, generator=gen)
    for chunk_bytes in (None, 4096):
        output = TorchBackend(chunk_bytes=chunk_bytes).attention(q, k, v, tables)
        assert_close(output, reference(q, k, v, tables), FP32_TOL)


def test_gradients_match_reference():
    gen = torch.Generator().manual_seed(10)
    tables = random_tables(gen, heads=4, q_len=50, k_len=40, block=16, causal=True,
                           kv_head_index=torch.tensor([0, 1, 1, 0]))
    q = torch.randn(2, 4, 50, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = random_mask(gen, "bool_padding", 2, 4, 50, 40)
    mask[:, :, 3] = False                                       # a row with no visible key
    grads = []
    for attend in (TorchBackend().attention, reference):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        weights = torch.linspace(-1, 1, 8, dtype=torch.float64)      # a non-trivial upstream grad
        (attend(*inputs, tables, attn_mask=mask) * weights).sum().backward()
        grads.append([t.grad for t in inputs])
    for ours, expected in zip(*grads):
        assert_close(ours, expected, FP32_TOL)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("length", [512, 500, 300])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window(batch, length, causal):
    # Banded tables: chunks with one shared diagonal slot, padding slots at the sequence edges,
    # a partial last key block; k and v are slices at a storage offset.
    gen = torch.Generator().manual_seed(9)
    block = 32
    blocks = -(-length // block)
    i, j = torch.arange(blocks).view(-1, 1), torch.arange(blocks).view(1, -1)
    band = ((j >= i - 2) & (j <= i + 1)).expand(4, blocks, blocks)
    tables = RuntimeBlockMask.from_block_masks(band.contiguous(), block_size=block, q_len=length,
                                          k_len=length, causal=causal,
                                          kv_head_index=torch.tensor([1, 1, 0, 0]))
    q = torch.randn(batch, 4, length, 16, generator=gen)
    kv = torch.randn(2, batch, 2, length, 16, generator=gen)
    k, v = kv[0], kv[1]
    mask = random_mask(gen, "bool_padding", batch, 4, length, length)
    for chunk_bytes in (None, 64 << 10, 1):
        backend = TorchBackend(chunk_bytes=chunk_bytes)
        assert_close(backend.attention(q, k, v, tables), reference(q, k, v, tables), FP32_TOL)
        assert_close(backend.attention(q, k, v, tables, attn_mask=mask),
                     reference(q, k, v, tables, mask), FP32_TOL)


def test_non_contiguous_inputs_and_custom_scale():
    gen = torch.Generator().manual_seed(6)
    tables = random_tables(gen, heads=4, q_len=70, k_len=70, block=16, causal=True,
                           kv_head_index=torch.tensor([0, 1, 0, 1]))
    # [B, S, H, D] transposed to [B, H, S, D], as HF attention modules do.
    q = torch.randn(2, 70, 4, 16, generator=gen).transpose(1, 2)
    k = torch.randn(2, 70, 2, 16, generator=gen).transpose(1, 2)
    v = torch.randn(2, 70, 2, 16, generator=gen).transpose(1, 2)
    output = TorchBackend().attention(q, k, v, tables, scale=0.3)
    assert_close(output, reference(q, k, v, tables, scale=0.3), FP32_TOL)


def test_a_plan_is_reused_and_a_new_mask_gets_its_own():
    gen = torch.Generator().manual_seed(7)
    tables = random_tables(gen, heads=2, q_len=64, k_len=64, block=16, causal=False,
                           kv_head_index=torch.tensor([0, 0]))
    q, k, v = (torch.randn(1, n, 64, 8, generator=gen) for n in (2, 1, 1))
    backend = TorchBackend()
    plan = backend.prepare(tables, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=q.dtype, device="cpu")
    first = backend.run(plan, q, k, v)
    assert torch.equal(first, backend.run(plan, q, k, v))
    other = random_tables(gen, heads=2, q_len=64, k_len=64, block=16, causal=True,
                          kv_head_index=torch.tensor([0, 0]), density=0.2)
    assert_close(backend.attention(q, k, v, other), reference(q, k, v, other), FP32_TOL)
    with pytest.raises(UnsupportedError, match="prepared for q"):
        backend.run(plan, q[:, :, :32], k, v)                   # a plan serves one call shape


def _poison_allocator() -> None:
    """Leave freed CPU blocks of many sizes full of NaN and 1e9, so that an output element the
    backend never writes (an ``empty`` buffer, a padded tail, a stale plan) shows up as garbage."""
    for fill in (float("nan"), 1e9):
        held = [torch.full((n,), fill, dtype=dtype) for n in (8, 64, 500, 4000, 16000, 60000)
                for dtype in (torch.float32, torch.bfloat16) for _ in range(2)]
        del held


@pytest.fixture
def unwritten_is_nan(monkeypatch):
    """``torch.empty`` (and ``new_empty``) hand out NaN-filled floating tensors for the test."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: fill(real_new_empty(self, *a, **kw)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                                    # intra-op parallel kernels
    yield
    torch.set_num_threads(threads)


def test_every_output_element_is_written(unwritten_is_nan):
    # Many random configurations through ONE backend (its plan cache sees tables die and new
    # ones take their addresses), with poisoned memory: low precision, padding masks hiding the
    # last keys of one batch item, partial last blocks, q_len != k_len, causal, tiny chunks.
    backend, tiny_chunks = TorchBackend(), TorchBackend(chunk_bytes=1)
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        pick = lambda n: int(torch.randint(0, n, (1,), generator=gen))   # noqa: E731
        block = (16, 32)[pick(2)]
        q_len = 1 + pick(150)
        k_len = q_len if pick(2) else 1 + pick(150)
        kv_heads, group, batch = 1 + pick(2), 1 + pick(2), 1 + pick(3)
        heads = kv_heads * group
        dtype = (torch.float32, torch.bfloat16, torch.float16)[pick(3)]
        tables = random_tables(gen, heads=heads, q_len=q_len, k_len=k_len, block=block,
                               causal=bool(pick(2)), kv_head_index=torch.arange(heads) // group,
                               density=0.1 + 0.9 * float(torch.rand(1, generator=gen)))
        q = torch.randn(batch, heads, q_len, 16, generator=gen).to(dtype)
        k = torch.randn(batch, kv_heads, k_len, 16, generator=gen).to(dtype)
        v = torch.randn(batch, kv_heads, k_len, 8, generator=gen).to(dtype)
        if pick(2):
            mask = torch.ones(batch, 1, 1, k_len, dtype=torch.bool)
            mask[-1, ..., max(0, k_len - 9):] = False           # HF padding of the last item
        else:
            mask = random_mask(gen, MASK_KINDS[pick(len(MASK_KINDS))], batch, heads, q_len, k_len)
        for attend in (backend, tiny_chunks, backend):          # the last call hits the cache
            _poison_allocator()
            output = attend.attention(q, k, v, tables, attn_mask=mask)
            tol = FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL[dtype]
            assert_close(output, reference(q, k, v, tables, mask), tol)
        del tables
        gc.collect()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewrite_mixed_heads_case_with_poisoned_memory(dtype, unwritten_is_nan):
    # The sparse heads of tests/passes/test_rewrite.py::test_sparse_attention_module_mixed_heads
    # (4 kv heads, non-causal), whose last rows of batch item 1 once held garbage.
    head_patterns = [patterns.sliding_window(20), patterns.attention_sinks(16) | patterns.sliding_window(8),
                     patterns.sliding_window(50)]
    backend = TorchBackend()
    for repeat in range(3):
        for q_len in (100, 77, 160):
            blocks = -(-q_len // 16)
            masks = torch.stack([p.block_mask(blocks, blocks, block_size=16, causal=False, q_len=q_len,
                                              k_len=q_len) for p in head_patterns])
            tables = RuntimeBlockMask.from_block_masks(masks, block_size=16, q_len=q_len, k_len=q_len, causal=False,
                                                  kv_head_index=torch.tensor([1, 2, 3]))
            q = torch.randn(2, 3, q_len, 16, dtype=dtype)
            k, v = (torch.randn(2, 4, q_len, 16, dtype=dtype) for _ in range(2))
            padding = torch.ones(2, 1, 1, q_len, dtype=torch.bool)
            padding[1, ..., q_len - 9:] = False
            _poison_allocator()
            output = backend.attention(q, k, v, tables, attn_mask=padding)
            tol = FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL[dtype]
            assert_close(output, reference(q, k, v, tables, padding), tol)
            del tables
            gc.collect()


def test_backend_holds_no_plans_and_copies_cleanly():
    # Plans are explicit objects (the runtime module that owns a site caches them), never state
    # of the backend or of its module.
    assert not hasattr(torch_backend, "_plan_cache")
    q, k, v, tables = _inputs()
    backend = TorchBackend(chunk_bytes=4096)
    backend.attention(q, k, v, tables)
    assert vars(backend) == {"chunk_bytes": 4096}
    for clone in (copy.deepcopy(backend), pickle.loads(pickle.dumps(backend))):
        assert clone.chunk_bytes == 4096
        assert_close(clone.attention(q, k, v, tables), reference(q, k, v, tables), FP32_TOL)


def test_expanded_mask_is_not_materialised():
    keep = torch.ones(2, 1, 1, 4096, dtype=torch.bool)
    expanded = keep.expand(2, 16, 4096, 4096)                  # 512M elements if copied
    geometry = types.SimpleNamespace(block=64, q_blocks=64, k_blocks=64)
    tiles = _tiled_mask(expanded, geometry)
    assert tiles.shape == (2, 1, 1, 1, 64, 64) and tiles.data_ptr() == keep.data_ptr()


def test_registry_and_support():
    backend = get_backend("torch")
    assert isinstance(backend, TorchBackend) and backend.is_available()
    site = AttentionSite("blocks.0.attn", 0, num_heads=8, num_kv_heads=2, head_dim=64, q_len=128, k_len=128)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert backend.supports(site, dtype, torch.device("cpu"))
    reason = backend.unsupported_reason(site, torch.int32, torch.device("cpu"))
    assert reason is not None and "int32" in reason


def _inputs(heads=2, kv_heads=1, q_len=64, k_len=64, dim=16, value_dim=16, kv_head_index=None):
    full = torch.ones(heads, -(-q_len // 16), -(-k_len // 16), dtype=torch.bool)
    if kv_head_index is None:
        kv_head_index = torch.zeros(heads, dtype=torch.long)
    tables = RuntimeBlockMask.from_block_masks(full, block_size=16, q_len=q_len, k_len=k_len, causal=False,
                                               kv_head_index=kv_head_index)
    q = torch.randn(1, heads, q_len, dim)
    k, v = torch.randn(1, kv_heads, k_len, dim), torch.randn(1, kv_heads, k_len, value_dim)
    return q, k, v, tables


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v, t: (q[:, :1], k, v, t, None), "q has 1 heads but the mask describes 2"),
    (lambda q, k, v, t: (q[:, :, :40], k, v, t, None), "q has 40 positions"),
    (lambda q, k, v, t: (q, k[:, :, :40], v[:, :, :40], t, None), "k has 40 positions"),
    (lambda q, k, v, t: (q, k, v[:, :, :40], t, None), "k \\(1, 1, 64, 16\\) and v \\(1, 1, 40, 16\\) must share heads and positions"),
    (lambda q, k, v, t: (q, k[..., :8], v, t, None), r"head_dim of q \(16\) and k \(8\) differ"),
    (lambda q, k, v, t: (q, torch.cat([k, k]), v, t, None), "batch sizes differ"),
    (lambda q, k, v, t: (q.int(), k.int(), v.int(), t, None), "dtype torch.int32 is not supported"),
    (lambda q, k, v, t: (q, k.double(), v, t, None), "must share one dtype"),
    (lambda q, k, v, t: (q[0], k, v, t, None), "q must be a 4-D tensor"),
    (lambda q, k, v, t: (q, k, v, t, torch.ones(1, 3, 64, 64, dtype=torch.bool)), "does not broadcast"),
    (lambda q, k, v, t: (q, k, v, t, torch.ones(64, 64, dtype=torch.int64)), "attn_mask must be bool"),
])
def test_bad_inputs_raise_unsupported(change, message):
    q, k, v, tables, mask = change(*_inputs())
    with pytest.raises(UnsupportedError, match=message):
        TorchBackend().attention(q, k, v, tables, attn_mask=mask)


def test_bad_masks_raise():
    q, k, v, tables = _inputs(kv_head_index=torch.tensor([0, 1]))
    with pytest.raises(UnsupportedError, match="kv_head_index .* outside the 1 key/value heads"):
        TorchBackend().attention(q, k, v, tables)
    q, k, v, tables = _inputs()
    with pytest.raises(ValueError, match="kv_indices must be"):
        dataclasses.replace(tables, kv_indices=tables.kv_indices[:, :, :2])
    q, k, v, tables = _inputs()
    tables.full_kv_indices[0, 0, 0, 0] = 9
    with pytest.raises(UnsupportedError, match="point outside the 4 key blocks"):
        TorchBackend().attention(q, k, v, tables)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(8)
    tables = random_tables(gen, heads=8, q_len=1000, k_len=1000, block=64, causal=True,
                           kv_head_index=torch.arange(8) // 4, density=0.3)
    q = torch.randn(2, 8, 1000, 64, generator=gen).to(dtype)
    k = torch.randn(2, 2, 1000, 64, generator=gen).to(dtype)
    v = torch.randn(2, 2, 1000, 64, generator=gen).to(dtype)
    mask = random_mask(gen, "bool_expanded", 2, 8, 1000, 1000)
    expected = reference(q, k, v, tables, mask)
    cuda = torch.device("cuda")
    output = TorchBackend().attention(q.to(cuda), k.to(cuda), v.to(cuda), tables.to(cuda),
                                      attn_mask=mask.to(cuda))
    assert output.device.type == "cuda" and output.dtype == dtype
    assert_close(output.cpu(), expected, FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL[dtype])
