"""One correctness suite for every backend available here, against one dense float64 reference.

Each registered backend runs on the devices it declares that this process has (the triton
kernel on CPU through Triton's interpreter). Cases: random masks with partial blocks, causal
masks at a query offset, GQA and custom head mappings, q_len != k_len, user masks, masks per
input, softcap and sinks, rows that see no key — in the dtypes each backend serves.
"""

from __future__ import annotations

import pytest
import torch

from sparsify.backends import backend_class, backend_names, get_backend
from sparsify.block_mask import RuntimeBlockMask

from backend_helpers import (HAS_CUDA, load_triton_kernels, mask_reference, random_attn_mask,
                             random_runtime_mask, rel_err)

load_triton_kernels()  # interpreted on CPU without CUDA

_HALF = (torch.float16, torch.bfloat16)


def _targets() -> list[tuple[str, str, torch.dtype]]:
    """(backend, device, dtype) triples this process can run."""
    found = []
    for name in backend_names():
        cls = backend_class(name)
        for device in ("cpu", "cuda"):
            if device == "cuda" and not HAS_CUDA:
                continue
            backend = cls()
            interpreted = name == "triton" and device == "cpu"
            if interpreted:
                if HAS_CUDA or backend.availability() == "triton is not installed":
                    continue
            elif device not in cls.features.devices or backend.availability(device) is not None:
                continue
            dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
            if interpreted:
                dtypes = [torch.float32, torch.float16]    # the interpreter computes bf16 wrongly
            dtypes = [d for d in dtypes if d in cls.features.dtypes]
            found += [(name, device, dtype) for dtype in dtypes]
    return found


TARGETS = _targets()
IDS = [f"{name}-{device}-{str(dtype).replace('torch.', '')}" for name, device, dtype in TARGETS]


@pytest.fixture(params=TARGETS, ids=IDS)
def target(request, monkeypatch):
    name, device, dtype = request.param
    if name == "triton" and device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return get_backend(name), device, dtype


def _tolerance(backend, device: str, dtype: torch.dtype) -> float:
    if dtype in _HALF:
        return 2e-2 if dtype == torch.bfloat16 else 5e-3
    if backend.name == "torch":
        return 1e-6
    return 3e-3  # TF32 on CUDA; the interpreter's float32 dot


def _qkv(gen, batch, heads, kv_heads, q_len, k_len, dim, device, dtype, value_dim=None):
    value_dim = value_dim or dim
    q = torch.randn(batch, heads, q_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, k_len, value_dim, generator=gen)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def _block(backend, device: str, block: int, head_dim: int = 16) -> int:
    """The case's block size on CPU; on a GPU 64 (what the fast kernels are built for, and FA4's smallest)."""
    block = block if device == "cpu" else 64
    problem = backend.block_size_problem(block, head_dim, device)
    if problem is not None:
        pytest.skip(f"{backend.name}: {problem}")
    return block


def _check(backend, device, dtype, q, k, v, mask, **call):
    out = backend.attention(q, k, v, mask.to(device), **call)
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == q.dtype
    assert not out.isnan().any()
    reference = mask_reference(q, k, v, mask, **call)
    assert rel_err(out, reference) <= _tolerance(backend, device, dtype), (
        f"{backend.name}: relative error {rel_err(out, reference):.2e}")
    return out


CASES = [
    # batch, kv_heads, group, q_len, k_len, block, causal, custom head mapping
    (1, 1, 1, 64, 64, 16, False, False),
    (2, 2, 2, 77, 77, 16, True, False),        # partial last blocks, causal diagonal
    (1, 2, 2, 45, 90, 32, False, True),        # q_len != k_len, custom mapping
    (2, 1, 4, 90, 50, 16, True, False),        # q_len > k_len, top-left causal
    (1, 3, 1, 33, 33, 32, True, True),
]


@pytest.mark.parametrize("case", CASES)
def test_random_masks_match_the_reference(target, case):
    backend, device, dtype = target
    batch, kv_heads, group, q_len, k_len, block, causal, custom = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    heads = kv_heads * group
    mapping = torch.randint(0, kv_heads, (heads,), generator=gen) if custom else torch.arange(heads) // group
    mask = random_runtime_mask(gen, heads=heads, q_len=q_len, k_len=k_len, block=_block(backend, device, block),
                               causal=causal, kv_head_index=mapping)
    q, k, v = _qkv(gen, batch, heads, kv_heads, q_len, k_len, 16, device, dtype)
    _check(backend, device, dtype, q, k, v, mask)
    _check(backend, device, dtype, q, k, v, mask, scale=0.3)


