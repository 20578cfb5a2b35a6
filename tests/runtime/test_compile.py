"""`torch.compile` of sparse sites: no graph breaks, the kernel as one custom op, outputs and gradients equal to eager."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import sparsify
from sparsify import patterns
from sparsify.integrations.diffusers import DenoisingStepTracker
from sparsify.runtime import kernel_op
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite

from backend_helpers import mask_reference, recorded_cuda_graphs, rel_err

KERNEL_OP = "sparsify.block_sparse_attention"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(*, causal=True, length=128, backend="auto", dense_steps=0, step_counter=None):
    site = AttentionSite("blocks.0.attn", 0, num_heads=4, num_kv_heads=2, head_dim=16, q_len=length, k_len=length,
                         causal=causal)
    head_patterns = [patterns.dense(), patterns.sliding_window(24), patterns.skip(),
                     patterns.attention_sinks(16) | patterns.sliding_window(16)]
    return SparseAttention(site, head_patterns, block_size=16, backend=backend, dense_steps=dense_steps,
                           step_counter=step_counter)


def _qkv(gen, batch=2, q_len=128, k_len=None, dtype=torch.float32):
    k_len = k_len or q_len
    return (torch.randn(batch, 4, q_len, 16, generator=gen, dtype=dtype),
            torch.randn(batch, 2, k_len, 16, generator=gen, dtype=dtype),
            torch.randn(batch, 2, k_len, 16, generator=gen, dtype=dtype))


class _Graphs:
    """A dynamo backend that counts compiled graphs and the kernel ops in them, then runs them as they are."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def kernel_calls(self) -> int:
        return sum(str(node.target) == "sparsify.block_sparse_attention.default" or
                   str(node.target) == KERNEL_OP for gm in self.graphs for node in gm.graph.nodes)


def test_the_kernel_op_passes_torch_library_checks():
    gen = torch.Generator().manual_seed(0)
    layer = _layer()
    mask = layer.runtime_mask(128, 128, "cpu")
    q, k, v = _qkv(gen, q_len=128)
    q = q[:, :2].clone().requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    args = (q, k, v, None, mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
            mask.kv_head_index, mask.block_size, mask.q_len, mask.k_len, mask.causal, mask.q_offset, mask.per_input,
            None, None, None, "torch")
    torch.library.opcheck(kernel_op.block_sparse_attention, args)
    expected = mask_reference(q.detach(), k.detach(), v.detach(), mask)
    assert rel_err(torch.ops.sparsify.block_sparse_attention(*args).detach(), expected) < 1e-6


def test_a_compiled_site_has_no_graph_break_and_equals_eager_and_the_reference():
    gen = torch.Generator().manual_seed(1)
    layer = _layer()
    q, k, v = _qkv(gen)
    with torch.no_grad():
        eager = layer.attend(q, k, v, is_causal=True)
        graphs = _Graphs()
        compiled = torch.compile(lambda q, k, v: layer.attend(q, k, v, is_causal=True), backend=graphs, fullgraph=True)
        output = compiled(q, k, v)
    assert len(graphs.graphs) == 1 and graphs.kernel_calls() == 1
    assert rel_err(output, eager) < 1e-6
    sparse = layer.runtime_mask(128, 128, "cpu")
    expected = mask_reference(q.index_select(1, layer.sparse_heads), k, v, sparse)
    assert rel_err(output.index_select(1, layer.sparse_heads), expected) < 1e-6
    assert torch.equal(output[:, 2], torch.zeros_like(output[:, 2]))


def test_lengths_the_cache_lacks_are_built_while_tracing_without_a_graph_break():
    gen = torch.Generator().manual_seed(2)
    layer = _layer()
    # The query offset comes from the shapes, as the framework doors compute it (keys end at the last query).
    function = torch.compile(lambda q, k, v: layer.attend(q, k, v, is_causal=True, q_offset=k.shape[2] - q.shape[2]),
                             fullgraph=True)
    with torch.no_grad():
        for q_len, k_len in ((96, 96), (16, 160), (1, 161), (112, 112)):     # prefills, a chunk, a decode row
            q, k, v = _qkv(gen, q_len=q_len, k_len=k_len)
            assert (q_len, k_len, k_len - q_len, "cpu") not in layer._masks
            output = function(q, k, v)
            assert rel_err(output, layer.attend(q, k, v, is_causal=True, q_offset=k_len - q_len)) < 1e-6


