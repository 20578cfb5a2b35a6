"""The canonical op: softcap and sinks against an explicit reference; autograd against SDPA / dense_attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.ops import dense_attention


def explicit_reference(q, k, v, attn_mask=None, is_causal=False, scale=None, softcap=None, sinks=None):
    """Attention written out step by step in float64 (the definition the op documents)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask.double()
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if sinks is not None:
        column = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probabilities = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
    else:
        probabilities = torch.softmax(scores, -1)
    return probabilities @ v


def random_inputs(kv_heads: int = 4, length: int = 20, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, length, 8, generator=generator) * 2
    k = torch.randn(2, kv_heads, length, 8, generator=generator) * 2
    v = torch.randn(2, kv_heads, length, 8, generator=generator)
    return q, k, v, torch.randn(2, 1, length, length, generator=generator), torch.randn(4, generator=generator)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_canonical_op_equals_explicit_reference(kv_heads, softcap, with_sinks, is_causal):
    q, k, v, mask, sinks = random_inputs(kv_heads)
    sinks = sinks if with_sinks else None
    got = torch.ops.sparsify.attention(q, k, v, mask, is_causal, 0.3, softcap, sinks)
    expected = explicit_reference(q, k, v, mask, is_causal, 0.3, softcap, sinks)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_softcap_changes_the_result_and_sinks_take_mass():
    q, k, v, _, sinks = random_inputs()
    plain = dense_attention(q, k, v)
    assert (dense_attention(q, k, v, softcap=2.0) - plain).abs().max() > 1e-2
    # A sink takes probability from every key: the output shrinks towards zero.
    assert dense_attention(q, k, v, sinks=torch.full((4,), 100.0)).abs().max() < 0.05 * plain.abs().max()


def test_fully_masked_rows_with_sinks_give_zeros():
    q, k, v, _, sinks = random_inputs()
    hidden = torch.zeros(2, 1, 20, 20, dtype=torch.bool)
    hidden[..., 1:, :] = True
    out = dense_attention(q, k, v, hidden, sinks=sinks)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.isfinite(out).all()


def gradients(function, tensors, grad_output):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    output = function(*leaves)
    return output, torch.autograd.grad(output, leaves, grad_output)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("is_causal", [False, True])
def test_autograd_matches_sdpa(kv_heads, is_causal):
    q, k, v, mask, _ = (t.double() for t in random_inputs(kv_heads))
    grad_output = torch.randn(2, 4, 20, 8, dtype=torch.float64)
    group = 4 // kv_heads

    def sdpa(q, k, v, mask):
        mask = mask if not is_causal else mask.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              attn_mask=mask, scale=0.3)

    output, grads = gradients(lambda q, k, v, m: torch.ops.sparsify.attention(q, k, v, m, is_causal, 0.3),
                              (q, k, v, mask), grad_output)
    expected_output, expected = gradients(sdpa, (q, k, v, mask), grad_output)
    torch.testing.assert_close(output, expected_output)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_autograd_with_softcap_and_sinks_matches_dense_attention():
    q, k, v, mask, sinks = (t.double() for t in random_inputs(2))
    grad_output = torch.randn(2, 4, 20, 8, dtype=torch.float64)
    _, grads = gradients(lambda q, k, v, m, s: torch.ops.sparsify.attention(q, k, v, m, True, None, 4.0, s),
                         (q, k, v, mask, sinks), grad_output)
    _, expected = gradients(lambda q, k, v, m, s: explicit_reference(q, k, v, m, True, None, 4.0, s),
                            (q, k, v, mask, sinks), grad_output)
    assert grads[4].shape == (4,) and grads[3].shape == mask.shape
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_gradcheck_through_the_op():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 4, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 6, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    mask, sinks = torch.randn(1, 1, 6, 6, generator=generator, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, mask, sinks))
    assert torch.autograd.gradcheck(lambda *x: torch.ops.sparsify.attention(*x[:4], False, 0.5, 3.0, x[4]), inputs)


def test_bool_mask_has_no_gradient_and_the_input_gradients_equal_the_dense_reference():
    q, k, v, _, _ = (t.double() for t in random_inputs(kv_heads=2))
    keep = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[..., 0] = True
    grad_output = torch.randn(2, 4, 20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.ops.sparsify.attention(*inputs, keep, True, 0.4).backward(grad_output)
    # Reference: softmax attention with the mask and the causal triangle written out, GQA heads repeated.
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
    scores = ref_q @ ref_k.repeat_interleave(2, 1).transpose(-1, -2) * 0.4
    visible = keep & torch.ones(20, 20, dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    (weights @ ref_v.repeat_interleave(2, 1)).backward(grad_output)
    for ours, expected in zip((t.grad for t in inputs), (ref_q.grad, ref_k.grad, ref_v.grad)):
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)
    assert not keep.requires_grad


@pytest.mark.parametrize("family", ["manual", "gpt_oss"])
def test_backward_through_a_compiled_module_with_dense_sites(family):
    import model_zoo
    import sparsify

    model, inputs = getattr(model_zoo, family)()
    run = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(*inputs))
    sites = sparsify.find_attention(model, inputs)
    compiled = sparsify.compile(model, strategy=sparsify.Strategy.dense(sites), example_inputs=sites)

    def gradients(module):
        model.zero_grad()
        sparsify.api.first_output_tensor(run(module)).double().pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected, got = gradients(model), gradients(compiled)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