@pytest.mark.parametrize("q_len, k_len, q_offset", [(16, 80, 64), (40, 100, 60), (1, 70, 69), (20, 64, 13)])
def test_causal_at_a_query_offset(target, q_len, k_len, q_offset):
    # A query chunk at the end of a longer key sequence (decode, chunked prefill), offsets that are
    # and are not block multiples.
    backend, device, dtype = target
    gen = torch.Generator().manual_seed(q_len * 1000 + k_len)
    mask = random_runtime_mask(gen, heads=4, q_len=q_len, k_len=k_len, block=_block(backend, device, 16),
                               causal=True, kv_head_index=torch.arange(4) // 2, q_offset=q_offset, density=0.6)
    assert mask.q_offset == q_offset
    q, k, v = _qkv(gen, 2, 4, 2, q_len, k_len, 16, device, dtype)
    _check(backend, device, dtype, q, k, v, mask)


def test_dense_mask_at_an_offset_equals_bottom_right_sdpa(target):
    backend, device, dtype = target
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, 1, 2, 2, 24, 96, 16, device, dtype)
    mask = RuntimeBlockMask.dense(2, block_size=_block(backend, device, 16), q_len=24, k_len=96, causal=True,
                                  q_offset=72)
    out = backend.attention(q, k, v, mask.to(device))
    bottom_right = torch.ones(24, 96, dtype=torch.bool, device=device).tril(diagonal=72)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                attn_mask=bottom_right)
    assert rel_err(out, expected) <= _tolerance(backend, device, dtype)


