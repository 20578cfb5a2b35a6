"""The diffusers door: `sparsify.attach` on transformers of pipelines — processors, denoising-step keys, both doors equal."""

from __future__ import annotations

import pytest
import torch

import sparsify
import tiny_pipelines
from helpers import call, first_tensor
from sparsify import StrategyError, UnsupportedError, patterns
from sparsify.integrations import attached_sites
from sparsify.integrations.diffusers import (
    DenoisingStepTracker,
    SparseAttentionProcessor,
    pipeline_forward_loop,
    step_tracker,
)

from backend_helpers import recorded_cuda_graphs, rel_err


WINDOW = patterns.sliding_window(32) | patterns.attention_sinks(16)


def _self_attention_strategy(sites, dense_steps=0):
    """Window + sinks on self-attention sites, cross attention dense."""
    strategy = sparsify.Strategy.dense(sites, block_size=16)
    for site in sites:
        if site.kind == "self":
            strategy = strategy.with_heads(site.name, [WINDOW] * site.num_heads, dense_steps=dense_steps)
    return strategy


def _dit_inputs():
    """Inputs of the tiny DiT pipeline's transformer: a CFG-sized batch of 2 latents, timesteps and labels."""
    return {"hidden_states": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([3, 7]),
            "class_labels": torch.tensor([1, 2])}


def _wan(sites_batch=2):
    pytest.importorskip("diffusers")  # the GPU machine has it only where the session installs its wheel
    model = tiny_pipelines.wan_transformer()
    inputs = tiny_pipelines.wan_inputs(batch=sites_batch)
    return model, inputs, sparsify.find_attention(model, inputs)


def _processors(model):
    return {name: module.processor for name, module in model.named_modules() if hasattr(module, "set_processor")}


def test_both_doors_give_the_same_outputs_on_wan_and_dit():
    model, inputs, sites = _wan()
    strategy = _self_attention_strategy(sites)
    attached = sparsify.attach(model, strategy)
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)
    fresh = tiny_pipelines.wan_inputs(seed=3, timestep=250)
    framework, graph = first_tensor(call(attached, fresh)), first_tensor(call(compiled, fresh))
    assert rel_err(framework, graph) < 1e-5
    assert rel_err(framework, first_tensor(call(model, fresh))) > 1e-3

    pipeline = tiny_pipelines.dit_pipeline()
    dit = pipeline.transformer
    dit_inputs = _dit_inputs()
    dit_sites = sparsify.find_attention(dit, dit_inputs)
    dit_strategy = sparsify.Strategy.uniform(dit_sites, WINDOW, block_size=16)
    assert rel_err(call(sparsify.attach(dit, dit_strategy), dit_inputs).sample,
                   first_tensor(call(sparsify.compile(dit, strategy=dit_strategy, example_inputs=dit_inputs),
                                     dit_inputs))) < 1e-5


def test_both_doors_agree_on_cogvideox_whose_processor_takes_rotary_embeddings():
    # diffusers' Attention passes a processor only the keyword arguments its __call__ declares: the
    # wrapper declares the wrapped processor's, so image_rotary_emb still arrives.
    model = tiny_pipelines.cogvideox_transformer()
    inputs = tiny_pipelines.cogvideox_inputs()
    sites = sparsify.find_attention(model, inputs)
    strategy = sparsify.Strategy.uniform(sites, WINDOW, block_size=16)
    attached = sparsify.attach(model, strategy)
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)
    fresh = tiny_pipelines.cogvideox_inputs(seed=4)
    framework = first_tensor(call(attached, fresh))
    assert rel_err(framework, first_tensor(call(compiled, fresh))) < 1e-5
    assert rel_err(framework, first_tensor(call(model, fresh))) > 1e-3
    without_rotary = dict(fresh, image_rotary_emb=None)
    assert rel_err(framework, first_tensor(call(attached, without_rotary))) > 1e-3


def test_attach_leaves_the_model_unchanged_and_shares_its_weights():
    model, inputs, sites = _wan()
    processors = _processors(model)
    before = first_tensor(call(model, inputs))
    attached = sparsify.attach(model, _self_attention_strategy(sites))
    call(attached, inputs)
    assert _processors(model) == processors                      # the very same processor objects
    assert torch.equal(first_tensor(call(model, inputs)), before)
    parameters = dict(model.named_parameters())
    assert all(parameter is parameters[name] for name, parameter in attached.named_parameters())
    assert set(attached.state_dict()) == set(model.state_dict())
    wrapped = {name for name, processor in _processors(attached).items()
               if isinstance(processor, SparseAttentionProcessor)}
    assert wrapped == {"blocks.0.attn1", "blocks.1.attn1"} == set(attached_sites(attached))


