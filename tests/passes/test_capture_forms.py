"""Capture forms of issue 10: each family is found with the right site attributes and computes what eager does."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model_zoo
from helpers import call, max_relative_error
from sparsify import CaptureError, NoAttentionFoundError, Strategy, compile, find_attention
import sparsify.api as sparsify_api
from sparsify.api import capture_attention
from sparsify.capture import FRAMEWORK_DOOR, FoundSites, capture
from sparsify.passes.infra import attention_nodes

CANONICAL = "torch.ops.sparsify.attention.default"


def capture_and_compare(model, inputs, expected_sites: int, tolerance: float = 1e-5):
    """Capture, check every site became one canonical node, and compare the graph with eager on the example."""
    captured, sites = capture_attention(model, inputs)
    code = captured.graph_module.code
    assert len(sites) == expected_sites, [s.name for s in sites]
    assert code.count(CANONICAL) == expected_sites
    assert "scaled_dot_product_attention" not in code
    with torch.no_grad():
        output = captured.graph_module(*captured.args, **captured.kwargs)
        reference = model(*captured.args, **captured.kwargs)
    assert max_relative_error(output, reference) <= tolerance
    return captured, sites


def canonical_args(captured):
    return [node.args for node in attention_nodes(captured.graph_module)]


# -- soft-capping and sinks become site attributes ----------------------------------------------

def test_gemma2_softcap_is_a_site_attribute():
    model, inputs = model_zoo.gemma2()
    captured, sites = capture_and_compare(model, inputs, 2)
    assert all(s.softcap == pytest.approx(50.0) and not s.has_sinks and s.causal and s.source == "manual" for s in sites)
    for args in canonical_args(captured):
        assert args[5] == pytest.approx(model.config.query_pre_attn_scalar ** -0.5) and args[6] == pytest.approx(50.0)
    assert "aten.tanh" not in captured.graph_module.code


def test_gpt_oss_sinks_are_a_site_attribute():
    model, inputs = model_zoo.gpt_oss()
    captured, sites = capture_and_compare(model, inputs, 2)
    assert all(s.has_sinks and s.softcap is None and s.causal and (s.num_heads, s.num_kv_heads) == (4, 2) for s in sites)
    assert all(args[7] is not None for args in canonical_args(captured))
    assert "aten.cat" not in captured.graph_module.code.split("sparsify.attention")[0].split("\n")[-1]


class ScoreFormVariant(nn.Module):
    """Hand-written attention whose score chain takes one of several forms (positives and negatives)."""

    def __init__(self, form: str, heads: int = 2):
        super().__init__()
        self.form = form
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, q, k, v, bias):
        scores = q @ k.transpose(-2, -1) * 0.25
        form = self.form
        if form == "softcap":
            scores = torch.tanh(scores / 20.0) * 20.0 + bias
        elif form == "softcap_scaled_after":
            scores = (torch.tanh(scores / 20.0) * 20.0 + bias) * 0.5
        elif form == "mask_before_softcap":
            scores = torch.tanh((scores + bias) / 20.0) * 20.0
        elif form in ("sinks", "sinks_per_query"):
            column = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)
            if form == "sinks_per_query":
                column = column + q[..., :1]  # depends on the query: not one logit per head
            logits = torch.cat([scores + bias, column], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            return logits.softmax(-1)[..., :-1] @ v
        elif form == "in_place":
            scores += bias
            scores.mul_(2.0)
        elif form == "negated":
            scores = bias - scores
        elif form == "reshape_across_keys":
            batch, heads, length, _ = scores.shape
            scores = (scores + bias).reshape(batch, heads, length // 2, 2 * length).reshape(batch, heads, length, length)
        elif form == "value_use_of_scores":
            return (scores + bias).softmax(-1) @ v + scores.mean()
        return (scores + bias).softmax(-1) @ v if form in ("in_place", "negated") else scores.softmax(-1) @ v


def score_inputs(seq: int = 24):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, seq, 8, generator=generator) for _ in range(3))
    return q, k, v, torch.randn(2, 1, seq, seq, generator=generator)


@pytest.mark.parametrize("form, softcap, scale", [("softcap", 20.0, 0.25), ("softcap_scaled_after", 10.0, 0.125),
                                                  ("in_place", None, 0.5)])
def test_score_forms_match(form, softcap, scale):
    captured, sites = capture_and_compare(ScoreFormVariant(form).eval(), score_inputs(), 1)
    assert sites[0].softcap == (pytest.approx(softcap) if softcap else None) and sites[0].has_mask
    assert canonical_args(captured)[0][5] == pytest.approx(scale)


def test_learned_sinks_with_row_max_shift_match():
    captured, sites = capture_and_compare(ScoreFormVariant("sinks").eval(), score_inputs(), 1)
    assert sites[0].has_sinks and sites[0].has_mask


@pytest.mark.parametrize("form, reason", [
    ("mask_before_softcap", "before the soft-capping"),
    ("sinks_per_query", "one logit per head"),
    ("negated", "negated"),
    ("reshape_across_keys", "reshapes more than the batch"),
    ("value_use_of_scores", "used elsewhere"),
])
def test_score_forms_that_must_not_match(form, reason):
    with pytest.raises(NoAttentionFoundError, match=reason):
        find_attention(ScoreFormVariant(form).eval(), score_inputs())


# -- reshapes inside the chain ------------------------------------------------------------------

def test_bloom_views_around_the_softmax():
    model, inputs = model_zoo.bloom()
    _, sites = capture_and_compare(model, inputs, 2)
    assert all(s.causal and s.has_mask and s.num_heads == 4 and s.head_dim == 16 and s.source == "manual" for s in sites)


def test_deberta_v2_constant_scale_on_the_key():
    model, inputs = model_zoo.deberta_v2()
    captured, sites = capture_and_compare(model, inputs, 2)
    assert all(s.has_mask and not s.causal and s.num_heads == 4 for s in sites)
    assert all(args[5] == pytest.approx(1 / math.sqrt(16 * 3)) for args in canonical_args(captured))


def test_hand_written_shifted_windows_find_all_four_layers():
    model, inputs = model_zoo.shifted_window()
    _, sites = capture_and_compare(model, inputs, 4)
    assert [s.name for s in sites] == [f"blocks.{i}.attn" for i in range(4)]
    assert all(s.has_mask and s.q_len == 16 and s.num_heads == 2 and s.kind == "self" for s in sites)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hf_swin(attn_implementation):
    model, inputs = model_zoo.swin(attn_implementation=attn_implementation)
    captured, sites = capture_and_compare(model, inputs, 2)
    assert captured.dynamic and all(s.q_len == 49 and s.has_mask for s in sites)


# -- in-place arithmetic, lifted constants, shape-only uses ---------------------------------------

def test_gpt_neo_lifted_constant_fill():
    model, inputs = model_zoo.gpt_neo()
    captured, sites = capture_and_compare(model, inputs, 2)
    assert all(s.causal and s.has_mask for s in sites)
    assert all(args[5] == pytest.approx(1.0) for args in canonical_args(captured))  # GPT-Neo does not scale


def test_mpnet_in_place_bias():
    model, inputs = model_zoo.mpnet()
    _, sites = capture_and_compare(model, inputs, 2)
    assert all(s.has_mask and not s.causal for s in sites)


def test_mask_built_from_the_scores_shape():
    model, inputs = model_zoo.tril_mask()
    captured, sites = capture_and_compare(model, inputs, 1)
    assert sites[0].causal
    assert "aten.matmul" not in captured.graph_module.code  # q @ kᵀ is no longer computed for its shape
    other = torch.randn(3, 56, 64)
    with torch.no_grad():
        assert max_relative_error(captured.graph_module(other), call(model, (other,))) <= 1e-5


# -- self or cross by where q and k come from ---------------------------------------------------

def test_latte_equal_length_cross_attention():
    model, inputs = model_zoo.latte()
    _, sites = capture_and_compare(model, inputs, 3)
    kinds = {s.name: (s.kind, s.q_len, s.k_len) for s in sites}
    assert kinds["transformer_blocks.0.attn2"] == ("cross", 64, 64)
    assert kinds["transformer_blocks.0.attn1"] == ("self", 64, 64)


@pytest.mark.parametrize("same_tensor", [True, False])
def test_self_or_cross_from_the_projection_inputs(same_tensor):
    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))

        def forward(self, x, context):
            source = x if same_tensor else context
            split = lambda t: t.view(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)  # noqa: E731
            return F.scaled_dot_product_attention(split(self.q(x)), split(self.k(source)), split(self.v(source)))

    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 20, 16, generator=generator), torch.randn(2, 20, 16, generator=generator))
    sites = find_attention(Projected(), inputs)
    assert sites[0].kind == ("self" if same_tensor else "cross") and sites[0].q_len == sites[0].k_len


# -- capture: keyword inputs, caches, data-dependent values -------------------------------------

def test_llava_use_cache_through_kwargs():
    model, inputs = model_zoo.llava()
    captured, sites = capture_and_compare(model, inputs, 4, tolerance=1e-4)
    assert captured.kwargs["use_cache"] is False and captured.dynamic
    assert [s.causal for s in sites] == [False, False, True, True]
    assert sites[2].name == "model.language_model.layers.0.self_attn"


def test_keyword_inputs_through_var_keyword_stay_dynamic(caplog):
    model, inputs = model_zoo.keyword_inputs()
    with caplog.at_level(logging.WARNING, logger="sparsify"):
        captured, sites = capture_and_compare(model, inputs, 1)
    assert captured.dynamic and not captured.static_inputs and not caplog.records
    assert sites[0].name == "block"  # module paths as in the model, not the capture's wrapper
    other = {"hidden_states": torch.randn(3, 56, 64), "gate": torch.rand(3, 56, 1)}
    with torch.no_grad():
        assert max_relative_error(captured.graph_module(**other), call(model, other)) <= 1e-5


def test_static_fallback_warns_naming_the_inputs(caplog):
    class ShapeKeyed(nn.Module):
        def forward(self, x):
            gains = {x.shape[0]: 0.5}  # a size used as a dict key: export cannot do this with symbolic sizes
            return F.scaled_dot_product_attention(x, x, x) * gains[x.shape[0]]

    x = torch.randn(2, 2, 16, 8)
    with caplog.at_level(logging.WARNING, logger="sparsify"):
        captured = capture(ShapeKeyed(), (x,))
    assert not captured.dynamic and captured.static_inputs == ("x (2, 2, 16, 8)",)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "static shapes" in warning[0] and "x (2, 2, 16, 8)" in warning[0]


# diffusers' Mochi rotary embedding asks for a float32 CPU autocast, which torch declines with two warnings.
@pytest.mark.filterwarnings("ignore:CPU Autocast only supports:UserWarning")
@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported:UserWarning")
def test_mochi_data_dependent_text_length():
    model, inputs = model_zoo.mochi()
    _, sites = capture_and_compare(model, inputs, 5, tolerance=1e-4)
    joint = [s for s in sites if s.name.startswith("transformer_blocks")]
    assert len(joint) == 4 and all(s.kind == "self" for s in joint)


def test_transformer_decoder_causality_from_the_example_mask():
    model, inputs = model_zoo.transformer_decoder()
    captured, sites = capture_and_compare(model, inputs, 4)
    assert [(s.kind, s.causal) for s in sites] == [("self", True), ("cross", False)] * 2
    # The decision was taken on the example's mask; the graph checks it again on other masks.
    other = dict(inputs, tgt_mask=torch.zeros(24, 24))
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        captured.graph_module(**other)


@pytest.mark.parametrize("family, call_name, module", [
    ("lumina2", ".tolist()", "rope_embedder"),
    ("hidream", ".numpy()", "double_stream_blocks.0.block.ff_i"),
])
def test_data_dependent_python_names_module_cause_and_door(family, call_name, module):
    model, inputs = getattr(model_zoo, family)()
    with pytest.raises(CaptureError) as failure:
        find_attention(model, inputs)
    message = str(failure.value)
    assert "\n" not in message
    assert call_name in message and module in message and FRAMEWORK_DOOR in message


def test_numpy_in_a_small_module_gives_one_line():
    class Routes(nn.Module):
        def forward(self, x):
            counts = (x > 0).sum(-1).cpu().numpy()
            return x * float(counts.max())

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = Routes()

        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, self.router(x))

    with pytest.raises(CaptureError) as failure:
        find_attention(Outer(), (torch.randn(2, 2, 8, 4),))
    message = str(failure.value)
    assert "\n" not in message and "'router'" in message and "`.numpy()`" in message and FRAMEWORK_DOOR in message


# -- reuse between find_attention and compile ---------------------------------------------------

class CountsTraces(nn.Module):
    """A causal attention block (the model the reuse tests capture)."""

    def __init__(self):
        super().__init__()
        self.block = model_zoo.ManualAttentionBlock(64, 4, causal=True)

    def forward(self, x):
        return self.block(x)


def test_compile_reuses_the_graph_find_attention_captured(monkeypatch):
    model, x = CountsTraces().eval(), torch.randn(2, 40, 64)
    sites = find_attention(model, (x,))
    assert isinstance(sites, FoundSites) and isinstance(sites, list)
    captures = []

    def counting_capture(*args, **kwargs):
        captures.append(args)
        return capture(*args, **kwargs)

    monkeypatch.setattr(sparsify_api, "capture", counting_capture)
    compiled = compile(model, strategy=Strategy.dense(sites), example_inputs=sites)
    again = compile(model, strategy=Strategy.dense(sites), example_inputs=sites)
    assert captures == []  # no second capture
    compile(model, strategy=Strategy.dense(sites), example_inputs=(x,))
    assert len(captures) == 1  # the counter does see a capture
    assert compiled.graph_module is not again.graph_module
    assert "sparsify.attention" in sites.captured.graph_module.code  # the found graph is left as it was
    with torch.no_grad():
        expected = model(x)
        assert max_relative_error(compiled(x), expected) <= 1e-5 and max_relative_error(again(x), expected) <= 1e-5


def test_found_sites_refuse_another_model():
    model, x = CountsTraces().eval(), torch.randn(2, 40, 64)
    sites = find_attention(model, (x,))
    with pytest.raises(TypeError, match="another model"):
        compile(CountsTraces().eval(), strategy=Strategy.dense(sites), example_inputs=sites)


def test_dynamic_setting_is_validated():
    with pytest.raises(TypeError, match="dynamic must be"):
        capture(nn.Linear(4, 4), (torch.randn(2, 4),), dynamic="sometimes")
