"""export_onnx: the compiled graph runs in onnxruntime, sparse (block gather), and matches PyTorch."""

from __future__ import annotations

import pytest
import torch

import model_zoo
from helpers import call, max_relative_error
from sparsify import SparsifyError, Strategy, UnsupportedError, patterns
from sparsify.api import capture_attention, compile
from sparsify.runtime.site import SparseAttention
from sparsify.site import AttentionSite

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparsify import export as onnx_export  # noqa: E402

STANDARD_DOMAINS = {"", "ai.onnx"}


def mixed_strategy(sites, block_size: int = 16) -> Strategy:
    """Per site: head 0 dense, the others alternate window + sinks and a wider window; with 4+ heads the last is skipped."""
    strategy = Strategy.dense(sites, block_size=block_size)
    for site in sites:
        heads = [patterns.dense()] + [
            patterns.sliding_window(16) | patterns.attention_sinks(8) if h % 2 else patterns.sliding_window(24)
            for h in range(1, site.num_heads)
        ]
        if site.num_heads >= 4:
            heads[-1] = patterns.skip()
        strategy = strategy.with_heads(site.name, heads)
    return strategy


def compiled_with_mixed_strategy(name: str, **factory_kwargs):
    model, inputs = getattr(model_zoo, name)(**factory_kwargs)
    sites = capture_attention(model, inputs)[1]
    compiled = compile(model, strategy=mixed_strategy(sites), example_inputs=inputs, backend="torch")
    return model, inputs, compiled


def feeds(result, inputs) -> dict:
    tensors = inputs.values() if isinstance(inputs, dict) else inputs
    return {name: tensor.numpy() for name, tensor in zip(result.input_names, tensors)}


def batch_slice(inputs, stop: int):
    if isinstance(inputs, dict):
        return {name: value[:stop] for name, value in inputs.items()}
    return tuple(value[:stop] for value in inputs)


