"""The transformers door: `sparsify.attach` on PreTrainedModels — generate, both doors equal, the user's model untouched."""

from __future__ import annotations

import inspect

import pytest
import torch

import model_zoo
import sparsify
from helpers import call, first_tensor
from sparsify import StrategyError, UnsupportedError, patterns
from sparsify.integrations import attached_sites
from sparsify.integrations.transformers import ATTENTION_IMPLEMENTATION, cache_keyword, returned_cache

from backend_helpers import rel_err

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

WINDOW = patterns.sliding_window(32) | patterns.attention_sinks(16)


def _mixed(sites, block_size=16):
    """Per site: one dense head, a skipped head where there are 4+, the rest window + sinks."""
    strategy = sparsify.Strategy.dense(sites, block_size=block_size)
    for site in sites:
        heads = [patterns.dense()] + [WINDOW] * (site.num_heads - 1)
        if site.num_heads >= 4:
            heads[2] = patterns.skip()
        strategy = strategy.with_heads(site.name, heads)
    return strategy


def _generate(model, ids, mask=None, new_tokens=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_dense_strategy_generates_exactly_the_original_tokens(name):
    model, inputs = getattr(model_zoo, name)(seq=48, batch=2)
    sites = sparsify.find_attention(model, inputs)
    attached = sparsify.attach(model, sparsify.Strategy.dense(sites, block_size=16))
    assert attached.config._attn_implementation == ATTENTION_IMPLEMENTATION
    ids = inputs["input_ids"]
    assert torch.equal(_generate(attached, ids[:1]), _generate(model, ids[:1]))
    # A padded batch (left padding, as generate wants it) too.
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    assert torch.equal(_generate(attached, ids, mask), _generate(model, ids, mask))


def test_attach_leaves_the_model_unchanged_and_shares_its_weights():
    model, inputs = model_zoo.llama(seq=64)
    before = call(model, inputs).logits
    modules_before = [name for name, _ in model.named_modules()]
    sites = sparsify.find_attention(model, inputs)
    attached = sparsify.attach(model, _mixed(sites))
    call(attached, inputs)
    assert model.config._attn_implementation == "sdpa"
    assert [name for name, _ in model.named_modules()] == modules_before
    assert torch.equal(call(model, inputs).logits, before)
    model_parameters = dict(model.named_parameters())
    for name, parameter in attached.named_parameters():
        assert parameter is model_parameters[name], name
    assert set(attached.state_dict()) == set(model.state_dict())   # the sites' buffers are not state
    assert sorted(attached_sites(attached)) == sorted(site.name for site in sites)
    assert attached_sites(model) == {}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_both_doors_give_the_same_outputs(name):
    model, inputs = getattr(model_zoo, name)(seq=96, batch=2)     # the second row is right-padded
    sites = sparsify.find_attention(model, inputs)
    strategy = _mixed(sites)
    attached = sparsify.attach(model, strategy)
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)
    gen = torch.Generator().manual_seed(7)
    fresh = dict(inputs, input_ids=torch.randint(0, model_zoo.VOCAB, inputs["input_ids"].shape, generator=gen))
    through_graph = first_tensor(call(compiled, fresh))
    through_framework = call(attached, dict(fresh, use_cache=False)).logits
    dense = call(model, fresh).logits
    assert rel_err(through_framework, through_graph) < 1e-5
    assert rel_err(through_framework, dense) > 1e-3               # the strategy really is sparse


