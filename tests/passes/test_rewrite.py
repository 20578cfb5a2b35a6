"""rewrite_attention: sparse sites become SparseAttention modules that match a dense masked reference."""

from __future__ import annotations

import pytest
import torch

import model_zoo
from helpers import call, masked_attention_reference, max_relative_error
import sparsify
from sparsify import Strategy, StrategyError, patterns
from sparsify.api import capture_attention
from sparsify.passes.infra import PassManager, attention_nodes
from sparsify.passes.rewrite import RewriteAttention
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite

CANONICAL = torch.ops.sparsify.attention.default


def element_keep_mask(pattern, q_len, k_len, block_size, causal):
    """Element mask of a pattern: its block mask expanded to tokens, with the causal triangle."""
    q_blocks, k_blocks = -(-q_len // block_size), -(-k_len // block_size)
    blocks = pattern.block_mask(q_blocks, k_blocks, block_size=block_size, causal=causal, q_len=q_len, k_len=k_len)
    keep = blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:q_len, :k_len]
    if causal:
        keep = keep & torch.ones(q_len, k_len, dtype=torch.bool).tril()
    return keep


def reference_attention(site_strategy, block_size, site: AttentionSite):
    """A dense stand-in for the canonical op that applies each head's element mask."""

    def attention(q, k, v, attn_mask, is_causal, scale):
        q_len, k_len = q.shape[-2], k.shape[-2]
        keep = torch.stack([element_keep_mask(p, q_len, k_len, block_size, site.causal) for p in site_strategy.heads])
        keep = keep.unsqueeze(0)
        additive = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                keep = keep & attn_mask
            else:
                additive = attn_mask
        if is_causal:
            keep = keep & torch.ones(q_len, k_len, dtype=torch.bool).tril()
        return masked_attention_reference(q, k, v, keep, scale, additive)

    return attention


def reference_module(model, inputs, strategy: Strategy):
    """The captured model with every attention computed densely under the strategy's element masks."""
    captured, sites = capture_attention(model, inputs)
    for node in attention_nodes(captured.graph_module):
        site = node.meta["sparsify"]
        node.target = reference_attention(strategy.sites[site.name], strategy.block_size, site)
    captured.graph_module.recompile()
    return captured


def mixed_strategy(sites, block_size=16):
    """Per site: head 0 dense, the others alternate window+sinks and a narrow window."""
    strategy = Strategy.dense(sites, block_size=block_size)
    for site in sites:
        heads = [patterns.dense()] + [
            patterns.sliding_window(24) | patterns.attention_sinks(8) if h % 2 else patterns.sliding_window(40)
            for h in range(1, site.num_heads)
        ]
        strategy = strategy.with_heads(site.name, heads)
    return Strategy.from_dict(strategy.to_dict())


def rewrite(model, inputs, strategy):
    captured, _ = capture_attention(model, inputs)
    rewrite_pass = RewriteAttention(strategy)
    PassManager([rewrite_pass]).run(captured.graph_module)
    return captured, rewrite_pass.rewritten


MODELS = ["gpt2", "llama", "llama_eager", "bert", "vit", "dit", "transformer_encoder", "multihead", "manual"]


@pytest.mark.parametrize("name", MODELS)
def test_sparse_strategy_matches_masked_dense_reference(name):
    model, inputs = getattr(model_zoo, name)()
    sites = capture_attention(model, inputs)[1]
    strategy = mixed_strategy(sites)
    captured, rewritten = rewrite(model, inputs, strategy)
    assert rewritten == len(sites)
    code = captured.graph_module.code
    assert code.count("= self.sparse_attention_") == len(sites) and "sparsify.attention" not in code
    reference = reference_module(model, inputs, strategy)
    output = captured.graph_module(*captured.args, **captured.kwargs)
    expected = reference.graph_module(*reference.args, **reference.kwargs)
    assert max_relative_error(output, expected) <= 1e-5
    # ...and the sparsity is real: the output differs from the dense model.
    assert max_relative_error(output, call(model, inputs)) > 1e-4


