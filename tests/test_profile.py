"""Profile statistics: chunked block pooling and candidate errors equal a dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from sparsify import patterns
from sparsify.profile import BlockMassProfile, CandidateErrors, probability_chunks


def dense_probabilities(q, k, attn_mask, causal):
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], 1)
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


def pooled_reference(probabilities, block_size):
    batch, heads, q_len, k_len = probabilities.shape
    qb, kb = -(-q_len // block_size), -(-k_len // block_size)
    padded = torch.nn.functional.pad(probabilities, (0, kb * block_size - k_len, 0, qb * block_size - q_len))
    return padded.view(batch, heads, qb, block_size, kb, block_size).sum((0, 3, 5))


@pytest.mark.parametrize("q_len, k_len, causal", [(100, 100, True), (77, 130, False), (64, 64, False)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_block_mass_equals_dense_pooling(q_len, k_len, causal, kv_heads):
    q = torch.randn(2, 4, q_len, 8)
    k = torch.randn(2, kv_heads, k_len, 8)
    mask = torch.rand(2, 1, 1, k_len) > 0.2
    profile = BlockMassProfile.empty(4, q_len, k_len, 16)
    profile.add(q, k, k, mask, causal and q_len == k_len, None)
    reference = pooled_reference(dense_probabilities(q, k, mask, causal and q_len == k_len), 16)
    torch.testing.assert_close(profile.mass, reference, rtol=1e-5, atol=1e-6)


def test_sampled_rows_estimate_the_block_mass():
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    full = BlockMassProfile.empty(2, 256, 256, 32)
    full.add(q, k, k, None, True, None)
    sampled = BlockMassProfile.empty(2, 256, 256, 32)
    sampled.add(q, k, k, None, True, None, rows_per_block=16, generator=torch.Generator().manual_seed(0))
    assert (sampled.normalized() - full.normalized()).abs().max() < 0.02
    every_row = BlockMassProfile.empty(2, 256, 256, 32)
    every_row.add(q, k, k, None, True, None, rows_per_block=32)
    torch.testing.assert_close(every_row.mass, full.mass)


def test_chunks_cover_every_row_and_small_chunks_agree():
    q, k = torch.randn(1, 2, 200, 8), torch.randn(1, 2, 200, 8)
    big = list(probability_chunks(q, k, k, None, False, None, 32, with_block_values=True))
    small = list(probability_chunks(q, k, k, None, False, None, 32, with_block_values=True, chunk_bytes=1))
    assert len(small) > len(big)
    torch.testing.assert_close(torch.cat([c.output for c in small], 2), torch.cat([c.output for c in big], 2))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, k)
    torch.testing.assert_close(torch.cat([c.output for c in big], 2), expected, rtol=1e-5, atol=1e-5)


def masked_output(q, k, v, keep, attn_mask):
    heads = q.shape[1]
    k, v = (t.repeat_interleave(heads // t.shape[1], 1).double() for t in (k, v))
    scores = (q.double() @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~(keep & attn_mask), float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_candidate_errors_equal_dense_masked_reference(causal):
    batch, heads, length, block = 2, 4, 150, 32
    q = torch.randn(batch, heads, length, 8)
    k, v = torch.randn(batch, 2, length, 8), torch.randn(batch, 2, length, 8)
    padding = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    padding[1, ..., 130:] = False
    candidates = [patterns.dense(), patterns.sliding_window(20), patterns.a_shape(10, 40), patterns.multi_diagonal(64, 8),
                  patterns.skip()]
    blocks = -(-length // block)
    masks = torch.stack([p.block_mask(blocks, blocks, block_size=block, causal=causal, q_len=length, k_len=length)
                         for p in candidates])
    skips = torch.tensor([p.is_skip for p in candidates])
    errors = CandidateErrors.empty([len(candidates)] * heads)
    errors.add(q, k, v, padding, causal, None, block, [masks] * heads, [skips] * heads)
    causal_keep = torch.ones(length, length, dtype=torch.bool).tril() if causal else torch.ones(length, length, dtype=torch.bool)
    dense = masked_output(q, k, v, causal_keep, padding)
    # Query rows at padded positions carry no meaning: the errors leave them out.
    real_rows = padding[:, 0, 0, :, None].double()  # [batch, length, 1]
    assert errors.padded_rows[0].tolist() == (~padding[:, 0, 0]).tolist()
    for index, mask in enumerate(masks):
        keep = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :length] & causal_keep
        sparse = torch.zeros_like(dense) if skips[index] else masked_output(q, k, v, keep, padding)
        for head in range(heads):
            difference, reference = (sparse[:, head] - dense[:, head]) * real_rows, dense[:, head] * real_rows
            expected = (difference.norm() / reference.norm()).item()
            assert errors.relative_error(head)[index].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert all(errors.relative_error(h)[0] < 1e-5 and errors.relative_error(h)[-1] == pytest.approx(1.0) for h in range(heads))


def softcap_sink_probabilities(q, k, attn_mask, causal, softcap, sinks):
    """Dense probabilities with soft-capping and sinks (sink column dropped) and the sinks' own share."""
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], 1)
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    column = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    full = torch.softmax(torch.cat([scores, column], -1), -1)
    return full[..., :-1], full[..., -1]


