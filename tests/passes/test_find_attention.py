"""find_attention: every supported attention form becomes one canonical node with a correct site."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model_zoo
from helpers import call, max_relative_error
from sparsify import CaptureError, NoAttentionFoundError, find_attention
from sparsify.api import capture_attention
from sparsify.passes.infra import attention_nodes

CANONICAL = "torch.ops.sparsify.attention.default"


def captured_matches_model(model, inputs, expected_sites: int):
    captured, sites = capture_attention(model, inputs)
    graph_module = captured.graph_module
    assert len(sites) == expected_sites
    assert graph_module.code.count(CANONICAL) == expected_sites
    assert "scaled_dot_product_attention" not in graph_module.code
    assert "softmax" not in graph_module.code
    with torch.no_grad():
        output = graph_module(*captured.args, **captured.kwargs)
    reference = call(model, (captured.args if not captured.kwargs else captured.kwargs) if captured.args or captured.kwargs else ())
    assert max_relative_error(output, reference) <= 1e-5
    return sites


# -- real model families (random weights, tiny configs) ------------------------------------------

def test_gpt2_sites_are_causal_with_padding_mask():
    model, inputs = model_zoo.gpt2()
    sites = captured_matches_model(model, inputs, 2)
    assert [s.name for s in sites] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(s.causal and s.has_mask and s.num_heads == 4 and s.head_dim == 16 and s.q_len == 96 for s in sites)


def test_llama_gqa_is_recognised_after_repeat_kv():
    model, inputs = model_zoo.llama()
    sites = captured_matches_model(model, inputs, 2)
    assert [(s.num_heads, s.num_kv_heads) for s in sites] == [(4, 2), (4, 2)]
    assert all(s.causal for s in sites)


def test_llama_eager_manual_attention_with_gqa():
    model, inputs = model_zoo.llama_eager()
    sites = captured_matches_model(model, inputs, 2)
    assert all(s.source == "manual" and s.num_kv_heads == 2 and s.causal for s in sites)


def test_bert_padding_mask_is_not_causal():
    model, inputs = model_zoo.bert()
    sites = captured_matches_model(model, inputs, 2)
    assert sites[0].name == "encoder.layer.0.attention.self"
    assert all(s.has_mask and not s.causal for s in sites)


def test_vit():
    model, inputs = model_zoo.vit()
    sites = captured_matches_model(model, inputs, 2)
    assert all(s.q_len == 65 and not s.causal for s in sites)  # 64 patches + CLS


def test_diffusers_dit():
    model, inputs = model_zoo.dit()
    sites = captured_matches_model(model, inputs, 2)
    assert [s.name for s in sites] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(s.num_heads == 2 and s.head_dim == 16 and s.q_len == 64 for s in sites)


def test_transformer_encoder():
    model, inputs = model_zoo.transformer_encoder()
    sites = captured_matches_model(model, inputs, 2)
    assert [s.name for s in sites] == ["layers.0.self_attn", "layers.1.self_attn"]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention(batch_first, need_weights):
    model, inputs = model_zoo.multihead(batch_first=batch_first, need_weights=need_weights)
    sites = captured_matches_model(model, inputs, 1)
    assert sites[0].num_heads == 4 and sites[0].head_dim == 16 and sites[0].q_len == 80


def test_multihead_attention_with_key_padding_mask():
    model, (x,) = model_zoo.multihead()
    padding = torch.zeros(2, 80, dtype=torch.bool)
    padding[1, 60:] = True
    sites = captured_matches_model(model, (x, padding), 1)
    assert sites[0].has_mask


def test_manual_block_causal_by_masked_fill():
    model, inputs = model_zoo.manual(causal=True)
    sites = captured_matches_model(model, inputs, 1)
    assert sites[0].source == "manual" and sites[0].causal


def test_manual_block_with_additive_mask_input():
    model, (x,) = model_zoo.manual(causal=False)
    mask = torch.randn(2, 1, 80, 80)
    sites = captured_matches_model(model, (x, mask), 1)
    assert sites[0].has_mask and not sites[0].causal


def test_video_transformer_builtin_example():
    model, inputs = model_zoo.video()
    sites = captured_matches_model(model, inputs, 2)
    assert all(not s.has_mask for s in sites)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_hf_eager_attention_is_matched_by_structure(family):
    model, inputs = getattr(model_zoo, family)()
    model.config._attn_implementation = "eager"  # the hand-written matmul-softmax-matmul path
    sites = captured_matches_model(model, inputs, 2)
    assert all(s.source == "manual" and s.has_mask for s in sites)
    assert all(s.causal for s in sites) == (family == "gpt2")


def test_where_with_a_constant_tensor_fill():
    class WhereMasked(nn.Module):
        def forward(self, q, k, v):
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            fill = torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype)
            return torch.where(causal, scores, fill).softmax(-1) @ v

    sites = captured_matches_model(WhereMasked(), tuple(torch.randn(2, 2, 24, 8) for _ in range(3)), 1)
    assert sites[0].causal and sites[0].has_mask


# -- SDPA variants ------------------------------------------------------------------------------

class SdpaVariant(nn.Module):
    def __init__(self, variant: str, heads: int = 4, kv_heads: int = 4, dim: int = 64):
        super().__init__()
        self.variant, self.heads, self.kv_heads, self.head_dim = variant, heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x, mask=None):
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.variant == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.variant == "scale":
            return F.scaled_dot_product_attention(q, k, v, scale=0.5)
        if self.variant == "mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.variant == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        if self.variant == "repeat_interleave":
            group = self.heads // self.kv_heads
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("variant", ["plain", "causal", "scale"])
def test_sdpa_variants(variant):
    sites = captured_matches_model(SdpaVariant(variant).eval(), (torch.randn(2, 40, 64),), 1)
    assert sites[0].causal == (variant == "causal")


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_sdpa_with_masks(mask_kind):
    mask = torch.rand(2, 1, 40, 40) > 0.3 if mask_kind == "bool" else torch.randn(2, 1, 40, 40)
    if mask_kind == "bool":
        mask[..., 0] = True
    sites = captured_matches_model(SdpaVariant("mask").eval(), (torch.randn(2, 40, 64), mask), 1)
    assert sites[0].has_mask and not sites[0].causal


@pytest.mark.parametrize("variant", ["enable_gqa", "repeat_interleave"])
def test_sdpa_gqa_forms(variant):
    sites = captured_matches_model(SdpaVariant(variant, heads=4, kv_heads=2).eval(), (torch.randn(2, 40, 64),), 1)
    assert (sites[0].num_heads, sites[0].num_kv_heads) == (4, 2)


def test_cross_attention_site():
    class Cross(nn.Module):
        def forward(self, q, kv):
            return F.scaled_dot_product_attention(q, kv, kv)

    sites = captured_matches_model(Cross(), (torch.randn(1, 2, 24, 8), torch.randn(1, 2, 40, 8)), 1)
    assert sites[0].kind == "cross" and (sites[0].q_len, sites[0].k_len) == (24, 40)


def test_two_attentions_in_one_module_get_distinct_names():
    class Twice(nn.Module):
        def forward(self, x):
            y = F.scaled_dot_product_attention(x, x, x)
            return F.scaled_dot_product_attention(y, x, x, is_causal=True)

    sites = find_attention(Twice(), (torch.randn(1, 2, 16, 8),))
    assert [s.name for s in sites] == ["attention", "attention#1"]
    assert [s.index for s in sites] == [0, 1]


def test_dynamic_capture_serves_other_lengths():
    model, _ = model_zoo.manual(causal=True)
    captured, _ = capture_attention(model, (torch.randn(2, 80, 64),))
    other = torch.randn(3, 48, 64)
    with torch.no_grad():
        assert max_relative_error(captured.graph_module(other), call(model, (other,))) <= 1e-5


# -- negative cases -----------------------------------------------------------------------------

def test_softmax_over_other_dim_is_not_attention():
    class NotAttention(nn.Module):
        def forward(self, x):
            return (x @ x.transpose(-2, -1)).softmax(dim=-2) @ x

    with pytest.raises(NoAttentionFoundError, match="softmax over dim -2"):
        find_attention(NotAttention(), (torch.randn(2, 8, 4),))


def test_returned_probabilities_block_the_match():
    class ReturnsWeights(nn.Module):
        def forward(self, q, k, v):
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            return weights @ v, weights

    with pytest.raises(NoAttentionFoundError, match="used elsewhere"):
        find_attention(ReturnsWeights(), tuple(torch.randn(1, 2, 8, 4) for _ in range(3)))


def test_model_without_attention():
    with pytest.raises(NoAttentionFoundError, match="no attention found"):
        find_attention(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), (torch.randn(2, 8),))


def test_uncapturable_model_names_the_module():
    class ShapeChanging(nn.Module):
        def forward(self, x):
            return x.reshape(3, -1)  # no reshape of this input's 16 elements into 3 rows exists

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ShapeChanging()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(CaptureError) as failure:
        find_attention(Outer(), (torch.randn(4, 4),))
    assert "'inner'" in str(failure.value) and "What to try" in str(failure.value)


def test_value_dependent_branch_is_taken_on_the_example_and_checked_later():
    class Branches(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # decided on the example's values; the graph re-checks it on every call
                return F.scaled_dot_product_attention(x, x, x, is_causal=True)
            return F.scaled_dot_product_attention(x, x, x)

    x = torch.randn(2, 2, 16, 8).abs()
    captured, sites = capture_attention(Branches(), (x,))
    assert sites[0].causal
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        captured.graph_module(-x)


def test_user_model_is_not_modified():
    model, inputs = model_zoo.gpt2()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    find_attention(model, inputs)
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_every_canonical_node_carries_a_site():
    # Checked against what the model is (its config and module paths), not against the metadata the sites came from.
    model, inputs = model_zoo.bert()
    captured, _ = capture_attention(model, inputs)
    canonical = [n for n in captured.graph_module.graph.nodes
                 if n.op == "call_function" and str(n.target) == "sparsify.attention.default"]
    assert len(canonical) == model.config.num_hidden_layers == 2
    for index, node in enumerate(canonical):
        site = node.meta.get("sparsify")
        assert site is not None, f"canonical node {node.name} has no site"
        assert site.name == f"encoder.layer.{index}.attention.self" and site.index == index
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (4, 4, 16)
        assert (site.q_len, site.k_len) == tuple(inputs["input_ids"].shape[1:]) * 2 and site.has_mask
        assert not site.causal and site.is_self_attention
    assert attention_nodes(captured.graph_module) == canonical
