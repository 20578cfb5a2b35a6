"""The `fa4` backend (FlashAttention-4): clear refusal without it, its pure helpers, and on a GPU the lean call
against FA4's own entry and the reference (the shared suite in test_backend_suite.py covers the rest)."""

from __future__ import annotations

import pytest
import torch

from sparsify import patterns
from sparsify.backends import BackendUnavailableError, get_backend, require_backend
from sparsify.backends.fa4 import attention_window, fa4_block_list, kv_head_layout
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite

from backend_helpers import mask_reference, random_runtime_mask, rel_err

FA4 = get_backend("fa4")
HAS_FA4 = torch.cuda.is_available() and FA4.availability("cuda") is None


@pytest.mark.skipif(HAS_FA4, reason="FA4 is installed here")
def test_missing_fa4_is_refused_naming_the_package_and_the_install_command():
    with pytest.raises(BackendUnavailableError) as failure:
        require_backend("fa4", "cuda")
    message = str(failure.value)
    assert "backend 'fa4' is not available" in message
    assert "flash-attn-4" in message and 'pip install "sparsify-attention[fa4]"' in message


def test_fa4_on_cpu_is_refused():
    assert "CUDA" in FA4.availability("cpu") or "not installed" in FA4.availability("cpu")
    site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=256, k_len=256, causal=True)
    layer = SparseAttention(site, [patterns.sliding_window(64)] * 2, block_size=64, backend="fa4")
    q = torch.randn(1, 2, 256, 64)
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="fa4"):
        layer(q, q, q, None, True, None)


def test_causal_offsets_map_to_fa4_windows():
    assert attention_window(False, 100, 300, 0) == (False, False, None)
    assert attention_window(True, 100, 300, 200) == (True, False, None)     # bottom-right: FA4's causal
    assert attention_window(True, 100, 100, 0) == (True, False, None)
    assert attention_window(True, 100, 300, 0) == (False, True, -200)      # top-left: a local window
    assert attention_window(True, 100, 300, 250) == (False, True, 50)


def test_kv_head_layouts():
    assert kv_head_layout([0, 0, 1, 1], 2).head_slice is None
    assert kv_head_layout([1, 1, 3, 3], 4).head_slice == slice(1, 4, 2)
    assert kv_head_layout([2, 2], 4).head_slice == slice(2, 3, 1)
    assert kv_head_layout([0, 0, 1, 3, 3], 4).gather == (0, 0, 1, 3, 3)
    with pytest.raises(ValueError, match="outside"):
        kv_head_layout([0, 5], 2)


def test_block_lists_pass_as_the_mask_keeps_them_in_int32_cut_to_the_key_blocks():
    # A runtime mask's rows ascend (its invariant): FA4 takes them as they are, widths cut to the key blocks.
    from sparsify.block_mask import RuntimeBlockMask

    kept = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0)) < 0.6
    mask = RuntimeBlockMask.from_block_masks(kept, block_size=16, q_len=80, k_len=64, causal=False)
    for counts, indices in ((mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices)):
        fa4_counts, fa4_indices = fa4_block_list(counts, indices.long(), 4)
        assert fa4_counts.dtype == fa4_indices.dtype == torch.int32 and fa4_indices.is_contiguous()
        assert torch.equal(fa4_counts, counts) and torch.equal(fa4_indices, indices[..., :4])
        for row_count, row in zip(fa4_counts.flatten().tolist(), fa4_indices.flatten(0, -2).tolist()):
            assert row[:row_count] == sorted(row[:row_count])          # ascending: the last key block is last
    counts, indices = fa4_block_list(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 0), 4)
    assert indices.shape == (1, 1, 2, 1)                                 # FA4 takes no zero-width list


# ---------------------------------------------------------------- GPU
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_FA4, reason="needs FA4 on an sm90/sm100 GPU")]