@pytest.mark.parametrize("dynamic", [None, True])
def test_symbolic_lengths_specialise_without_a_graph_break(dynamic):
    gen = torch.Generator().manual_seed(6)
    layer = _layer()
    function = torch.compile(lambda q, k, v, offset: layer.attend(q, k, v, is_causal=True, q_offset=offset),
                             dynamic=dynamic, fullgraph=True)
    with torch.no_grad():
        for q_len, k_len in ((16, 160), (16, 176), (32, 192)):    # the int argument turns dynamic
            q, k, v = _qkv(gen, q_len=q_len, k_len=k_len)
            output = function(q, k, v, k_len - q_len)
            assert rel_err(output, layer.attend(q, k, v, is_causal=True, q_offset=k_len - q_len)) < 1e-6


def test_plans_are_prepared_once_per_mask_and_shape_under_compile():
    gen = torch.Generator().manual_seed(8)
    layer = _layer(backend="torch")
    backend = layer.backend_for(torch.float32, "cpu")            # the module's instance, which the kernel op runs
    prepared = []
    prepare = backend.prepare

    def counting_prepare(mask, **shapes):
        prepared.append((mask.q_len, shapes["q_shape"]))
        return prepare(mask, **shapes)

    backend.prepare = counting_prepare
    function = torch.compile(lambda q, k, v: layer.attend(q, k, v, is_causal=True), backend="aot_eager",
                             fullgraph=True)
    with torch.no_grad():
        for q_len in (128, 128, 128, 96, 96, 128):
            q, k, v = _qkv(gen, q_len=q_len)
            output = function(q, k, v)
            sparse = layer.runtime_mask(q_len, q_len, "cpu")
            expected = mask_reference(q.index_select(1, layer.sparse_heads), k, v, sparse)
            assert rel_err(output.index_select(1, layer.sparse_heads), expected) < 1e-6
    assert prepared == [(128, (2, 2, 128, 16)), (96, (2, 2, 96, 16))]     # once per (mask, shapes), not per call


def test_plans_are_prepared_while_dynamo_traces_not_on_the_first_compiled_call():
    # reduce-overhead's warm-up runs the first call inside a CUDA-graph pool: a plan prepared then would outlive it
    # untracked. The plan is prepared while dynamo traces, before any compiled backend runs the graph.
    gen = torch.Generator().manual_seed(9)
    layer = _layer(backend="torch")
    backend = layer.backend_for(torch.float32, "cpu")
    prepared, seen_by_the_compiler = [], []
    prepare = backend.prepare

    def counting_prepare(mask, **shapes):
        prepared.append(shapes["q_shape"])
        return prepare(mask, **shapes)

    def recording_backend(graph_module, example_inputs):
        seen_by_the_compiler.append(list(prepared))
        return graph_module.forward

    backend.prepare = counting_prepare
    function = torch.compile(lambda q, k, v: layer.attend(q, k, v, is_causal=True), backend=recording_backend,
                             fullgraph=True)
    q, k, v = _qkv(gen, q_len=64)
    with torch.no_grad():
        output = function(q, k, v)
    assert seen_by_the_compiler == [[(2, 2, 64, 16)]] and prepared == [(2, 2, 64, 16)]
    assert rel_err(output, layer.attend(q, k, v, is_causal=True)) < 1e-6


def test_compiled_training_matches_eager_gradients():
    gen = torch.Generator().manual_seed(3)
    layer = _layer(backend="torch")
    inputs = _qkv(gen, q_len=64, dtype=torch.float64)
    eager_inputs = [t.clone().requires_grad_() for t in inputs]
    compiled_inputs = [t.clone().requires_grad_() for t in inputs]
    eager = layer.attend(*eager_inputs, is_causal=True)
    eager.pow(2).sum().backward()
    function = torch.compile(lambda q, k, v: layer.attend(q, k, v, is_causal=True), fullgraph=True)
    output = function(*compiled_inputs)
    output.pow(2).sum().backward()
    assert rel_err(output.detach(), eager.detach()) < 1e-12
    for ours, expected in zip(compiled_inputs, eager_inputs):
        assert rel_err(ours.grad, expected.grad) < 1e-10