def test_sparse_generate_prefills_sparse_and_decodes_dense():
    model, inputs = model_zoo.llama(seq=96, batch=1)
    sites = sparsify.find_attention(model, inputs)
    attached = sparsify.attach(model, sparsify.Strategy.uniform(sites, WINDOW, block_size=16))
    ids = inputs["input_ids"]
    tokens = _generate(attached, ids, new_tokens=6)
    assert tokens.shape == (1, 96 + 6)
    for runtime in attached_sites(attached).values():
        shapes = {key[3] for key in runtime._plans}                   # query shapes the backend ran
        assert shapes == {(1, 4, 96, 16)}                             # the prefill only
        assert runtime.runtime_mask(96, 96, "cpu").block_fraction() < 0.8
    # The prefill's logits are the graph door's.
    compiled = sparsify.compile(model, strategy=sparsify.Strategy.uniform(sites, WINDOW, block_size=16),
                                example_inputs=inputs)
    assert rel_err(call(attached, dict(inputs, use_cache=False)).logits, first_tensor(call(compiled, inputs))) < 1e-5


def test_sparse_decode_rows_equal_the_rows_of_the_full_sequence():
    model, inputs = model_zoo.llama(seq=80, batch=1)
    sites = sparsify.find_attention(model, inputs)
    attached = sparsify.attach(model, sparsify.Strategy.uniform(sites, WINDOW, block_size=16), decode="sparse")
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = attached(ids, use_cache=False).logits                           # one call, every row
        cache = returned_cache(attached(ids[:, :64], use_cache=True))  # prefill 64 tokens (a DynamicCache)
        rows = []
        for position in range(64, 80):                                          # then one token at a time
            step = attached(ids[:, position:position + 1], **{cache_keyword(attached): cache}, use_cache=True)
            cache = returned_cache(step)
            rows.append(step.logits[:, -1])
    decode_offsets = {key[2] for runtime in attached_sites(attached).values() for key in runtime._masks}
    assert set(range(64, 80)) <= decode_offsets                                 # decode ran the pattern's rows
    assert rel_err(torch.stack(rows, 1), full[:, 64:80]) < 1e-5


def test_strategy_of_another_model_is_refused_with_the_names_that_do_not_match():
    llama, llama_inputs = model_zoo.llama(seq=48)
    gpt2, gpt2_inputs = model_zoo.gpt2(seq=48)
    gpt2_strategy = sparsify.Strategy.dense(sparsify.find_attention(gpt2, gpt2_inputs))
    with pytest.raises(StrategyError, match=r"transformer\.h\.0\.attn"):
        sparsify.attach(llama, gpt2_strategy)
    sites = sparsify.find_attention(llama, llama_inputs)
    wrong = sparsify.Strategy.from_dict({**sparsify.Strategy.dense(sites).to_dict(),
                                         "fingerprint": [dict(entry, head_dim=32) for entry in
                                                         sparsify.Strategy.dense(sites).to_dict()["fingerprint"]]})
    with pytest.raises(StrategyError, match=r"'model\.layers\.0\.self_attn'.*head_dim is 16 in the model but 32"):
        sparsify.attach(llama, wrong)
    assert llama.config._attn_implementation == "sdpa"


def test_a_strategy_searched_on_the_base_model_fits_the_causal_lm(tmp_path):
    model, inputs = model_zoo.llama(seq=64)
    base_sites = sparsify.find_attention(model.model, inputs)
    assert base_sites[0].name == "layers.0.self_attn"
    path = tmp_path / "strategy.json"
    sparsify.Strategy.uniform(base_sites, WINDOW, block_size=16).save(path)
    attached = sparsify.attach(model, path)
    assert sorted(attached_sites(attached)) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_attached_model_compiles_without_graph_breaks():
    model, inputs = model_zoo.llama(seq=96, batch=2)
    sites = sparsify.find_attention(model, inputs)
    attached = sparsify.attach(model, _mixed(sites))
    arguments = dict(inputs, use_cache=False)
    with torch.no_grad():
        eager = attached(**arguments).logits
        explained = torch._dynamo.explain(attached)(**arguments)
        compiled = torch.compile(attached, fullgraph=True)(**arguments).logits
    assert explained.graph_break_count == 0
    assert rel_err(compiled, eager) < 1e-5


