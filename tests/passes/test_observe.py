"""The observe pass's interpreter: every canonical node's inputs reach the observer, outputs stay the model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model_zoo
from sparsify.api import capture_attention
from sparsify.errors import SparsifyError
from sparsify.passes.observe import AttentionInterpreter, ObservingInterpreter, observe


def _captured_manual_block():
    model, inputs = model_zoo.manual(seq=40, batch=2)
    captured, sites = capture_attention(model, inputs)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return model, args, captured.graph_module, sites


def test_observer_sees_every_site_and_the_output_is_the_models():
    model, args, graph_module, sites = _captured_manual_block()
    seen = []

    def observer(site, q, k, v, attn_mask, is_causal, scale, softcap, sinks):
        seen.append((site.name, tuple(q.shape), tuple(k.shape), is_causal))
        # The arguments are the real ones: dense attention of them is the site's output.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    output = ObservingInterpreter(graph_module, observer).run_batch(args, {})
    with torch.no_grad():
        expected = model(*args)
    assert [name for name, *_ in seen] == [site.name for site in sites]
    assert seen[0][1] == (2, sites[0].num_heads, 40, sites[0].head_dim)
    assert torch.allclose(output, expected, atol=1e-5, rtol=1e-5)
    batches = []
    observe(graph_module, [(args, {}), (args, {})], lambda site, *inputs: batches.append(site.name))
    assert batches == [sites[0].name] * 2


def test_a_returned_tensor_replaces_the_dense_output():
    model, args, graph_module, _ = _captured_manual_block()

    class Zeroing(AttentionInterpreter):
        def on_attention(self, node, arguments):
            q, _, v = arguments[:3]
            return torch.zeros(*q.shape[:-1], v.shape[-1])

    with torch.no_grad():
        expected = model(*args)
    dense = AttentionInterpreter(graph_module).run_batch(args, {})
    zeroed = Zeroing(graph_module).run_batch(args, {})
    assert torch.allclose(dense, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(zeroed, expected, atol=1e-3)


def test_non_finite_calibration_inputs_name_the_site_and_batch():
    _, args, graph_module, sites = _captured_manual_block()
    poisoned = (args[0].clone(),)
    poisoned[0][0, 0, 0] = float("nan")
    with pytest.raises(SparsifyError, match=rf"calibration batch 3: the query of site {sites[0].name!r} holds NaN") as caught:
        ObservingInterpreter(graph_module, lambda *inputs: None, batch_index=3).run_batch(poisoned, {})
    assert "While executing" not in str(caught.value)
