"""The `triton` backend against the dense masked reference and the `torch` backend.

Without CUDA the kernel runs on CPU tensors through Triton's interpreter (see
``backend_helpers.load_triton_kernels``). With CUDA the same small cases run compiled, and the
``gpu`` tests add bf16/fp16 at larger shapes. Cases every backend shares live in test_backend_suite.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton): the triton backend cannot run",
                allow_module_level=True)

from backend_helpers import HAS_CUDA, load_triton_kernels, mask_reference, rel_err  # noqa: E402
from sparsify.backends import get_backend  # noqa: E402
from sparsify.backends.triton import TritonBackend  # noqa: E402
from sparsify.errors import UnsupportedError  # noqa: E402
from sparsify.block_mask import RuntimeBlockMask  # noqa: E402
from sparsify.site import AttentionSite  # noqa: E402

triton_kernels = load_triton_kernels()  # interpreted on CPU without CUDA


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def random_tables(gen, heads, kv_heads, q_len, k_len, block, causal, density=0.5, kv_head_index=None):
    q_blocks, k_blocks = -(-q_len // block), -(-k_len // block)
    masks = torch.rand(heads, q_blocks, k_blocks, generator=gen) < density
    first = torch.randint(0, k_blocks, (heads, q_blocks), generator=gen)
    masks.scatter_(-1, first.unsqueeze(-1), True)  # every row keeps a block
    return RuntimeBlockMask.from_block_masks(
        masks, block_size=block, q_len=q_len, k_len=k_len, causal=causal,
        kv_head_index=torch.arange(heads) // (heads // kv_heads) if kv_head_index is None else kv_head_index,
    )


dense_reference = mask_reference


def make_qkv(gen, batch, heads, kv_heads, q_len, k_len, dim, dtype, dim_v=None):
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(batch, heads, q_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, k_len, dim_v, generator=gen)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


TOL = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    q_len=st.integers(1, 90),
    k_len=st.integers(1, 90),
    dim=st.sampled_from([16, 32, 64]),
    block=st.sampled_from([16, 32]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_matches_dense_reference(seed, batch, kv_heads, group, q_len, k_len, dim, block, causal, dtype):
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    tables = random_tables(gen, heads, kv_heads, q_len, k_len, block, causal)
    q, k, v = make_qkv(gen, batch, heads, kv_heads, q_len, k_len, dim, dtype)
    out = get_backend("triton").attention(q, k, v, tables.to(DEVICE))
    assert out.shape == (batch, heads, q_len, dim) and out.dtype == dtype
    assert not out.isnan().any()
    ref = dense_reference(q, k, v, tables)
    if ref.norm() > 0:
        assert rel_err(out, ref) <= TOL[dtype]
    oracle = get_backend("torch").attention(q, k, v, tables.to(DEVICE))
    assert torch.allclose(out.float(), oracle.float(), atol=2e-2, rtol=2e-2)


def _tma_cases():
    if not HAS_CUDA:
        return [False, True]  # the interpreter emulates tensor descriptors
    return [False, True] if torch.cuda.get_device_capability()[0] >= 9 else [False]


@pytest.mark.parametrize("use_tma", _tma_cases())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", [
    triton_kernels.KernelConfig(16, 16, 4, 1),  # query and key tiles split the 32-token block
    triton_kernels.KernelConfig(32, 16, 4, 2),
    triton_kernels.KernelConfig(16, 32, 4, 2),
])
def test_tiles_smaller_than_the_block(config, causal, use_tma):
    gen = torch.Generator().manual_seed(1)
    tables = random_tables(gen, 4, 2, 77, 101, 32, causal)
    q, k, v = make_qkv(gen, 2, 4, 2, 77, 101, 32, torch.float32)
    plan = triton_kernels.plan_launch(tables, torch.device(DEVICE))
    out = triton_kernels.block_sparse_attention(q, k, v, plan, config=config, use_tma=use_tma)
    assert rel_err(out, dense_reference(q, k, v, tables)) <= 2e-3


@pytest.mark.parametrize("dim,dim_v", [(48, 48), (80, 80), (64, 32)])
def test_head_dims_that_need_padding(dim, dim_v):
    gen = torch.Generator().manual_seed(2)
    tables = random_tables(gen, 2, 1, 50, 70, 16, True)
    q, k, v = make_qkv(gen, 1, 2, 1, 50, 70, dim, torch.float32, dim_v)
    out = get_backend("triton").attention(q, k, v, tables.to(DEVICE), scale=0.3)
    assert out.shape[-1] == dim_v
    assert rel_err(out, dense_reference(q, k, v, tables, scale=0.3)) <= 2e-3


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter: -inf is meant
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool_padding", "bool_full", "additive_head", "additive_padding",
                                  "additive_key"])
def test_attn_mask(kind, causal):
    gen = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, q_len, k_len = 2, 4, 2, 45, 60
    tables = random_tables(gen, heads, kv_heads, q_len, k_len, 16, causal, density=0.6)
    q, k, v = make_qkv(gen, batch, heads, kv_heads, q_len, k_len, 32, torch.float32)
    if kind == "bool_padding":  # HF-style [batch, 1, 1, k_len] key padding
        mask = torch.ones(batch, 1, 1, k_len, dtype=torch.bool)
        mask[1, ..., 50:] = False
    elif kind == "bool_full":
        mask = torch.rand(batch, heads, q_len, k_len, generator=gen) < 0.7
    elif kind == "additive_head":
        mask = torch.randn(1, heads, q_len, k_len, generator=gen)
    elif kind == "additive_key":  # one bias per key, shared by all query rows
        mask = torch.randn(batch, 1, 1, k_len, generator=gen)
    else:  # additive padding with the dtype minimum, as HF builds it
        mask = torch.zeros(batch, 1, q_len, k_len)
        mask[0, ..., 40:] = torch.finfo(torch.float32).min
    mask = mask.to(DEVICE)
    out = get_backend("triton").attention(q, k, v, tables.to(DEVICE), attn_mask=mask)
    assert not out.isnan().any()
    assert rel_err(out, dense_reference(q, k, v, tables, attn_mask=mask)) <= 2e-3


def test_rows_without_visible_keys_are_zero():
    # Causal, and query block 0 keeps only key block 1 (wholly above the diagonal).
    masks = torch.zeros(1, 3, 3, dtype=torch.bool)
    masks[0, 0, 1] = True
    masks[0, 1, :2] = True
    masks[0, 2, :] = True
    tables = RuntimeBlockMask.from_block_masks(masks, block_size=16, q_len=40, k_len=40, causal=True,
                                               kv_head_index=torch.tensor([0]))
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(gen, 1, 1, 1, 40, 40, 16, torch.float32)
    out = get_backend("triton").attention(q, k, v, tables.to(DEVICE))
    assert not out.isnan().any()
    assert torch.equal(out[0, 0, :16], torch.zeros_like(out[0, 0, :16]))
    assert rel_err(out, dense_reference(q, k, v, tables)) <= 2e-3


def test_custom_kv_head_index():
    gen = torch.Generator().manual_seed(5)
    tables = random_tables(gen, 3, 3, 33, 33, 16, False, kv_head_index=torch.tensor([2, 0, 2]))
    q, k, v = make_qkv(gen, 1, 3, 3, 33, 33, 16, torch.float32)
    out = get_backend("triton").attention(q, k, v, tables.to(DEVICE))
    assert rel_err(out, dense_reference(q, k, v, tables)) <= 2e-3


def test_work_list_is_heaviest_first_and_takes_the_mask_lists():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :, 0] = True
    masks[1] = True
    tables = RuntimeBlockMask.from_block_masks(masks, block_size=16, q_len=60, k_len=60, causal=True,
                                               kv_head_index=torch.tensor([0, 0]))
    plan = triton_kernels.plan_launch(tables, torch.device("cpu"))
    uses = (plan.full_counts + plan.partial_counts).flatten()
    assert uses[plan.work.long()].tolist() == sorted(uses.tolist(), reverse=True)
    # Head 1 is dense causal: row r visits r + 1 blocks, the r below the diagonal unmasked.
    assert (plan.full_counts + plan.partial_counts)[0, 1].tolist() == [1, 2, 3, 4]
    assert plan.full_counts[0, 1].tolist() == [0, 1, 2, 3]
    # Without causality only the partial last key block (60 = 3 * 16 + 12) needs masking.
    tables = RuntimeBlockMask.from_block_masks(masks, block_size=16, q_len=60, k_len=60, causal=False,
                                               kv_head_index=torch.tensor([0, 0]))
    plan = triton_kernels.plan_launch(tables, torch.device("cpu"))
    assert (plan.full_counts + plan.partial_counts)[0, 1].tolist() == [4, 4, 4, 4]
    assert plan.full_counts[0, 1].tolist() == [3, 3, 3, 3]


def _site(head_dim=64):
    return AttentionSite("blocks.0.attn", 0, num_heads=4, num_kv_heads=2, head_dim=head_dim,
                         q_len=128, k_len=128)


def test_unsupported_reasons(monkeypatch):
    backend = get_backend("triton")
    assert "dtype" in backend.unsupported_reason(_site(), torch.int8, torch.device(DEVICE))
    assert "head dim" in backend.unsupported_reason(_site(512), torch.float16, torch.device(DEVICE))
    if HAS_CUDA:
        assert backend.unsupported_reason(_site(), torch.bfloat16, torch.device("cuda")) is None
    else:  # the CPU interpreter computes bf16 wrongly: refused there
        assert "interpreter" in backend.unsupported_reason(_site(), torch.bfloat16, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in backend.unsupported_reason(_site(), torch.float16, torch.device("cpu"))
    assert backend.is_available() == HAS_CUDA


def test_rejects_mismatched_tables():
    gen = torch.Generator().manual_seed(6)
    tables = random_tables(gen, 2, 1, 32, 32, 16, False)
    q, k, v = make_qkv(gen, 1, 3, 1, 32, 32, 16, torch.float32)
    with pytest.raises(UnsupportedError, match="heads"):
        get_backend("triton").attention(q, k, v, tables.to(DEVICE))


# ---------------------------------------------------------------- GPU, larger shapes
GPU_CASES = [
    # batch, heads, kv_heads, q_len, k_len, dim, block, causal
    (2, 8, 2, 2048, 2048, 128, 128, False),
    (1, 8, 8, 1900, 1900, 128, 128, True),
    (2, 4, 1, 1000, 1500, 64, 64, False),
    (1, 16, 4, 3000, 3000, 64, 64, True),
    (1, 4, 2, 700, 900, 256, 64, True),  # large head dim: small tiles
    (2, 4, 4, 1000, 1000, 80, 128, False),  # padded head dim: pointer loads
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_half_precision(case, dtype, tol):
    batch, heads, kv_heads, q_len, k_len, dim, block, causal = case
    gen = torch.Generator().manual_seed(7)
    tables = random_tables(gen, heads, kv_heads, q_len, k_len, block, causal, density=0.3)
    q, k, v = make_qkv(gen, batch, heads, kv_heads, q_len, k_len, dim, dtype)
    gpu_tables = tables.to(DEVICE)
    out = get_backend("triton").attention(q, k, v, gpu_tables)
    assert not out.isnan().any()
    oracle = get_backend("torch").attention(q.float(), k.float(), v.float(), gpu_tables)
    assert rel_err(out, oracle.double()) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dim,block", [(128, 128), (64, 64), (256, 128)])
def test_gpu_float32_in_tf32(dim, block):
    gen = torch.Generator().manual_seed(9)
    tables = random_tables(gen, 4, 2, 1100, 1100, block, True, density=0.4)
    q, k, v = make_qkv(gen, 2, 4, 2, 1100, 1100, dim, torch.float32)
    out = get_backend("triton").attention(q, k, v, tables.to(DEVICE))
    assert rel_err(out, dense_reference(q, k, v, tables)) <= 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_padding_mask_bf16():
    gen = torch.Generator().manual_seed(8)
    batch, heads, kv_heads, seq = 2, 8, 2, 1500
    tables = random_tables(gen, heads, kv_heads, seq, seq, 128, True, density=0.4)
    q, k, v = make_qkv(gen, batch, heads, kv_heads, seq, seq, 128, torch.bfloat16)
    mask = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 1200:] = False
    out = get_backend("triton").attention(q, k, v, tables.to(DEVICE), attn_mask=mask)
    ref = dense_reference(q, k, v, tables, attn_mask=mask)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dim,dtype", [(128, torch.bfloat16), (80, torch.float16), (64, torch.float32)])
def test_gpu_fast_launch_matches_the_full_path(dim, dtype):
    """Repeat calls take the cached direct launch; results are bitwise those of the full path."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, kv_heads, seq = 2, 4, 2, 1000
    tables = random_tables(gen, heads, kv_heads, seq, seq, 128, True, density=0.4).to(DEVICE)
    backend = get_backend("triton")
    full_path = TritonBackend(fast_launch=False)
    q, k, v = make_qkv(gen, batch, heads, kv_heads, seq, seq, dim, dtype)
    plan = backend.prepare(tables, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=dtype, device=DEVICE)
    for step in range(3):  # new inputs each call: descriptors/pointers must follow them
        q, k, v = make_qkv(gen, batch, heads, kv_heads, seq, seq, dim, dtype)
        for scale in (None, 0.3):
            fast = backend.run(plan, q, k, v, scale=scale)
            full = full_path.run(plan, q, k, v, scale=scale)
            assert torch.equal(fast, full)
    assert len(plan.launch.launches) == 1  # the direct launch lives on the plan
    # A strided view of other inputs (different strides) is a different launch, still right.
    q2 = torch.randn(batch, seq, heads, dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    out = backend.run(plan, q2, k, v)
    ref = dense_reference(q2.float(), k.float(), v.float(), tables)
    assert rel_err(out, ref) <= 2 * TOL[dtype]
    assert len(plan.launch.launches) == 2