def test_models_of_other_kinds_are_pointed_to_the_graph_door():
    with pytest.raises(UnsupportedError, match="sparsify.compile"):
        sparsify.attach(torch.nn.TransformerEncoderLayer(32, 4), "strategy.json")
    model, inputs = model_zoo.llama(seq=32)
    with pytest.raises(UnsupportedError, match="decode must be one of dense, sparse"):
        sparsify.attach(model, sparsify.Strategy.dense(sparsify.find_attention(model, inputs)), decode="fast")


def test_attention_dropout_in_training_is_refused_by_name():
    model, inputs = model_zoo.llama(seq=48)
    sites = sparsify.find_attention(model, inputs)
    attached = sparsify.attach(model, sparsify.Strategy.uniform(sites, WINDOW, block_size=16))
    for module in attached.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    attached.train()
    with pytest.raises(UnsupportedError, match=r"'model\.layers\.0\.self_attn'.*dropout"):
        attached(**inputs)


# --- chunked prefill and query-aware decode (issue 19) ---------------------------------------------------------------

def _chunked_logits(model, ids, chunk, cache):
    """Logits of ``ids`` prefilled ``chunk`` tokens at a time through ``cache``."""
    pieces = []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            pieces.append(model(ids[:, start:start + chunk], **{cache_keyword(model): cache}, use_cache=True).logits)
    return torch.cat(pieces, 1)