@pytest.mark.parametrize("causal, q_len, k_len, q_offset", [(True, 2000, 2000, 0), (True, 1000, 3000, 2000),
                                                            (True, 1024, 2048, 512), (False, 1500, 1900, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FA4, reason="needs FA4 on an sm90/sm100 GPU")
def test_gpu_lean_call_matches_fa4_entry_and_the_reference(causal, q_len, k_len, q_offset, dtype):
    gen = torch.Generator().manual_seed(q_len + k_len)
    mask = random_runtime_mask(gen, heads=8, q_len=q_len, k_len=k_len, block=128, causal=causal,
                               kv_head_index=torch.arange(8) // 4, q_offset=q_offset, density=0.3, device="cuda")
    q = torch.randn(2, 8, q_len, 128, generator=gen).to("cuda", dtype)
    k, v = (torch.randn(2, 2, k_len, 128, generator=gen).to("cuda", dtype) for _ in range(2))
    lean, entry = get_backend("fa4"), type(FA4)(lean=False)
    with torch.no_grad():
        out = lean.attention(q, k, v, mask)
        expected = entry.attention(q, k, v, mask)
    reference = mask_reference(q, k, v, mask)
    assert rel_err(out, reference) <= 1e-2
    assert rel_err(out, expected) <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FA4, reason="needs FA4 on an sm90/sm100 GPU")
def test_gpu_key_padding_softcap_sinks_and_head_subsets():
    gen = torch.Generator().manual_seed(3)
    mask = random_runtime_mask(gen, heads=5, q_len=1500, k_len=1500, block=128, causal=True,
                               kv_head_index=torch.tensor([0, 0, 1, 3, 3]), density=0.4, device="cuda")
    q = torch.randn(2, 5, 1500, 64, generator=gen).to("cuda", torch.bfloat16) * 3
    k, v = (torch.randn(2, 4, 1500, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    padding = torch.ones(2, 1, 1, 1500, dtype=torch.bool, device="cuda")
    padding[1, ..., 1200:] = False
    sinks = torch.randn(5, generator=gen).to("cuda")
    with torch.no_grad():
        for call in ({}, {"attn_mask": padding}, {"softcap": 20.0}, {"sinks": sinks},
                     {"attn_mask": padding, "softcap": 20.0, "sinks": sinks}):
            out = FA4.attention(q, k, v, mask, **call)
            assert rel_err(out, mask_reference(q, k, v, mask, **call)) <= 1.5e-2, call


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FA4, reason="needs FA4 on an sm90/sm100 GPU")
def test_gpu_lean_call_replays_from_a_cuda_graph():
    gen = torch.Generator().manual_seed(4)
    mask = random_runtime_mask(gen, heads=4, q_len=1024, k_len=1024, block=128, causal=True, density=0.3,
                               device="cuda")
    q, k, v = (torch.randn(1, 4, 1024, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    backend = get_backend("fa4")
    plan = backend.prepare(mask, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=q.dtype, device="cuda")
    with torch.no_grad():
        eager = backend.run(plan, q, k, v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = backend.run(plan, q, k, v)
        q.copy_(torch.randn(q.shape, generator=gen).to(q))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(captured, backend.run(plan, q, k, v)) <= 1e-3
        assert rel_err(captured, eager) > 1e-2                  # the replay really read the new q


_SM90 = HAS_FA4 and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.skipif(not _SM90, reason="needs FA4 on an sm90 GPU (its tile constraints there)")
def test_a_block_size_fa4_cannot_take_is_refused_by_name_and_served_by_the_next_backend_under_auto(caplog):
    # sm90: 128-token blocks need head dims <= 128 (FA4's key tile); head dim 256 does not fit.
    site = AttentionSite("blocks.3.attn", 0, num_heads=2, num_kv_heads=2, head_dim=256, q_len=512, k_len=512,
                         causal=True)
    q = torch.randn(1, 2, 512, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(Exception, match=r"backend 'fa4' cannot serve site 'blocks\.3\.attn'.*128"):
        SparseAttention(site, [patterns.sliding_window(128)] * 2, block_size=128, backend="fa4")   # before any call
    auto = SparseAttention(site, [patterns.sliding_window(128)] * 2, block_size=128, backend="auto").cuda()
    with torch.no_grad(), caplog.at_level("INFO", logger="sparsify.runtime.sparse_attention"):
        first = auto(q, q, q, None, True, None)
        auto(q, q, q, None, True, None)
    notes = [r.getMessage() for r in caplog.records if "'fa4' cannot" in r.getMessage()]
    assert len(notes) == 1 and "blocks.3.attn" in notes[0]    # said once, naming the site
    assert {key[1] for key in auto._plans} != {"fa4"}
    expected = mask_reference(q, q, q, auto.runtime_mask(512, 512, "cuda"))
    assert rel_err(first, expected) < 2e-2
