"""sparsify.compile end to end: dense strategies reproduce the model, sparse ones fire, bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

import model_zoo
from helpers import call, max_relative_error
import sparsify
from sparsify import NoAttentionFoundError, SparsifyError, Strategy, StrategyError, patterns

MODELS = ["gpt2", "llama", "llama_eager", "bert", "vit", "dit", "transformer_encoder", "multihead", "manual", "video"]


@pytest.mark.parametrize("name", MODELS)
def test_dense_strategy_reproduces_the_model(name):
    model, inputs = getattr(model_zoo, name)()
    sites = sparsify.find_attention(model, inputs)
    compiled = sparsify.compile(model, strategy=Strategy.dense(sites), example_inputs=inputs)
    assert isinstance(compiled.strategy, Strategy) and compiled.rewritten_sites == 0
    assert max_relative_error(call(compiled, inputs), call(model, inputs)) <= 1e-5


def test_compiled_model_serves_other_batch_and_sequence_lengths():
    model, inputs = model_zoo.llama(seq=96)
    sites = sparsify.find_attention(model, inputs)
    strategy = Strategy.uniform(sites, patterns.sliding_window(1000), block_size=16)  # covers every key: dense
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)
    assert compiled.rewritten_sites == 2
    other, other_inputs = model_zoo.llama(seq=150, batch=3, seed=1)
    assert max_relative_error(call(compiled, other_inputs), call(model, other_inputs)) <= 1e-5


def test_strategy_round_trips_through_a_file(tmp_path):
    model, inputs = model_zoo.bert()
    sites = sparsify.find_attention(model, inputs)
    strategy = Strategy.uniform(sites, patterns.sliding_window(32) | patterns.attention_sinks(16), block_size=16)
    path = tmp_path / "strategy.json"
    strategy.save(path)
    from_object = sparsify.compile(model, strategy=strategy, example_inputs=inputs)
    from_file = sparsify.compile(model, strategy=str(path), example_inputs=inputs)
    assert from_file.strategy == strategy
    assert torch.equal(call(from_file, inputs).last_hidden_state, call(from_object, inputs).last_hidden_state)


def test_compile_leaves_the_user_model_untouched():
    model, inputs = model_zoo.gpt2()
    before = call(model, inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    sites = sparsify.find_attention(model, inputs)
    compiled = sparsify.compile(model, strategy=Strategy.uniform(sites, patterns.sliding_window(16), block_size=16),
                                example_inputs=inputs)
    assert compiled is not model
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(call(model, inputs).logits, before)


def test_report_lists_every_site():
    model, inputs = model_zoo.manual()
    sites = sparsify.find_attention(model, inputs)
    compiled = sparsify.compile(model, strategy=Strategy.uniform(sites, patterns.sliding_window(16), block_size=16),
                                example_inputs=inputs)
    report = compiled.report()
    assert "attention" in report and "sliding_window(16)" in report


def test_compile_without_strategy_or_data_says_what_to_do():
    model, inputs = model_zoo.manual()
    with pytest.raises(SparsifyError, match="needs calibration data"):
        sparsify.compile(model)


def test_compile_with_mismatched_strategy_file(tmp_path):
    model, inputs = model_zoo.bert()
    other = sparsify.find_attention(*model_zoo.gpt2())
    path = tmp_path / "gpt2.json"
    Strategy.dense(other).save(path)
    with pytest.raises(StrategyError) as failure:
        sparsify.compile(model, strategy=path, example_inputs=inputs)
    assert "gpt2.json" in str(failure.value) and "encoder.layer.0.attention.self" in str(failure.value)


def test_compile_with_malformed_strategy_file(tmp_path):
    model, inputs = model_zoo.bert()
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StrategyError, match="broken.json"):
        sparsify.compile(model, strategy=path, example_inputs=inputs)


def test_model_without_attention_fails_before_anything_else():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    site = sparsify.AttentionSite("attention", 0, num_heads=1, num_kv_heads=1, head_dim=8, q_len=4, k_len=4)
    with pytest.raises(NoAttentionFoundError):
        sparsify.compile(model, strategy=Strategy.dense([site]), example_inputs=(torch.randn(2, 8),))


def test_unknown_backend_lists_the_known_ones():
    model, inputs = model_zoo.manual()
    sites = sparsify.find_attention(model, inputs)
    with pytest.raises(SparsifyError, match="known: .*torch"):
        sparsify.compile(model, strategy=Strategy.uniform(sites, patterns.sliding_window(16), block_size=16),
                         example_inputs=inputs, backend="cuda_magic")


def test_fixed_keyword_arguments_are_checked():
    model, inputs = model_zoo.gpt2()
    sites = sparsify.find_attention(model, inputs)
    compiled = sparsify.compile(model, strategy=Strategy.dense(sites), example_inputs=inputs)
    with pytest.raises(SparsifyError, match="use_cache"):
        compiled(**inputs, use_cache=True)


def test_batch_one_capture_serves_other_batches_and_mismatched_calls_are_explained():
    layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True)  # left in training mode
    x = torch.randn(1, 128, 64)
    sites = sparsify.find_attention(layer, (x,))
    compiled = sparsify.compile(layer, strategy=Strategy.uniform(sites, patterns.sliding_window(32), block_size=32),
                                example_inputs=(x,))
    assert layer.training and all(module.training for module in layer.modules())  # flags restored
    assert compiled(torch.randn(3, 128, 64)).shape == (3, 128, 64)
    compiled.eval()
    with pytest.raises(sparsify.errors.InputError, match="captured for calls like"):
        compiled(torch.randn(2, 128, 64), torch.randn(3))


def test_forward_loop_may_touch_model_attributes_and_update_inputs_in_place():
    model, (x,) = model_zoo.manual(seq=64)

    def forward_loop(module):
        latent = x.clone()
        for _ in range(3):
            assert module.heads == 4  # attributes of the user's model are reachable
            module(latent)
            latent.mul_(0.5)

    from sparsify.search import collect_batches

    batches = collect_batches(model, forward_loop)
    assert not torch.equal(batches[0][0][0], batches[1][0][0])
    compiled = sparsify.compile(model, forward_loop, strategy=Strategy.dense(sparsify.find_attention(model, (x,))))
    assert compiled.rewritten_sites == 0


def test_compile_does_not_touch_the_global_random_generator():
    model, (x,) = model_zoo.manual(seq=64)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    sparsify.compile(model, [x, x + 1, x - 1], progress=False)
    assert torch.equal(torch.rand(1), expected)


# -- training mode, options, early checks (issue 11) ----------------------------------------------

def test_compiled_module_refuses_training_mode_when_dropout_would_be_lost():
    layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True, dropout=0.1)
    x = torch.randn(2, 64, 64)
    sites = sparsify.find_attention(layer, (x,))
    compiled = sparsify.compile(layer, strategy=Strategy.uniform(sites, patterns.sliding_window(16), block_size=16),
                                example_inputs=(x,))
    assert not compiled.training and compiled.training_differs  # starts in eval mode: the graph is the eval graph
    compiled(x)
    compiled.train()
    with pytest.raises(SparsifyError, match="training mode.*dropout.*compiled.eval"):
        compiled(x)
    compiled.eval()
    assert compiled(x).shape == x.shape
    assert layer.training  # the user's model keeps its own flags


def test_training_mode_runs_when_the_model_has_no_train_only_behaviour():
    model, (x,) = model_zoo.video()
    sites = sparsify.find_attention(model, (x,))
    compiled = sparsify.compile(model, strategy=Strategy.dense(sites), example_inputs=(x,))
    assert not compiled.training_differs
    expected = call(compiled, (x,))
    compiled.train()
    assert torch.equal(call(compiled, (x,)), expected)


def test_training_mode_check_leaves_batch_norm_statistics_and_random_streams_alone():
    from sparsify.api import training_changes_outputs

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = ((torch.randn(8, 4),), {})
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    assert training_changes_outputs(model, batch)
    assert torch.equal(torch.rand(1), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_unknown_option_names_are_refused_with_a_suggestion():
    model, inputs = model_zoo.manual()
    with pytest.raises(SparsifyError, match="unknown option 'max_eror' \\(did you mean 'max_error'\\?\\)"):
        sparsify.compile(model, [inputs], max_eror=0.1)
    sites = sparsify.find_attention(model, inputs)
    with pytest.raises(SparsifyError, match="max_error shape a search and have no effect"):
        sparsify.compile(model, strategy=Strategy.dense(sites), example_inputs=inputs, max_error=0.1)


def test_options_object_and_keywords_share_one_set_of_defaults():
    import inspect

    from sparsify.options import CompileOptions

    signature = inspect.signature(sparsify.compile)
    # compile's signature holds no option defaults of its own: they all live in CompileOptions.
    assert not set(signature.parameters) & {f for f in CompileOptions.__dataclass_fields__}
    options = CompileOptions(max_error=0.1)
    assert CompileOptions.from_keywords({"block_size": 32}, options) == CompileOptions(max_error=0.1, block_size=32)
    with pytest.raises(dataclasses_frozen_error()):
        options.max_error = 0.2


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_an_unavailable_backend_fails_before_any_calibration_call():
    model, (x,) = model_zoo.manual(seq=64)
    calls = []

    def forward_loop(module):
        calls.append(1)
        module(x)

    from sparsify.backends import backend_names, get_backend

    backend = next((name for name in backend_names() if get_backend(name).availability() is not None), None)
    if backend is None:
        pytest.skip("every registered backend can run here: nothing to refuse")
    with pytest.raises(sparsify.UnsupportedError, match=f"backend '{backend}' is not available"):
        sparsify.compile(model, forward_loop, backend=backend)
    assert calls == []  # refused before the calibration loop ran


def test_a_missing_hardware_profile_fails_before_calibration(tmp_path):
    model, (x,) = model_zoo.manual(seq=64)
    with pytest.raises(SparsifyError, match="hardware_profiles: .*missing.json' is not a file"):
        sparsify.compile(model, [x, x], hardware_profiles=[str(tmp_path / "missing.json")])


def test_calls_of_another_shape_are_explained_without_torch_internals():
    model, (x,) = model_zoo.manual(seq=64)
    sites = sparsify.find_attention(model, (x,))
    compiled = sparsify.compile(model, strategy=Strategy.dense(sites), example_inputs=(x,))
    with pytest.raises(sparsify.errors.InputError) as failure:
        compiled(torch.randn(1, 64, 32))
    message = str(failure.value)
    assert "dimension 2 is 32, but the graph was captured with it fixed at 64" in message
    assert "Guard failed" not in message and "size()" not in message
    with pytest.raises(sparsify.errors.InputError, match="dtype torch.float64"):
        compiled(torch.randn(1, 64, 64, dtype=torch.float64))