def test_the_cache_goes_in_under_the_keyword_the_installed_forward_takes():
    import dataclasses

    import transformers

    model, _ = model_zoo.llama(seq=32, batch=1)
    keyword = cache_keyword(model)
    assert keyword in inspect.signature(model.forward).parameters
    assert cache_keyword(torch.compile(model)) == keyword                      # read through the compiled wrapper

    class BeforeTheRename(torch.nn.Module):                                    # transformers < 5.2x: the old name
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
            return input_ids

    class NoCache(torch.nn.Module):
        def forward(self, x):
            return x

    class PassesKeywordsThrough(torch.nn.Module):                              # DDP, PEFT: **kwargs to the model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs, **kwargs):
            return self.inner(*inputs, **kwargs)

    assert cache_keyword(BeforeTheRename()) == "past_key_values"
    assert cache_keyword(PassesKeywordsThrough(BeforeTheRename())) == "past_key_values"
    assert cache_keyword(PassesKeywordsThrough(model)) == keyword
    with pytest.raises(TypeError, match="NoCache takes 'cache' or 'past_key_values'"):
        cache_keyword(NoCache())
    with pytest.raises(TypeError, match="return_dict=True"):
        returned_cache((torch.zeros(1),))
    # The cache a call returns, whichever field holds it; then a step through it equals the one call.
    ids = torch.randint(0, model_zoo.VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache = returned_cache(model(ids[:, :20], use_cache=True))
        assert isinstance(cache, transformers.Cache) and cache.get_seq_length() == 20
        tail = model(ids[:, 20:], **{keyword: cache}, use_cache=True).logits
    assert rel_err(tail, whole[:, 20:]) < 1e-5

    @dataclasses.dataclass
    class OldOutput:                                                           # an output of before the rename
        past_key_values: object = None

    assert returned_cache(OldOutput(past_key_values=cache)) is cache


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_chunked_prefill_with_static_patterns_equals_one_call(cache_kind):
    import transformers

    model, inputs = model_zoo.llama(seq=160, batch=1)
    sites = sparsify.find_attention(model, inputs)
    attached = sparsify.attach(model, _mixed(sites))
    ids = torch.randint(0, model_zoo.VOCAB, (1, 160), generator=torch.Generator().manual_seed(11))   # fresh input
    with torch.no_grad():
        whole = attached(ids, use_cache=False).logits
        dense = model(ids, use_cache=False).logits
    cache = (transformers.DynamicCache(config=model.config) if cache_kind == "dynamic"
             else transformers.StaticCache(config=model.config, max_cache_len=256))
    chunked = _chunked_logits(attached, ids, 48, cache)       # 48 = 3 blocks: chunks start at block edges
    assert rel_err(chunked, whole) < 1e-5
    # A last chunk shorter than a block (run dense, as decode steps are by default) stays causal from its offset;
    # a window longer than the prompt keeps every block, so the sparse site's rows are the dense model's.
    keeps_all = sparsify.attach(model, sparsify.Strategy.uniform(sites, patterns.sliding_window(512), block_size=16))
    cache = (transformers.DynamicCache(config=model.config) if cache_kind == "dynamic"
             else transformers.StaticCache(config=model.config, max_cache_len=256))
    with torch.no_grad():
        keeps_all(ids[:, :150], **{cache_keyword(keeps_all): cache}, use_cache=True)
        tail = keeps_all(ids[:, 150:], **{cache_keyword(keeps_all): cache}, use_cache=True).logits
    assert rel_err(tail, dense[:, 150:]) < 1e-5
    assert rel_err(whole, dense) > 1e-3                         # the strategy really is sparse
    offsets = {key[2] for runtime in attached_sites(attached).values() for key in runtime._masks}
    assert {48, 96, 144} <= offsets                             # each chunk ran at its offset


def test_chunked_prefill_of_a_dense_strategy_equals_the_models_one_call():
    import transformers

    model, inputs = model_zoo.llama(seq=96, batch=1)
    attached = sparsify.attach(model, sparsify.Strategy.dense(sparsify.find_attention(model, inputs), block_size=16))
    ids = torch.randint(0, model_zoo.VOCAB, (1, 96), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
    chunked = _chunked_logits(attached, ids, 40, transformers.DynamicCache(config=model.config))
    assert rel_err(chunked, dense) < 1e-5


def test_chunked_prefill_of_adaptive_heads_estimates_per_chunk_from_what_the_chunk_sees():
    model, inputs = model_zoo.llama(seq=128, batch=1)
    sites = sparsify.find_attention(model, inputs)
    strategy = sparsify.Strategy.uniform(sites, patterns.pooled_coverage(0.9, sink_blocks=1), block_size=16)
    attached = sparsify.attach(model, strategy)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 128), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        whole = attached(ids, use_cache=False).logits
    import transformers

    chunked = _chunked_logits(attached, ids, 64, transformers.DynamicCache(config=model.config))
    # The first chunk sees what the one call's first rows see: the same rows; the second estimates on its own.
    assert rel_err(chunked[:, :64], whole[:, :64]) < 1e-5
    assert rel_err(chunked, dense) < 1.5 * rel_err(whole, dense) + 1e-3


def test_query_aware_decode_reading_every_page_generates_the_dense_tokens():
    model, inputs = model_zoo.llama(seq=64, batch=2)
    sites = sparsify.find_attention(model, inputs)
    every_page = sparsify.patterns.query_aware_decode(1.0, page_size=8)
    attached = sparsify.attach(model, sparsify.Strategy.dense(sites, block_size=16), decode=every_page)
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                              # left padding on the second row
    assert torch.equal(_generate(attached, ids, mask, new_tokens=12), _generate(model, ids, mask, new_tokens=12))
    decoders = [module.sparse_decoder for module in attached.modules() if hasattr(module, "sparse_decoder")]
    assert len(decoders) == 2 and all(d.summaries.minimum is not None for d in decoders)


def test_query_aware_decode_reads_its_budget_of_pages_and_stays_close_to_dense():
    model, inputs = model_zoo.llama(seq=96, batch=1)
    sites = sparsify.find_attention(model, inputs)
    pattern = sparsify.patterns.query_aware_decode(0.1, page_size=8, sink_pages=1, window_pages=1, min_pages=1)
    strategy = sparsify.Strategy.dense(sites, block_size=16)
    attached = sparsify.attach(model, strategy, decode=pattern)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 96), generator=torch.Generator().manual_seed(13))
    decoders = [module.sparse_decoder for module in attached.modules() if hasattr(module, "sparse_decoder")]
    rows, dense_rows = [], []
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = returned_cache(attached(ids[:, :80], use_cache=True))
        for decoder in decoders:
            decoder.read_log = []
        for position in range(80, 96):
            step = attached(ids[:, position:position + 1], **{cache_keyword(attached): cache}, use_cache=True)
            cache = returned_cache(step)
            rows.append(step.logits[:, -1])
    reads = torch.stack([torch.stack(decoder.read_log) for decoder in decoders])
    assert reads.shape == (2, 16) and bool((reads < 0.6).all())          # 3 or 4 of 10-12 pages
    error = rel_err(torch.stack(rows, 1), full[:, 80:96])
    assert 1e-4 < error < 0.5                                             # sparse, and still near the dense rows