def softmax_widths(path) -> list[int]:
    """Last-dimension sizes of every Softmax input (after ONNX shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    return [shapes[node.input[0]][-1] for node in model.graph.node
            if node.op_type == "Softmax" and node.input[0] in shapes]


# ----------------------------------------------------------------------------------------------
# End to end: HF GPT2 (causal + padding), BERT (padding), ViT (partial last block), diffusers DiT.
# GQA, causal partial blocks and every mask layout are covered on the lowering itself below.


@pytest.mark.parametrize("name, factory_kwargs, seq", [
    ("gpt2", {}, 96),
    ("bert", {}, 96),
    ("vit", {"image": 96}, 145),    # 12 x 12 patches + CLS: a partial last block
    ("dit", {"sample": 24}, 144),
])
def test_exported_model_matches_compiled_module_in_onnxruntime(tmp_path, name, factory_kwargs, seq):
    model, inputs, compiled = compiled_with_mixed_strategy(name, **factory_kwargs)
    path = tmp_path / f"{name}.onnx"
    result = onnx_export.export_onnx(compiled, inputs, path)

    exported = onnx.load(str(path))
    onnx.checker.check_model(exported, full_check=True)
    assert {node.domain for node in exported.graph.node} <= STANDARD_DOMAINS and not exported.functions
    assert result.sparse_sites == len(compiled.sites) and result.seq_lengths
    assert all(lengths == (seq, seq) for lengths in result.seq_lengths.values())

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = call(compiled, inputs)
    got = torch.from_numpy(session.run(None, feeds(result, inputs))[0])
    assert max_relative_error(got, expected) <= 1e-4
    # The sparsity is real: the compiled output differs from the dense model...
    assert max_relative_error(expected, call(model, inputs)) > 1e-4
    # ...and the sparse heads' softmax runs over the kept blocks only, narrower than the sequence.
    widths = softmax_widths(path)
    assert widths and min(widths) < seq

    # Batch is dynamic.
    one = batch_slice(inputs, 1)
    got_one = torch.from_numpy(session.run(None, feeds(result, one))[0])
    assert got_one.shape[0] == 1 and max_relative_error(got_one, call(compiled, one)) <= 1e-4

    # Sequence length is fixed at export: the metadata says so and onnxruntime refuses another.
    metadata = {prop.key: prop.value for prop in exported.metadata_props}
    assert str(seq) in metadata["sparsify.fixed_lengths"]
    if name in ("gpt2", "bert"):
        longer = {key: torch.cat([value, value], dim=1) for key, value in inputs.items()}
        with pytest.raises(Exception, match="invalid dimensions"):
            session.run(None, feeds(result, longer))


# ----------------------------------------------------------------------------------------------
# The lowering itself against SparseAttention (no ONNX; many shapes, fast)


def _masks(kind: str, batch: int, heads: int, length: int):
    generator = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    if kind == "key_padding":                 # BERT-style bool [B, 1, 1, S]
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        mask[-1, ..., length - 11:] = False
        return mask
    if kind == "per_head_additive":           # additive bias [B, H, S, S]
        return torch.randn(batch, heads, length, length, generator=generator)
    mask = torch.rand(batch, 1, length, length, generator=generator) > 0.3   # bool [B, 1, S, S]
    mask[0, 0, 3] = False                     # a query that sees no key: zeros, not NaN
    return mask


@pytest.mark.parametrize("kv_heads, length", [(4, 96), (2, 83)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "per_head_additive", "query_varying_bool"])
def test_block_gather_lowering_equals_sparse_attention(kv_heads, causal, length, mask_kind):
    site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=kv_heads, head_dim=16, q_len=length, k_len=length,
                         causal=causal)
    head_patterns = [patterns.sliding_window(20), patterns.dense(),
                     patterns.attention_sinks(16) | patterns.sliding_window(8), patterns.sliding_window(50)]
    layer = SparseAttention(site, head_patterns, block_size=16, backend="torch")
    lowered = onnx_export.BlockGatherAttention(layer, length, length)
    q = torch.randn(2, 4, length, 16)
    k, v = torch.randn(2, kv_heads, length, 16), torch.randn(2, kv_heads, length, 16)
    mask = _masks(mask_kind, 2, 4, length)
    expected = layer(q, k, v, mask, causal, None)
    got = lowered(q, k, v, mask, causal, None)
    assert not got.isnan().any()
    assert max_relative_error(got, expected) <= 1e-5


def test_dense_lowering_equals_sdpa_with_masks_and_gqa():
    q, k, v = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    mask = torch.rand(2, 1, 40, 40) > 0.5
    mask[1, 0, 5] = False
    for attn_mask, causal in ((None, True), (mask, False), (mask, True), (torch.randn(2, 4, 40, 40), False)):
        expected = torch.ops.sparsify.attention(q, k, v, attn_mask, causal, 0.3)
        got = onnx_export.dense_attention_lowering(q, k, v, attn_mask, causal, 0.3)
        assert max_relative_error(got, expected) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Errors


def test_exporting_an_uncompiled_model_says_to_compile_first(tmp_path):
    model, inputs = model_zoo.transformer_encoder()
    with pytest.raises(SparsifyError, match="sparsify.compile first"):
        onnx_export.export_onnx(model, inputs, tmp_path / "plain.onnx")


def test_backend_without_onnx_lowering_is_named(tmp_path, monkeypatch):
    _, inputs, compiled = compiled_with_mixed_strategy("transformer_encoder")
    monkeypatch.delitem(onnx_export._LOWERINGS, "block_gather")  # the lowering the torch backend declares
    with pytest.raises(UnsupportedError, match="backend 'torch', which has no ONNX lowering"):
        onnx_export.export_onnx(compiled, inputs, tmp_path / "model.onnx")


@pytest.mark.parametrize("opset, message", [(13, "opset 13 is too old"), (10_000, "newer than the installed onnx")])
def test_unsupported_opset_is_explained(tmp_path, opset, message):
    _, inputs, compiled = compiled_with_mixed_strategy("transformer_encoder")
    with pytest.raises(UnsupportedError, match=message):
        onnx_export.export_onnx(compiled, inputs, tmp_path / "model.onnx", opset=opset)


def test_dynamic_sequence_is_refused_for_sparse_sites(tmp_path):
    _, inputs, compiled = compiled_with_mixed_strategy("transformer_encoder")
    with pytest.raises(UnsupportedError, match="fixed at export"):
        onnx_export.export_onnx(compiled, inputs, tmp_path / "model.onnx", dynamic_seq=True)


def test_all_dense_model_exports_with_dynamic_sequence(tmp_path):
    model, inputs = model_zoo.transformer_encoder(seq=48)
    sites = capture_attention(model, inputs)[1]
    compiled = compile(model, strategy=Strategy.dense(sites), example_inputs=inputs)
    result = onnx_export.export_onnx(compiled, inputs, tmp_path / "dense.onnx", dynamic_seq=True)
    assert result.sparse_sites == 0 and result.dense_sites == len(sites)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for seq in (48, 70):
        x = torch.randn(3, seq, 64)
        got = torch.from_numpy(session.run(None, {result.input_names[0]: x.numpy()})[0])
        assert max_relative_error(got, call(compiled, (x,))) <= 1e-4