@pytest.mark.parametrize("kind", ["bool", "bool_padding", "bool_expanded", "additive", "additive_2d",
                                  "additive_padding"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter: -inf is meant
def test_user_masks(target, kind, causal):
    backend, device, dtype = target
    gen = torch.Generator().manual_seed(len(kind) + causal)
    batch, heads, kv_heads, q_len, k_len = 2, 4, 2, 45, 60
    mask = random_runtime_mask(gen, heads=heads, q_len=q_len, k_len=k_len, block=_block(backend, device, 16),
                               causal=causal, kv_head_index=torch.arange(heads) // 2, density=0.6)
    q, k, v = _qkv(gen, batch, heads, kv_heads, q_len, k_len, 16, device, dtype)
    attn_mask = random_attn_mask(gen, kind, batch, heads, q_len, k_len)
    if backend.attn_mask_problem(attn_mask) is not None:
        assert backend.features.attn_mask != "any"
        with pytest.raises(Exception, match="attn_mask"):
            backend.attention(q, k, v, mask.to(device), attn_mask=attn_mask.to(device))
        return
    if attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(dtype) if dtype in _HALF else attn_mask
    _check(backend, device, dtype, q, k, v, mask, attn_mask=attn_mask.to(device))


@pytest.mark.parametrize("causal", [False, True])
def test_masks_per_input(target, causal):
    backend, device, dtype = target
    if not backend.features.per_input_masks:
        pytest.skip(f"{backend.name} declares no per-input masks")
    gen = torch.Generator().manual_seed(5 + causal)
    block = _block(backend, device, 16)
    length = 70 if device == "cpu" else 300
    mask = random_runtime_mask(gen, heads=4, q_len=length, k_len=length, block=block, causal=causal,
                               kv_head_index=torch.arange(4) // 2, batch=2)
    assert mask.batch == 2 and mask.per_input
    q, k, v = _qkv(gen, 2, 4, 2, length, length, 16, device, dtype)
    out = _check(backend, device, dtype, q, k, v, mask)
    # The two batch elements really use different masks.
    shared = RuntimeBlockMask.from_block_masks(mask.to_block_masks()[:1], block_size=block, q_len=length, k_len=length,
                                               causal=causal, kv_head_index=mask.kv_head_index)
    assert rel_err(out[1:], mask_reference(q[1:], k[1:], v[1:], shared)) > 1e-3


def test_softcap_and_sinks(target):
    backend, device, dtype = target
    gen = torch.Generator().manual_seed(6)
    mask = random_runtime_mask(gen, heads=4, q_len=50, k_len=50, block=_block(backend, device, 16), causal=True,
                               kv_head_index=torch.arange(4) // 2, density=0.5)
    q, k, v = _qkv(gen, 2, 4, 2, 50, 50, 16, device, dtype)
    q = q * 4  # large scores, so that the softcap bites
    if backend.features.softcap:
        _check(backend, device, dtype, q, k, v, mask, softcap=2.0)
    sinks = torch.randn(4, generator=gen).to(device)
    if backend.features.sinks:
        _check(backend, device, dtype, q, k, v, mask, sinks=sinks)
        if backend.features.softcap:
            _check(backend, device, dtype, q, k, v, mask, softcap=2.0, sinks=sinks)
    else:
        with pytest.raises(Exception, match="sink"):
            backend.attention(q, k, v, mask.to(device), sinks=sinks)


def test_rows_without_visible_keys_are_zero(target):
    # Query block 0 keeps only key block 1, wholly above the causal diagonal: it sees nothing.
    backend, device, dtype = target
    block = _block(backend, device, 16)
    length = 40 * block // 16
    kept = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    kept[0, 0, 0, 1] = True
    kept[0, 0, 1, :2] = True
    kept[0, 0, 2, :] = True
    mask = RuntimeBlockMask.from_block_masks(kept, block_size=block, q_len=length, k_len=length, causal=True)
    q, k, v = _qkv(torch.Generator().manual_seed(4), 1, 1, 1, length, length, 16, device, dtype)
    out = _check(backend, device, dtype, q, k, v, mask)
    assert torch.equal(out[0, 0, :block], torch.zeros_like(out[0, 0, :block]))
    # A user mask that hides every key of some rows: zeros there too.
    if backend.features.attn_mask == "any":
        hidden = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
        hidden[..., 20:30, :] = False
        out = _check(backend, device, dtype, q, k, v, mask, attn_mask=hidden)
        assert torch.equal(out[0, 0, 20:30], torch.zeros_like(out[0, 0, 20:30]))


def test_mismatched_heads_are_refused(target):
    backend, device, dtype = target
    gen = torch.Generator().manual_seed(7)
    mask = random_runtime_mask(gen, heads=2, q_len=32, k_len=32, block=_block(backend, device, 16), causal=False,
                               kv_head_index=torch.tensor([0, 0]))
    q, k, v = _qkv(gen, 1, 3, 1, 32, 32, 16, device, dtype)
    with pytest.raises(Exception, match="heads"):
        backend.attention(q, k, v, mask.to(device))


# ---------------------------------------------------------------- GPU, real sizes
GPU_CASES = [
    # batch, heads, kv_heads, q_len, k_len, dim, block, causal, q_offset
    (2, 8, 2, 2048, 2048, 128, 128, False, 0),
    (1, 8, 8, 1900, 1900, 128, 128, True, 0),
    (2, 4, 1, 1000, 1500, 64, 64, False, 0),
    (1, 16, 4, 3000, 3000, 64, 64, True, 0),
    (1, 8, 2, 1024, 4096, 128, 128, True, 3072),   # prefill chunk at the end of a cache
    (2, 4, 4, 2000, 2000, 128, 128, True, 0),      # partial last block
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_real_sizes(target, case):
    backend, device, dtype = target
    if device != "cuda":
        pytest.skip("GPU sizes")
    batch, heads, kv_heads, q_len, k_len, dim, block, causal, q_offset = case
    problem = backend.block_size_problem(block, dim, device)
    if problem is not None:
        pytest.skip(f"{backend.name}: {problem}")
    gen = torch.Generator().manual_seed(11)
    mask = random_runtime_mask(gen, heads=heads, q_len=q_len, k_len=k_len, block=block, causal=causal,
                               kv_head_index=torch.arange(heads) // (heads // kv_heads), q_offset=q_offset,
                               density=0.3)
    q, k, v = _qkv(gen, batch, heads, kv_heads, q_len, k_len, dim, device, dtype)
    out = backend.attention(q, k, v, mask.to(device))
    assert not out.isnan().any()
    oracle = get_backend("torch").attention(q.float(), k.float(), v.float(), mask.to(device))
    assert rel_err(out, oracle) <= (1e-2 if dtype == torch.bfloat16 else 5e-3)
    padding = torch.ones(batch, 1, 1, k_len, dtype=torch.bool, device=device)
    padding[-1, ..., k_len - 300:] = False
    out = backend.attention(q, k, v, mask.to(device), attn_mask=padding)
    oracle = get_backend("torch").attention(q.float(), k.float(), v.float(), mask.to(device), attn_mask=padding)
    assert rel_err(out, oracle) <= (1e-2 if dtype == torch.bfloat16 else 5e-3)