def test_query_aware_decode_compiles_once_for_every_step_of_a_static_cache():
    import transformers

    model, inputs = model_zoo.llama(seq=64, batch=1)
    sites = sparsify.find_attention(model, inputs)
    pattern = sparsify.patterns.query_aware_decode(0.25, page_size=8, min_pages=1)
    attached = sparsify.attach(model, sparsify.Strategy.uniform(sites, WINDOW, block_size=16), decode=pattern)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 72), generator=torch.Generator().manual_seed(14))
    reference = sparsify.attach(model, sparsify.Strategy.uniform(sites, WINDOW, block_size=16), decode=pattern)

    def decode(step_model, steps, compiled):
        cache = transformers.StaticCache(config=model.config, max_cache_len=128)
        outputs = []
        with torch.no_grad():
            attached(ids[:, :64], **{cache_keyword(attached): cache}, use_cache=True) if compiled else reference(
                ids[:, :64], **{cache_keyword(reference): cache}, use_cache=True)
            for position in range(64, 64 + steps):
                outputs.append(step_model(ids[:, position:position + 1], **{cache_keyword(step_model): cache},
                                          use_cache=True, position_ids=torch.tensor([[position]])).logits)
        return torch.cat(outputs, 1)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(attached)
    got = decode(compiled, 8, True)
    frames = counters["stats"]["unique_graphs"]
    expected = decode(reference, 8, False)
    assert rel_err(got, expected) < 1e-4
    assert frames == 1, dict(counters["stats"])             # one graph serves every decode step: no recompiles
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_sites_read_off_the_modules_are_the_sites_capture_finds():
    from sparsify.integrations.transformers import attention_sites

    model, inputs = model_zoo.llama(seq=32)
    captured = sparsify.find_attention(model, inputs)
    read = attention_sites(model, tokens=32)
    fields = ("name", "index", "num_heads", "num_kv_heads", "head_dim", "causal", "is_self_attention", "module_type")
    assert [[getattr(site, field) for field in fields] for site in read] == [
        [getattr(site, field) for field in fields] for site in captured]
    assert attention_sites(torch.nn.Linear(2, 2)) == []


def test_query_aware_decode_on_named_sites_only_and_unknown_names_refused():
    model, inputs = model_zoo.llama(seq=48, batch=1)
    sites = sparsify.find_attention(model, inputs)
    pattern = sparsify.patterns.query_aware_decode(0.1, page_size=8)
    attached = sparsify.attach(model, sparsify.Strategy.uniform(sites, WINDOW, block_size=16),
                               decode={sites[1].name: pattern})
    layers = attached.model.layers
    assert not hasattr(layers[0].self_attn, "sparse_decoder") and hasattr(layers[1].self_attn, "sparse_decoder")
    assert layers[0].self_attn.sparse_attention.decode_mode == "dense"
    with pytest.raises(StrategyError, match=r"model\.layers\.9\.self_attn"):
        sparsify.attach(model, sparsify.Strategy.dense(sites), decode={"model.layers.9.self_attn": pattern})
    with pytest.raises(UnsupportedError, match="decode patterns"):
        sparsify.attach(model, sparsify.Strategy.dense(sites), decode={sites[0].name: "sparse"})