def test_rewritten_sites_are_handed_the_cost_model_that_prices_their_backends():
    # The runtime stands below the cost model and imports none: the pass hands every site the one given, or
    # the default (analytic constants and the shipped hardware profiles) when none was.
    from sparsify.cost import CostModel

    model, inputs = model_zoo.manual()
    sites = capture_attention(model, inputs)[1]
    given = CostModel(match_device_name=False)
    for cost_model in (given, None):
        captured, _ = capture_attention(model, inputs)
        PassManager([RewriteAttention(mixed_strategy(sites), cost_model=cost_model)]).run(captured.graph_module)
        handed = [module.cost_model for module in captured.graph_module.modules() if isinstance(module, SparseAttention)]
        assert len(handed) == len(sites)
        if cost_model is given:
            assert all(handed_model is given for handed_model in handed)
        else:
            assert all(isinstance(handed_model, CostModel) for handed_model in handed)
            assert {p.device_name for p in handed[0].profiles} == {p.device_name for p in CostModel.default().profiles}


class WeightlessAttention(torch.nn.Module):
    """Attention of given q, k, v: no weights to say where the model runs."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_runtime_modules_go_to_the_models_device_and_a_weightless_model_runs_where_its_inputs_are():
    model, inputs = model_zoo.manual()
    sites = capture_attention(model, inputs)[1]
    captured, _ = capture_attention(model, inputs)
    assert captured.device == torch.device("cpu")
    PassManager([RewriteAttention(mixed_strategy(sites), device="meta")]).run(captured.graph_module)
    placed = [module for module in captured.graph_module.modules() if isinstance(module, SparseAttention)]
    assert placed and all(module.sparse_heads.device.type == "meta" for module in placed)
    q = torch.randn(1, 2, 64, 16, device="meta")
    assert capture_attention(WeightlessAttention(), (q, q, q))[0].device.type == "meta"


@pytest.mark.gpu
def test_a_weightless_model_compiled_with_cuda_inputs_runs_on_cuda():
    q, k, v = (torch.randn(1, 2, 512, 64, device="cuda") for _ in range(3))
    sites = sparsify.find_attention(WeightlessAttention(), (q, k, v))
    strategy = Strategy.uniform(sites, patterns.sliding_window(128) | patterns.attention_sinks(64), block_size=64)
    sparse = sparsify.compile(WeightlessAttention(), strategy=strategy, example_inputs=(q, k, v), backend="torch")
    keep = element_keep_mask(strategy.sites[sites[0].name].heads[0], 512, 512, 64, causal=True).to(q.device)
    reference = masked_attention_reference(q, k, v, keep)
    assert max_relative_error(sparse(q, k, v), reference) < 1e-4


def test_all_dense_sites_keep_the_canonical_op():
    model, inputs = model_zoo.bert()
    sites = capture_attention(model, inputs)[1]
    captured, rewritten = rewrite(model, inputs, Strategy.dense(sites))
    assert rewritten == 0
    assert captured.graph_module.code.count("sparsify.attention") == len(sites)


def test_strategy_for_another_model_is_refused_naming_the_pass():
    model, inputs = model_zoo.bert()
    other_sites = capture_attention(*model_zoo.gpt2())[1]
    with pytest.raises(StrategyError) as failure:
        rewrite(model, inputs, Strategy.dense(other_sites))
    assert "rewrite_attention" in str(failure.value) and "transformer.h.0.attn" in str(failure.value)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_attention_module_mixed_heads(dtype, tolerance, kv_heads, causal):
    site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=kv_heads, head_dim=16, q_len=100, k_len=100, causal=causal)
    head_patterns = [patterns.dense(), patterns.sliding_window(20), patterns.attention_sinks(16) | patterns.sliding_window(8),
                     patterns.sliding_window(50)]
    layer = SparseAttention(site, head_patterns, block_size=16)
    for q_len in (100, 77, 160):  # the captured length, then others (tables built on demand)
        q = torch.randn(2, 4, q_len, 16, dtype=dtype)
        k, v = (torch.randn(2, kv_heads, q_len, 16, dtype=dtype) for _ in range(2))
        padding = torch.ones(2, 1, 1, q_len, dtype=torch.bool)
        padding[1, ..., q_len - 9:] = False
        output = layer(q, k, v, padding, causal, None)
        keep = torch.stack([element_keep_mask(p, q_len, q_len, 16, causal) for p in head_patterns]).unsqueeze(0) & padding
        expected = masked_attention_reference(q.double(), k.double(), v.double(), keep)
        assert max_relative_error(output, expected) <= tolerance


def test_sparse_attention_rejects_wrong_head_count():
    site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=4, head_dim=16, q_len=64, k_len=64)
    layer = SparseAttention(site, [patterns.sliding_window(16)] * 4, block_size=16)
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(Exception, match="compiled for 4 query"):
        layer(q, q, q, None, False, None)