@pytest.mark.parametrize("adaptive", [patterns.pooled_coverage(0.9), patterns.estimated_vertical_slash(0.1, 0.1)])
def test_input_adaptive_heads_estimate_outside_the_graph_and_run_the_kernel_op_inside(adaptive):
    site = AttentionSite("blocks.0.attn", 0, num_heads=4, num_kv_heads=2, head_dim=16, q_len=128, k_len=128,
                         causal=True)
    layer = SparseAttention(site, [patterns.dense(), adaptive, patterns.sliding_window(24),
                                   adaptive | patterns.sliding_window(16)], block_size=16)
    gen = torch.Generator().manual_seed(7)
    q, k, v = _qkv(gen, q_len=112)
    with torch.no_grad():
        eager = layer.attend(q, k, v, is_causal=True)
        graphs = _Graphs()
        function = torch.compile(lambda q, k, v: layer.attend(q, k, v, is_causal=True), backend=graphs)
        output = function(q, k, v)
        explained = torch._dynamo.explain(lambda q, k, v: layer.attend(q, k, v, is_causal=True))(q, k, v)
    assert graphs.kernel_calls() == 2                   # the static heads and the adaptive heads
    assert explained.graph_break_count == 1             # the estimator
    assert rel_err(output, eager) < 1e-6


def test_user_masks_under_compile():
    gen = torch.Generator().manual_seed(4)
    layer = _layer(causal=False)
    q, k, v = _qkv(gen, q_len=80)
    keep = torch.ones(2, 1, 1, 80, dtype=torch.bool)
    keep[1, ..., 60:] = False
    with torch.no_grad():
        output = torch.compile(lambda *a: layer.attend(*a), fullgraph=True)(q, k, v, keep)
        assert rel_err(output, layer.attend(q, k, v, keep)) < 1e-6


def test_graph_door_module_compiles_whole_with_every_site_as_a_kernel_op():
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 192, 64)
    sites = sparsify.find_attention(model, (x,))
    strategy = sparsify.Strategy.uniform(sites, patterns.sliding_window(48) | patterns.attention_sinks(16),
                                         block_size=32)
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=(x,))
    fresh = torch.randn(2, 160, 64)                     # another length than the captured one
    with torch.no_grad():
        eager = compiled(fresh)
        graphs = _Graphs()
        output = torch.compile(compiled, backend=graphs, fullgraph=True)(fresh)
        explained = torch._dynamo.explain(compiled)(fresh)
        inductor = torch.compile(compiled)(fresh)
    assert explained.graph_break_count == 0
    assert graphs.kernel_calls() == len(sites)
    assert rel_err(output, eager) < 1e-5
    assert rel_err(inductor, eager) < 1e-5


def test_dense_steps_from_a_tracker_compile_two_variants_not_one_per_step():
    tracker = DenoisingStepTracker([2])
    layer = _layer(dense_steps=2, step_counter=tracker)
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(gen)
    counter = torch._dynamo.testing.CompileCounter()
    function = torch.compile(lambda q, k, v: layer.attend(q, k, v, is_causal=True), backend=counter, fullgraph=True)
    dense = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        for timestep in (999, 900, 800, 700, 600, 500):
            tracker.observe(timestep)
            output = function(q, k, v)
            if tracker.step < 2:
                reference = dense(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
            else:
                reference = layer.attend(q, k, v, is_causal=True)
            assert rel_err(output, reference) < 1e-6
    assert counter.frame_count == 2


def test_graph_door_compiles_once_however_many_calls():
    model = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 128, 64)
    sites = sparsify.find_attention(model, (x,))
    compiled = sparsify.compile(model, strategy=sparsify.Strategy.uniform(sites, patterns.sliding_window(32),
                                                                          block_size=32), example_inputs=(x,))
    counter = torch._dynamo.testing.CompileCounter()
    function = torch.compile(compiled, backend=counter)
    with torch.no_grad():
        for _ in range(4):                              # the step counter must not be a guard
            assert rel_err(function(x), compiled(x)) < 1e-6
    assert counter.frame_count == 1