@pytest.mark.parametrize("causal", [False, True])
def test_block_mass_with_softcap_and_sinks_equals_dense_pooling(causal):
    q, k = torch.randn(2, 4, 100, 8) * 3, torch.randn(2, 2, 100, 8) * 3
    sinks = torch.randn(4)
    mask = torch.rand(2, 1, 1, 100) > 0.2
    profile = BlockMassProfile.empty(4, 100, 100, 16)
    profile.add(q, k, k, mask, causal, None, softcap=2.0, sinks=sinks)
    probabilities, _ = softcap_sink_probabilities(q, k, mask, causal, 2.0, sinks)
    torch.testing.assert_close(profile.mass, pooled_reference(probabilities, 16), rtol=1e-5, atol=1e-6)


def test_chunks_with_softcap_and_sinks_equal_dense_attention():
    from sparsify.ops import dense_attention

    q, k, v = torch.randn(1, 2, 90, 8) * 3, torch.randn(1, 2, 90, 8) * 3, torch.randn(1, 2, 90, 8)
    sinks = torch.tensor([0.5, 2.0])
    chunks = list(probability_chunks(q, k, v, None, True, None, 32, with_block_values=True, chunk_bytes=1,
                                     softcap=3.0, sinks=sinks))
    torch.testing.assert_close(torch.cat([c.output for c in chunks], 2),
                               dense_attention(q, k, v, None, True, None, 3.0, sinks), rtol=1e-5, atol=1e-5)
    _, sink_share = softcap_sink_probabilities(q, k, None, True, 3.0, sinks)
    torch.testing.assert_close(torch.cat([c.sink_mass for c in chunks], 2).double(), sink_share, rtol=1e-5, atol=1e-6)


def test_candidate_errors_with_softcap_and_sinks_equal_dense_masked_reference():
    batch, heads, length, block = 2, 2, 96, 32
    q = torch.randn(batch, heads, length, 8) * 3
    k, v = torch.randn(batch, heads, length, 8) * 3, torch.randn(batch, heads, length, 8)
    sinks = torch.tensor([1.0, -0.5])
    candidates = [patterns.dense(), patterns.sliding_window(20), patterns.a_shape(10, 40), patterns.skip()]
    blocks = -(-length // block)
    masks = torch.stack([p.block_mask(blocks, blocks, block_size=block, causal=True, q_len=length, k_len=length)
                         for p in candidates])
    skips = torch.tensor([p.is_skip for p in candidates])
    errors = CandidateErrors.empty([len(candidates)] * heads)
    errors.add(q, k, v, None, True, None, block, [masks] * heads, [skips] * heads, softcap=4.0, sinks=sinks)
    causal_keep = torch.ones(length, length, dtype=torch.bool).tril()
    from sparsify.ops import dense_attention

    dense = dense_attention(q.double(), k.double(), v.double(), causal_keep, False, None, 4.0, sinks.double())
    for index, mask in enumerate(masks):
        keep = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :length] & causal_keep
        # With sinks a row whose keys are all dropped still normalises against its sink.
        sparse = torch.zeros_like(dense) if skips[index] else dense_attention(
            q.double(), k.double(), v.double(), keep, False, None, 4.0, sinks.double())
        for head in range(heads):
            expected = ((sparse[:, head] - dense[:, head]).norm() / dense[:, head].norm()).item()
            assert errors.relative_error(head)[index].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert all(errors.recall(h)[0] == pytest.approx(1.0) for h in range(heads))