def test_dense_warm_up_steps_follow_the_denoising_step_not_the_call_count():
    """Wan runs guidance as two transformer calls per step: steps 0 and 1 must be dense, later ones sparse."""
    pipeline = tiny_pipelines.wan_pipeline()
    _, _, sites = _wan()

    def latents_per_step(transformer):
        pipeline.transformer = transformer
        seen = []

        def keep(pipe, step, timestep, tensors):
            seen.append(tensors["latents"].clone())
            return tensors

        with torch.no_grad():
            pipeline(**tiny_pipelines.wan_call(steps=4), callback_on_step_end=keep)
        return seen

    original = pipeline.transformer
    dense = latents_per_step(original)
    warm = sparsify.attach(original, _self_attention_strategy(sites, dense_steps=2))
    warmed = latents_per_step(warm)
    cold = latents_per_step(sparsify.attach(original, _self_attention_strategy(sites)))
    assert [torch.equal(a, b) for a, b in zip(dense, warmed)] == [True, True, False, False]
    assert not torch.equal(dense[0], cold[0])
    tracker = step_tracker(warm)
    assert tracker.step == 3
    latents_per_step(warm)                                        # a second generation starts at step 0 again
    assert tracker.step == 3
    assert [torch.equal(a, b) for a, b in zip(dense, latents_per_step(warm))] == [True, True, False, False]


def test_step_tracker_counts_steps_by_timestep():
    tracker = DenoisingStepTracker([1, 3])
    steps = []
    for timestep in (1000, 1000, 751, 751, 400, 9, 1000, torch.tensor([751.0, 751.0])):
        tracker.observe(timestep)
        steps.append(tracker.step)
    assert steps == [0, 0, 1, 1, 2, 3, 0, 1]
    assert tracker.dense_phase == {1: False, 3: True}


def test_a_cfg_batched_pipeline_runs_end_to_end():
    pipeline = tiny_pipelines.dit_pipeline()
    original = pipeline.transformer
    dit_inputs = _dit_inputs()
    sites = sparsify.find_attention(original, dit_inputs)

    def images(transformer, **kwargs):
        pipeline.transformer = transformer
        with torch.no_grad():
            return pipeline(class_labels=[1, 2], num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                            generator=torch.Generator().manual_seed(0), **kwargs).images

    reference = images(original)
    assert torch.equal(images(sparsify.attach(original, sparsify.Strategy.dense(sites, block_size=16))), reference)
    sparse = images(sparsify.attach(original, sparsify.Strategy.uniform(sites, WINDOW, block_size=16)))
    assert sparse.shape == reference.shape and torch.isfinite(sparse).all()
    assert not torch.equal(sparse, reference)


def test_calibration_through_the_pipeline_then_attach():
    pipeline = tiny_pipelines.wan_pipeline()
    original = pipeline.transformer
    loop = pipeline_forward_loop(pipeline, [tiny_pipelines.wan_call(seed=s, steps=2) for s in range(2)])
    compiled = sparsify.compile(original, loop, max_error=0.3, block_size=16, progress=False)
    assert pipeline.transformer is original                       # the loop put the component back
    assert len(compiled.strategy.sites) == 4
    pipeline.transformer = sparsify.attach(original, compiled.strategy)
    with torch.no_grad():
        latents = pipeline(**tiny_pipelines.wan_call(seed=5, steps=2)).frames
    assert torch.isfinite(latents).all()


def test_attached_transformer_compiles_without_graph_breaks():
    model, inputs, sites = _wan()
    attached = sparsify.attach(model, _self_attention_strategy(sites))
    with torch.no_grad():
        eager = first_tensor(attached(**inputs))
        explained = torch._dynamo.explain(attached)(**inputs)
        # AOTAutograd with the op's fake kernel (Inductor runs in the runtime and transformers tests).
        compiled = first_tensor(torch.compile(attached, fullgraph=True, backend="aot_eager")(**inputs))
    assert explained.graph_break_count == 0
    assert rel_err(compiled, eager) < 1e-5


def test_a_processor_that_does_not_call_sdpa_is_refused_by_site():
    from diffusers.models.attention_processor import AttnProcessor

    pipeline = tiny_pipelines.dit_pipeline()
    dit = pipeline.transformer
    dit_inputs = _dit_inputs()
    sites = sparsify.find_attention(dit, dit_inputs)
    dit.transformer_blocks[0].attn1.set_processor(AttnProcessor())    # baddbmm + softmax, no SDPA
    attached = sparsify.attach(dit, sparsify.Strategy.uniform(sites, WINDOW, block_size=16))
    with pytest.raises(UnsupportedError, match=r"'transformer_blocks\.0\.attn1'.*AttnProcessor.*scaled_dot_product"):
        call(attached, dit_inputs)


