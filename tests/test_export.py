"""export_onnx: the compiled graph runs in onnxruntime, sparse (block gather), at any length, and matches PyTorch."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import model_zoo
from helpers import call, masked_attention_reference, max_relative_error
from sparsify import SparsifyError, Strategy, UnsupportedError, patterns
from sparsify.patterns import estimated_vertical_slash
from sparsify.api import capture_attention, compile
from sparsify.patterns import TracedBlockGrid
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparsify import export as onnx_export  # noqa: E402
from sparsify.onnx_lowering import (  # noqa: E402
    BlockGatherAttention,
    LoweringRequest,
    TracedBlockTables,
    attention_op_lowering,
    dense_attention_lowering,
)

STANDARD_DOMAINS = {"", "ai.onnx"}


def mixed_heads(num_heads: int) -> list:
    """Head 0 dense, the others alternate window + sinks and a wider window; with 3+ heads the last is skipped."""
    heads = [patterns.dense()] + [
        patterns.sliding_window(16) | patterns.attention_sinks(8) if h % 2 else patterns.sliding_window(24)
        for h in range(1, num_heads)
    ]
    if num_heads >= 3:
        heads[-1] = patterns.skip()
    return heads


def strategy_with(sites, heads_of, block_size: int = 16) -> Strategy:
    strategy = Strategy.dense(sites, block_size=block_size)
    for site in sites:
        strategy = strategy.with_heads(site.name, heads_of(site.num_heads))
    return strategy


def compiled_with(model, inputs, heads_of=mixed_heads, dynamic=True):
    sites = capture_attention(model, inputs, dynamic=dynamic)[1]
    return compile(model, strategy=strategy_with(sites, heads_of), example_inputs=inputs, backend="torch",
                   dynamic=dynamic)


def tensors_of(inputs) -> list[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return [value for value in values if isinstance(value, torch.Tensor)]


def feeds(result, inputs) -> dict:
    return {name: tensor.numpy() for name, tensor in zip(result.input_names, tensors_of(inputs))}


def session_of(result):
    return onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])


def onnx_output(session, result, inputs) -> torch.Tensor:
    return torch.from_numpy(session.run(None, feeds(result, inputs))[0])


def check_standard_file(result) -> onnx.ModelProto:
    exported = onnx.load(str(result.path))
    onnx.checker.check_model(exported, full_check=True)
    assert {node.domain for node in exported.graph.node} <= STANDARD_DOMAINS and not exported.functions
    return exported


# ----------------------------------------------------------------------------------------------
# Tiny one-layer models whose sequence length may change between calls (built from configs, random weights)


def gpt2(seq: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=4, n_embd=64, vocab_size=model_zoo.VOCAB, n_positions=512,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config).eval(), model_zoo._ids(2, seq, torch.Generator().manual_seed(seq))


def bert(seq: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=1, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                     vocab_size=model_zoo.VOCAB, max_position_embeddings=512,
                                     attn_implementation="sdpa")
    return transformers.BertModel(config).eval(), model_zoo._ids(2, seq, torch.Generator().manual_seed(seq))


def vit(image: int):
    """ViT configured for 64-pixel images, called at other sizes: its position embeddings are interpolated."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(num_hidden_layers=1, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                    image_size=64, patch_size=8, attn_implementation="sdpa")
    pixels = torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(image))
    return transformers.ViTModel(config).eval(), {"pixel_values": pixels, "interpolate_pos_encoding": True}