def test_graph_door_dense_steps_under_compile_count_steps_outside_the_graph():
    model = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 128, 64)
    sites = sparsify.find_attention(model, (x,))
    strategy = sparsify.Strategy.uniform(sites, patterns.sliding_window(32), block_size=32)
    strategy = strategy.with_heads(sites[0].name, list(strategy.sites[sites[0].name].heads), dense_steps=2)
    eager = sparsify.compile(model, strategy=strategy, example_inputs=(x,), steps_per_generation=4)
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=(x,), steps_per_generation=4)
    counter = torch._dynamo.testing.CompileCounter()
    function = torch.compile(compiled, backend=counter)
    with torch.no_grad():
        outputs = [(function(x), eager(x)) for _ in range(8)]      # two generations of 4 steps
    assert all(rel_err(ours, expected) < 1e-6 for ours, expected in outputs)
    assert rel_err(outputs[0][1], outputs[2][1]) > 1e-3              # steps 0-1 dense, 2-3 sparse
    assert compiled.step_counter.step == eager.step_counter.step == 0
    assert counter.frame_count <= 4                                  # dense and sparse variants, not one per step


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "fa4", "flex"])
def test_gpu_backends_under_compile_equal_eager(backend):
    from sparsify.backends import get_backend

    if get_backend(backend).availability("cuda") is not None:
        pytest.skip(get_backend(backend).availability("cuda"))
    site = AttentionSite("attn", 0, num_heads=8, num_kv_heads=8, head_dim=128, q_len=2048, k_len=2048, causal=True)
    layer = SparseAttention(site, [patterns.sliding_window(256) | patterns.attention_sinks(128)] * 8, block_size=128,
                            backend=backend).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2048, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        eager = layer.attend(q, k, v, is_causal=True)
        graphs = _Graphs()
        output = torch.compile(lambda *a: layer.attend(*a, is_causal=True), backend=graphs, fullgraph=True)(q, k, v)
        inductor = torch.compile(lambda *a: layer.attend(*a, is_causal=True), fullgraph=True)(q, k, v)
    assert graphs.kernel_calls() == 1
    assert rel_err(output, eager) < 1e-3 and rel_err(inductor, eager) < 1e-3
    expected = mask_reference(q, k, v, layer.runtime_mask(2048, 2048, "cuda"))
    assert rel_err(eager, expected) < 1e-2                            # bf16 inputs, against float64


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "fa4"])
def test_graph_door_under_cuda_graphs_equals_eager_and_captures_once(backend):
    # torch.compile(mode="reduce-overhead") of a compiled module: CUDA graphs replay the kernel op
    # (its plan prepared in the warm-up, nothing on the host per replay), one graph, no re-capture.
    from sparsify.backends import get_backend

    if get_backend(backend).availability("cuda") is not None:
        pytest.skip(get_backend(backend).availability("cuda"))
    layer = torch.nn.TransformerEncoderLayer(256, 4, 512, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval().to("cuda", torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 1024, 256, generator=gen, device="cuda", dtype=torch.bfloat16)
    sites = sparsify.find_attention(model, (x,))
    strategy = sparsify.Strategy.uniform(sites, patterns.sliding_window(256) | patterns.attention_sinks(64),
                                         block_size=64)
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=(x,), backend=backend)
    with torch.no_grad():
        eager = compiled(x).clone()
        torch._dynamo.utils.counters.clear()
        function = torch.compile(compiled, mode="reduce-overhead", fullgraph=True)
        outputs = [function(x).clone() for _ in range(4)]          # warm-up, capture, replays
        recorded = recorded_cuda_graphs()
        outputs += [function(x).clone() for _ in range(4)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert recorded >= 1 and recorded_cuda_graphs() == recorded    # no re-capture per call
    for output in outputs:
        assert rel_err(output, eager) < 1e-2
    plans = {key[1] for site in compiled.modules() if isinstance(site, SparseAttention) for key in site._plans}
    assert plans == {backend}
