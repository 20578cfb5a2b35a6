"""The `flex` backend (FlexAttention) against the dense masked reference: its mods on CPU, its kernel on the GPU."""

from __future__ import annotations


import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import sparsify.backends.flex  # noqa: F401  (registers "flex")
from sparsify.backends import get_backend
from sparsify.backends.flex import build_plan, flex_arguments
from sparsify.block_mask import RuntimeBlockMask
from sparsify.site import AttentionSite
from backend_helpers import mask_reference, random_attn_mask, random_runtime_mask, rel_err

HAS_CUDA = torch.cuda.is_available()
UNFUSED = "ignore:flex_attention called without torch.compile:UserWarning"


@pytest.mark.filterwarnings(UNFUSED)
@pytest.mark.parametrize("kind", ["none", "bool_padding", "bool", "additive"])
@pytest.mark.parametrize("causal, q_len, k_len, q_offset", [(False, 70, 70, 0), (True, 48, 80, 32)])
def test_the_mask_mod_alone_gives_the_block_sparse_answer(causal, q_len, k_len, q_offset, kind):
    # FlexAttention's unfused path (eager flex_attention, which a compiled callable that fell back to
    # eager would run) applies only the mask_mod, to every element, and ignores the block lists: the
    # plan's mask_mod must then still give the block-sparse answer, also for non-causal masks.
    gen = torch.Generator().manual_seed(len(kind) + causal)
    mask = random_runtime_mask(gen, heads=4, q_len=q_len, k_len=k_len, block=16, causal=causal,
                               kv_head_index=torch.arange(4) // 2, q_offset=q_offset)
    q = torch.randn(2, 4, q_len, 16, generator=gen)
    k, v = torch.randn(2, 2, k_len, 16, generator=gen), torch.randn(2, 2, k_len, 16, generator=gen)
    attn_mask = random_attn_mask(gen, kind, 2, 4, q_len, k_len)
    plan = build_plan(mask, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=q.dtype, device="cpu")
    arguments = flex_arguments(plan, q, k, v, attn_mask=attn_mask)
    del arguments["kernel_options"]                      # tiles of the fused kernel
    output = flex_attention(arguments.pop("q"), arguments.pop("k"), arguments.pop("v"), **arguments)
    assert rel_err(output, mask_reference(q, k, v, mask, attn_mask=attn_mask)) < 1e-5


def random_tables(gen, heads, kv_heads, q_len, k_len, block, causal, density=0.4, kv_head_index=None):
    q_blocks, k_blocks = -(-q_len // block), -(-k_len // block)
    masks = torch.rand(heads, q_blocks, k_blocks, generator=gen) < density
    first = torch.randint(0, k_blocks, (heads, q_blocks), generator=gen)
    masks.scatter_(-1, first.unsqueeze(-1), True)
    return RuntimeBlockMask.from_block_masks(
        masks, block_size=block, q_len=q_len, k_len=k_len, causal=causal,
        kv_head_index=torch.arange(heads) // (heads // kv_heads) if kv_head_index is None else kv_head_index,
    )


dense_reference = mask_reference


def _last_rows(mask: RuntimeBlockMask, rows: int) -> RuntimeBlockMask:
    """The mask of the last ``rows`` queries of ``mask`` (a whole number of blocks), as a query chunk at its offset."""
    kept = mask.to_block_masks()[0, :, -(rows // mask.block_size):].cpu()
    return RuntimeBlockMask.from_block_masks(kept, block_size=mask.block_size, q_len=rows, k_len=mask.k_len,
                                             causal=mask.causal, kv_head_index=mask.kv_head_index.cpu(),
                                             q_offset=mask.q_len - rows)


def make_qkv(gen, batch, heads, kv_heads, q_len, k_len, dim, dtype):
    shapes = [(batch, heads, q_len, dim), (batch, kv_heads, k_len, dim), (batch, kv_heads, k_len, dim)]
    return tuple(torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes)


def test_unsupported_on_cpu():
    site = AttentionSite("a", 0, num_heads=4, num_kv_heads=4, head_dim=64, q_len=128, k_len=128)
    reason = get_backend("flex").unsupported_reason(site, torch.float16, torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    assert get_backend("flex").is_available() == HAS_CUDA


CASES = [
    # batch, heads, kv_heads, q_len, k_len, dim, block, causal
    (2, 8, 2, 2048, 2048, 128, 128, False),
    (1, 8, 8, 1900, 1900, 128, 128, True),
    (2, 4, 1, 1000, 1500, 64, 64, False),
    (1, 8, 4, 1000, 1000, 64, 64, True),
]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_matches_dense_reference(case, dtype, tol):
    batch, heads, kv_heads, q_len, k_len, dim, block, causal = case
    gen = torch.Generator().manual_seed(0)
    tables = random_tables(gen, heads, kv_heads, q_len, k_len, block, causal)
    q, k, v = make_qkv(gen, batch, heads, kv_heads, q_len, k_len, dim, dtype)
    out = get_backend("flex").attention(q, k, v, tables.to("cuda"))
    assert not out.isnan().any()
    assert rel_err(out, dense_reference(q, k, v, tables)) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_custom_head_mapping_and_masks():
    gen = torch.Generator().manual_seed(1)
    tables = random_tables(gen, 3, 3, 700, 700, 128, True, kv_head_index=torch.tensor([2, 0, 2]))
    q, k, v = make_qkv(gen, 2, 3, 3, 700, 700, 64, torch.bfloat16)
    backend = get_backend("flex")
    out = backend.attention(q, k, v, tables.to("cuda"))
    assert rel_err(out, dense_reference(q, k, v, tables)) <= 1e-2
    padding = torch.ones(2, 1, 1, 700, dtype=torch.bool, device="cuda")
    padding[1, ..., 600:] = False
    out = backend.attention(q, k, v, tables.to("cuda"), attn_mask=padding)
    assert rel_err(out, dense_reference(q, k, v, tables, attn_mask=padding)) <= 1e-2
    bias = torch.randn(1, 3, 700, 700, generator=gen).to("cuda")
    out = backend.attention(q, k, v, tables.to("cuda"), attn_mask=bias)
    assert rel_err(out, dense_reference(q, k, v, tables, attn_mask=bias)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_many_call_shapes_through_one_instance_never_fall_back():
    # More call classes and lengths than dynamo's default recompile limit (8) through one backend
    # instance, with no dynamo reset in between: each call stays on the fused kernel (a fallback to
    # the unfused path would warn, an error under the suite's -W error) and is right.
    backend = get_backend("flex")
    gen = torch.Generator().manual_seed(2)
    calls = 0
    for dtype in (torch.bfloat16, torch.float16):
        for heads, kv_heads, dim, block in ((8, 2, 128, 128), (4, 4, 64, 64)):
            for causal in (False, True):
                for q_len in (512, 700, 1000):
                    tables = random_tables(gen, heads, kv_heads, q_len, q_len, block, causal)
                    q, k, v = make_qkv(gen, 1, heads, kv_heads, q_len, q_len, dim, dtype)
                    out = backend.attention(q, k, v, tables.to("cuda"))
                    assert rel_err(out, dense_reference(q, k, v, tables)) <= 1e-2, (dtype, heads, causal, q_len)
                    calls += 1
    assert calls == 24 and len(backend._compiled) <= 8
    # And still fused after all of them: FlexAttention's unfused path would hold the 8 x 8192 x 8192
    # float32 scores (2 GiB) of this call; the fused kernel needs little beyond q, k, v and the output.
    tables = random_tables(gen, 8, 2, 8192, 8192, 128, True)
    q, k, v = make_qkv(gen, 1, 8, 2, 8192, 8192, 128, torch.bfloat16)
    tables = tables.to("cuda")
    backend.attention(q, k, v, tables)                                # compiles this length's variant
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = backend.attention(q, k, v, tables)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 512 * 2**20
    assert rel_err(out[:, :, -512:], dense_reference(q[:, :, -512:], k, v, _last_rows(tables, 512))) <= 1e-2