def sd3(sample: int):
    """diffusers' SD3 transformer (joint image + text attention; cropped position embeddings serve any size)."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                            caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
                                            pos_embed_max_size=32).eval()
    generator = torch.Generator().manual_seed(sample)
    return model, {"hidden_states": torch.randn(2, 4, sample, sample, generator=generator),
                   "encoder_hidden_states": torch.randn(2, 8, 32, generator=generator),
                   "pooled_projections": torch.randn(2, 32, generator=generator), "timestep": torch.tensor([3, 7])}


# ----------------------------------------------------------------------------------------------
# End to end: one file, any length. GPT-2 (causal + padding), BERT (padding), ViT (partial last
# block, interpolated positions), SD3 (joint attention); dense, sparse and skipped heads per site.


@pytest.mark.parametrize("factory, example, unseen, opset, dynamic", [
    (gpt2, 96, (40, 77, 130), None, True),
    (bert, 96, (33, 64, 150), 23, True),
    (vit, 96, (80, 112, 128), 23, "all"),      # 145 tokens at export; 101, 197, 257 after
    (sd3, 24, (20, 28, 32), 23, "all"),         # 152 tokens at export; 108, 204, 264 after
], ids=["gpt2", "bert", "vit", "sd3"])
def test_any_length_export_matches_compiled_module_at_unseen_lengths(tmp_path, factory, example, unseen, opset,
                                                                     dynamic):
    model, inputs = factory(example)
    compiled = compiled_with(model, inputs, dynamic=dynamic)
    result = onnx_export.export_onnx(compiled, inputs, tmp_path / "model.onnx", opset=opset)

    exported = check_standard_file(result)
    assert result.lengths == "any" and not result.pinned_sites and not result.seq_lengths
    assert result.sparse_sites == len(compiled.sites)
    metadata = {prop.key: prop.value for prop in exported.metadata_props}
    assert metadata["sparsify.lengths"].startswith("any")
    # Dense heads: ONNX's Attention op at opset 23, the MatMul/Softmax chain before it.
    operators = {node.op_type for node in exported.graph.node}
    if opset == 23:
        assert result.attention_ops >= len(compiled.sites) and "Attention" in operators
    else:
        assert result.attention_ops == 0 and "Attention" not in operators

    session = session_of(result)
    for length in unseen:
        _, other = factory(length)
        expected = call(compiled, other)
        assert max_relative_error(onnx_output(session, result, other), expected) <= 1e-4, length
        # The sparsity is real: the compiled output is not the dense model's.
        assert max_relative_error(expected, call(model, other)) > 1e-4
    # Batch is dynamic too.
    one = {key: value[:1] if isinstance(value, torch.Tensor) else value for key, value in factory(unseen[0])[1].items()}
    assert max_relative_error(onnx_output(session, result, one), call(compiled, one)) <= 1e-4


def test_fixed_length_export_rejects_other_lengths_and_narrows_softmax(tmp_path):
    model, inputs = gpt2(96)
    compiled = compiled_with(model, inputs)
    result = onnx_export.export_onnx(compiled, inputs, tmp_path / "fixed.onnx", lengths="fixed")
    check_standard_file(result)
    assert result.lengths == "fixed" and set(result.seq_lengths.values()) == {(96, 96)}
    session = session_of(result)
    assert max_relative_error(onnx_output(session, result, inputs), call(compiled, inputs)) <= 1e-4
    # The sparse heads' softmax runs over their kept blocks only, narrower than the sequence.
    shaped = onnx.shape_inference.infer_shapes(onnx.load(str(result.path)))
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim] for info in shaped.graph.value_info}
    widths = [shapes[node.input[0]][-1] for node in shaped.graph.node
              if node.op_type == "Softmax" and node.input[0] in shapes]
    assert widths and 0 < min(widths) < 96
    with pytest.raises(Exception):
        session.run(None, feeds(result, gpt2(64)[1]))


# ----------------------------------------------------------------------------------------------
# Table patterns pin the length: fixed by default, or a declared list


def top_k_heads(num_heads: int) -> list:
    table = [[0], [0, 1], [1, 2]]               # profiled at a 3 x 3 block grid
    return [patterns.dense(), patterns.block_top_k(table, 3, 3)] + [patterns.sliding_window(16)] * (num_heads - 2)


def test_table_pattern_pins_the_length_and_says_why(tmp_path, caplog):
    model, inputs = model_zoo.transformer_encoder(seq=48)
    compiled = compiled_with(model, inputs, heads_of=top_k_heads)
    with pytest.raises(UnsupportedError, match=r"lengths='any'.*pins the length.*block_top_k") as error:
        onnx_export.export_onnx(compiled, inputs, tmp_path / "any.onnx", lengths="any")
    assert compiled.sites[0].name in str(error.value) and not (tmp_path / "any.onnx").exists()

    with caplog.at_level(logging.WARNING, logger="sparsify.export"):
        result = onnx_export.export_onnx(compiled, inputs, tmp_path / "auto.onnx")
    assert result.lengths == "fixed" and set(result.pinned_sites) == {site.name for site in compiled.sites}
    assert all("block_top_k" in why and "head 1" in why for why in result.pinned_sites.values())
    assert "pins it" in caplog.text
    assert max_relative_error(onnx_output(session_of(result), result, inputs), call(compiled, inputs)) <= 1e-4


def test_table_pattern_serves_a_declared_list_of_lengths(tmp_path):
    model, inputs = model_zoo.transformer_encoder(seq=48)
    compiled = compiled_with(model, inputs, heads_of=top_k_heads)
    result = onnx_export.export_onnx(compiled, inputs, tmp_path / "listed.onnx", lengths=[40, 70])
    check_standard_file(result)
    assert result.lengths == "listed" and result.listed_lengths == [(40, 40), (48, 48), (70, 70)]
    session = session_of(result)
    for seq in (40, 48, 70):                      # the declared lengths and the example's
        x = (torch.randn(2, seq, 64),)
        assert max_relative_error(onnx_output(session, result, x), call(compiled, x)) <= 1e-4
    with pytest.raises(Exception):               # an undeclared length fails instead of computing garbage
        session.run(None, feeds(result, (torch.randn(2, 56, 64),)))


# ----------------------------------------------------------------------------------------------
# Precision


def single_attention_compiled(dtype: torch.dtype, heads_of=mixed_heads, seq: int = 80):
    class SingleAttention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    generator = torch.Generator().manual_seed(3)
    inputs = tuple(torch.randn(2, 4, seq, 16, generator=generator).to(dtype) for _ in range(3))
    return compiled_with(SingleAttention(), inputs, heads_of=heads_of, dynamic="all"), inputs


def test_float16_export_matches_compiled_module_at_any_length(tmp_path):
    compiled, inputs = single_attention_compiled(torch.float16)
    compiled_float32, _ = single_attention_compiled(torch.float32)     # the same strategy in float32
    result = onnx_export.export_onnx(compiled, inputs, tmp_path / "half.onnx", opset=23)
    exported = check_standard_file(result)
    assert result.dtype == "float16" and result.lengths == "any"
    assert exported.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    session = session_of(result)
    for seq in (50, 80, 131):
        generator = torch.Generator().manual_seed(seq)
        other = tuple(torch.randn(2, 4, seq, 16, generator=generator).half() for _ in range(3))
        got = onnx_output(session, result, other)
        assert got.dtype == torch.float16
        assert max_relative_error(got, call(compiled_float32, tuple(t.float() for t in other))) <= 5e-3
        assert max_relative_error(got, call(compiled, other)) <= 5e-3


def test_bfloat16_export_writes_a_bfloat16_graph_and_warns_about_the_cpu_provider(tmp_path, caplog):
    compiled, inputs = single_attention_compiled(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="sparsify.export"):
        result = onnx_export.export_onnx(compiled, inputs, tmp_path / "bf16.onnx")
    exported = check_standard_file(result)
    assert result.dtype == "bfloat16" and "no bfloat16 kernels" in caplog.text
    assert exported.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    try:
        session = session_of(result)
    except Exception:  # noqa: BLE001 - onnxruntime's CPU provider has no bfloat16 MatMul/Softmax (1.32)
        return
    # An onnxruntime whose CPU provider runs bfloat16 must match the compiled module.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    got = session.run(None, {name: t.float().numpy().astype(ml_dtypes.bfloat16)
                             for name, t in zip(result.input_names, inputs)})[0]
    got = torch.from_numpy(got.astype("float32"))
    assert max_relative_error(got, call(compiled, inputs).float()) <= 3e-2


def test_dtype_the_export_cannot_serve_is_refused_before_writing(tmp_path):
    compiled, inputs = single_attention_compiled(torch.float32)
    path = tmp_path / "model.onnx"
    with pytest.raises(UnsupportedError, match="dtype torch.int8 cannot be served.*float16"):
        onnx_export.export_onnx(compiled, inputs, path, dtype=torch.int8)
    with pytest.raises(UnsupportedError, match=r"dtype=float16.*computes in float32.*model.to\(torch.float16\)"):
        onnx_export.export_onnx(compiled, inputs, path, dtype="float16")
    assert not path.exists()
    assert onnx_export.export_onnx(compiled, inputs, path, dtype=torch.float32).dtype == "float32"


# ----------------------------------------------------------------------------------------------
# Sites of dense and skipped heads only; input-adaptive heads


def dense_and_skip(num_heads: int) -> list:
    return [patterns.dense() if h % 2 == 0 else patterns.skip() for h in range(num_heads)]


@pytest.mark.parametrize("opset", [None, 23])
def test_site_of_dense_and_skipped_heads_only_exports_at_any_length(tmp_path, opset):
    compiled, inputs = single_attention_compiled(torch.float32, heads_of=dense_and_skip)
    result = onnx_export.export_onnx(compiled, inputs, tmp_path / "dense_skip.onnx", opset=opset)
    check_standard_file(result)
    assert result.lengths == "any" and (result.attention_ops == 1) == (opset == 23)
    session = session_of(result)
    for seq in (33, 80, 100):
        other = tuple(torch.randn(2, 4, seq, 16) for _ in range(3))
        got = onnx_output(session, result, other)
        q, k, v = other
        assert max_relative_error(got[:, 0::2], F.scaled_dot_product_attention(q, k, v)[:, 0::2]) <= 1e-4
        assert torch.equal(got[:, 1::2], torch.zeros_like(got[:, 1::2]))


def test_input_adaptive_heads_are_refused_naming_site_and_head(tmp_path):
    def with_adaptive(num_heads: int) -> list:
        heads = mixed_heads(num_heads)
        heads[2] = estimated_vertical_slash(vertical=0.2, slash=0.2)
        return heads

    compiled, inputs = single_attention_compiled(torch.float32, heads_of=with_adaptive)
    path = tmp_path / "adaptive.onnx"
    with pytest.raises(UnsupportedError, match=r"input-adaptive.*site '.*' head 2 \(estimated_vertical_slash.*"
                                               r"adaptive=False"):
        onnx_export.export_onnx(compiled, inputs, path)
    assert not path.exists()


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


LOWERING_PATTERNS = [patterns.sliding_window(20), patterns.dense(),
                     patterns.attention_sinks(16) | patterns.sliding_window(8), patterns.skip()]


@pytest.mark.parametrize("tables, lengths", [("fixed", (96,)), ("any", (96, 83, 130, 1))])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "per_head_additive", "query_varying_bool"])
def test_block_gather_lowering_equals_sparse_attention(tables, lengths, kv_heads, causal, mask_kind):
    site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=kv_heads, head_dim=16, q_len=96, k_len=96,
                         causal=causal)
    layer = SparseAttention(site, LOWERING_PATTERNS, block_size=16, backend="torch")
    lowered = BlockGatherAttention(layer, LoweringRequest(96, 96, tables=tables))
    for length in lengths:
        q = torch.randn(2, 4, length, 16)
        k, v = torch.randn(2, kv_heads, length, 16), torch.randn(2, kv_heads, length, 16)
        mask = _masks(mask_kind, 2, 4, length) if length > 11 else None
        expected = layer(q, k, v, mask, causal, None)
        got = lowered(q, k, v, mask, causal, None)
        assert not got.isnan().any()
        assert max_relative_error(got, expected) <= 1e-5, length


@pytest.mark.parametrize("tables", ["fixed", "any"])
@pytest.mark.parametrize("causal", [False, True])
def test_lowerings_honour_softcap_and_sinks(tables, causal):
    site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=2, head_dim=16, q_len=80, k_len=80, causal=causal)
    layer = SparseAttention(site, LOWERING_PATTERNS, block_size=16, backend="torch")
    lowered = BlockGatherAttention(layer, LoweringRequest(80, 80, tables=tables))
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 80, 16, generator=generator) * 3
    k, v = torch.randn(2, 2, 80, 16, generator=generator) * 3, torch.randn(2, 2, 80, 16, generator=generator)
    sinks = torch.randn(4, generator=generator)
    for softcap, sink_logits in ((5.0, None), (None, sinks), (5.0, sinks)):
        expected = layer(q, k, v, None, causal, None, softcap, sink_logits)
        got = lowered(q, k, v, None, causal, None, softcap, sink_logits)
        assert max_relative_error(got, expected) <= 1e-5
        dense = torch.ops.sparsify.attention(q, k, v, None, causal, None, softcap, sink_logits)
        for lowering in (dense_attention_lowering, attention_op_lowering):
            assert max_relative_error(lowering(q, k, v, None, causal, None, softcap, sink_logits), dense) <= 1e-5
    # The softcap and sinks change the result (the test would notice them being dropped).
    assert max_relative_error(lowered(q, k, v, None, causal, None, 5.0, sinks), lowered(q, k, v, None, causal, None)) > 1e-2


def test_dense_lowerings_equal_sdpa_with_masks_and_gqa():
    q, k, v = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    mask = torch.rand(2, 1, 40, 40) > 0.5
    mask[1, 0, 5] = False
    for attn_mask, causal in ((None, True), (mask, False), (mask, True), (torch.randn(2, 4, 40, 40), False)):
        expected = torch.ops.sparsify.attention(q, k, v, attn_mask, causal, 0.3)
        for lowering in (dense_attention_lowering, attention_op_lowering):
            got = lowering(q, k, v, attn_mask, causal, 0.3)
            # attention_op_lowering leaves a query that sees no key to the runtime (SDPA gives NaN there).
            keep = ~got.isnan().any(-1, keepdim=True)
            assert max_relative_error(torch.where(keep, got, 0), torch.where(keep, expected, 0)) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Patterns as tensor ops of the run-time length: the same blocks as block_mask, at every length


ANY_LENGTH_PATTERNS = [
    patterns.dense(), patterns.skip(), patterns.sliding_window(40), patterns.attention_sinks(20),
    patterns.a_shape(16, 48), patterns.last_tokens(24), patterns.multi_diagonal(48, width=4),
    patterns.multi_diagonal(32, width=2, count=2), patterns.strided(40, width=8), patterns.power_of_two(width=2),
    patterns.power_of_two(max_exponent=5), patterns.radial(32, 8), patterns.vertical_stripes([0.0, 0.37], width=12),
    patterns.vertical_slash([0.1, 0.5], [0, 64], width=8),
    patterns.sliding_window(32) | patterns.vertical_stripes([0.6]),
    patterns.radial(64) & patterns.strided(24, width=12),
]


@pytest.mark.parametrize("pattern", ANY_LENGTH_PATTERNS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_traced_block_mask_equals_block_mask_at_every_length(pattern, causal):
    assert pattern.fixed_length_reason() is None
    for q_len, k_len in ((1, 1), (16, 16), (17, 17), (100, 100), (257, 257), (40, 130), (130, 40)):
        grid = TracedBlockGrid(q_len, k_len, block_size=16, causal=causal, max_len=4096)
        expected = pattern.block_mask(grid.q_blocks, grid.k_blocks, block_size=16, causal=causal,
                                      q_len=q_len, k_len=k_len)
        traced = pattern.traced_block_mask(grid)
        assert torch.equal(traced, expected), (q_len, k_len)
        assert int(expected.sum(-1).max()) <= pattern.traced_row_bound(grid) <= grid.k_blocks


def test_traced_tables_keep_the_runtime_masks_blocks_and_compute_dense_reference():
    heads = [patterns.sliding_window(24), patterns.radial(16, 4), patterns.vertical_slash([0.25], [0], width=4)]
    tables = TracedBlockTables(heads, block_size=16, causal=True, max_len=4096)
    site = AttentionSite("attn", 0, num_heads=3, num_kv_heads=3, head_dim=8, q_len=70, k_len=70, causal=True)
    layer = SparseAttention(site, heads, block_size=16, backend="torch")
    lowered = BlockGatherAttention(layer, LoweringRequest(70, 70, tables="any", max_len=4096))
    for length in (70, 33, 161):
        kept = tables.kept(length, length)
        assert torch.equal(kept, layer.runtime_mask(length, length, "cpu").to_block_masks()[0])
        q, k, v = (torch.randn(1, 3, length, 8) for _ in range(3))
        keep = kept.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :length, :length]
        keep = keep & torch.ones(length, length, dtype=torch.bool).tril()
        reference = masked_attention_reference(q, k, v, keep[None])
        assert max_relative_error(lowered(q, k, v, None, True, None), reference) <= 1e-5


def test_table_patterns_say_why_they_pin_the_length():
    pattern = patterns.block_top_k([[0], [1]], 2, 2)
    assert "block_top_k" in pattern.fixed_length_reason()
    assert "block_top_k" in (patterns.sliding_window(16) | pattern).fixed_length_reason()
    with pytest.raises(Exception, match="no any-length lowering"):
        pattern.traced_block_mask(TracedBlockGrid(64, 64, block_size=16))


# ----------------------------------------------------------------------------------------------
# Errors


def test_exporting_an_uncompiled_model_says_to_compile_first(tmp_path):
    model, inputs = model_zoo.transformer_encoder()
    with pytest.raises(SparsifyError, match="sparsify.compile first"):
        onnx_export.export_onnx(model, inputs, tmp_path / "plain.onnx")


@pytest.fixture(scope="module")
def compiled_encoder():
    model, inputs = model_zoo.transformer_encoder()
    return compiled_with(model, inputs), inputs


def test_backend_without_onnx_lowering_is_named(tmp_path, monkeypatch, compiled_encoder):
    compiled, inputs = compiled_encoder
    monkeypatch.delitem(onnx_export._LOWERINGS, "block_gather")  # the lowering the torch backend declares
    with pytest.raises(UnsupportedError, match="backend 'torch', which has no ONNX lowering"):
        onnx_export.export_onnx(compiled, inputs, tmp_path / "model.onnx")


@pytest.mark.parametrize("arguments, message", [
    ({"opset": 13}, "opset 13 is too old"),
    ({"opset": 10_000}, "newer than the installed onnx"),
    ({"lengths": "dynamic"}, "unknown lengths 'dynamic'; known: auto, any, fixed"),
    ({"lengths": [0]}, "neither a positive int"),
    ({"lengths": [4096], "max_seq_len": 1024}, "longer than max_seq_len=1024"),
    ({"max_seq_len": 0}, "max_seq_len must be a positive int"),
])
def test_bad_arguments_are_explained_before_any_work(tmp_path, arguments, message, compiled_encoder):
    compiled, inputs = compiled_encoder
    with pytest.raises(UnsupportedError, match=message):
        onnx_export.export_onnx(compiled, inputs, tmp_path / "model.onnx", **arguments)
    assert not (tmp_path / "model.onnx").exists()


def test_all_dense_model_exports_at_any_length(tmp_path):
    model, inputs = model_zoo.transformer_encoder(seq=48)
    sites = capture_attention(model, inputs)[1]
    compiled = compile(model, strategy=Strategy.dense(sites), example_inputs=inputs)
    result = onnx_export.export_onnx(compiled, inputs, tmp_path / "dense.onnx")
    assert result.sparse_sites == 0 and result.dense_sites == len(sites) and result.lengths == "any"
    session = session_of(result)
    for seq in (48, 70):
        x = torch.randn(3, seq, 64)
        assert max_relative_error(onnx_output(session, result, (x,)), call(compiled, (x,))) <= 1e-4