def test_a_processor_that_attends_twice_per_call_is_refused_by_site():
    # The strategy holds one site per module; a second attention in one processor call (e.g. an
    # IP-Adapter's over image keys) would run with no strategy of its own: refused, not run dense.
    from diffusers.models.attention_processor import AttnProcessor2_0

    class TwiceProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                     **kwargs):
            first = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            return first + super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    pipeline = tiny_pipelines.dit_pipeline()
    dit = pipeline.transformer
    dit_inputs = _dit_inputs()
    sites = sparsify.find_attention(dit, dit_inputs)
    dit.transformer_blocks[0].attn1.set_processor(TwiceProcessor())
    attached = sparsify.attach(dit, sparsify.Strategy.uniform(sites, WINDOW, block_size=16))
    with torch.no_grad(), pytest.raises(UnsupportedError,
                                        match=r"'transformer_blocks\.0\.attn1'.*TwiceProcessor.*more than once"):
        call(attached, dit_inputs)


def test_a_strategy_for_other_modules_is_refused_with_their_names():
    model, inputs, sites = _wan()
    other = sparsify.Strategy.dense(sparsify.find_attention(tiny_pipelines.dit_pipeline().transformer, _dit_inputs()))
    with pytest.raises(StrategyError, match=r"transformer_blocks\.0\.attn1"):
        sparsify.attach(model, other)
    document = _self_attention_strategy(sites).to_dict()
    document["fingerprint"] = [dict(entry, num_heads=4) if entry["name"] == "blocks.1.attn1" else entry
                               for entry in document["fingerprint"]]
    document["sites"]["blocks.1.attn1"]["heads"] *= 2
    with pytest.raises(StrategyError, match=r"'blocks\.1\.attn1'.*num_heads is 2 in the model but 4"):
        sparsify.attach(model, sparsify.Strategy.from_dict(document))


@pytest.mark.gpu
def test_attached_transformer_on_the_gpu_under_compile_equals_eager():
    # float32 throughout, and the triton kernel's float32 dots in full precision (TF32 only where torch's
    # matmul precision allows it): Inductor picks its reduction kernels by timing, so the attention inputs
    # differ from eager's by ~1e-7 from run to run, which TF32 rounding used to amplify to ~1e-3.
    torch._dynamo.reset()
    model, inputs, sites = _wan()
    model = model.cuda()
    gpu_inputs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    attached = sparsify.attach(model, _self_attention_strategy(sites), backend="triton")
    with torch.no_grad():
        eager = first_tensor(attached(**gpu_inputs)).clone()
        explained = torch._dynamo.explain(attached)(**gpu_inputs)
        compiled = first_tensor(torch.compile(attached, fullgraph=True)(**gpu_inputs))
        graph_door = first_tensor(call(sparsify.compile(model, strategy=_self_attention_strategy(sites),
                                                        example_inputs=gpu_inputs, backend="triton"), gpu_inputs))
        reference = first_tensor(call(sparsify.attach(model, _self_attention_strategy(sites), backend="torch"),
                                      gpu_inputs))
    assert explained.graph_break_count == 0
    assert rel_err(compiled, eager) < 1e-4
    assert rel_err(graph_door, eager) < 1e-4
    assert rel_err(eager, reference) < 1e-4                           # the triton kernel against the torch backend
    assert rel_err(eager, first_tensor(call(model, gpu_inputs))) > 1e-3     # and the strategy made a difference


@pytest.mark.gpu
def test_attached_transformer_under_cuda_graphs_equals_eager_and_captures_once():
    # The framework door under torch.compile(mode="reduce-overhead"): outputs equal eager, one graph, and
    # repeated calls replay the captured CUDA graph instead of capturing again.
    torch._dynamo.reset()
    model, inputs, sites = _wan()
    model = model.cuda()
    gpu_inputs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    attached = sparsify.attach(model, _self_attention_strategy(sites), backend="triton")
    with torch.no_grad():
        eager = first_tensor(attached(**gpu_inputs)).clone()
        torch._dynamo.utils.counters.clear()
        function = torch.compile(attached, mode="reduce-overhead", fullgraph=True)
        outputs = [first_tensor(function(**gpu_inputs)).clone() for _ in range(4)]
        recorded = recorded_cuda_graphs()
        outputs += [first_tensor(function(**gpu_inputs)).clone() for _ in range(4)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert recorded >= 1 and recorded_cuda_graphs() == recorded
    for output in outputs:
        assert rel_err(output, eager) < 1e-4
