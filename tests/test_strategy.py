"""Tests of sparsify.strategy: JSON round trips, validation messages, model matching, summaries."""

from __future__ import annotations

import copy
import json

import pytest

from sparsify.errors import StrategyError
from sparsify.patterns import attention_sinks, dense, sliding_window
from sparsify.site import AttentionSite
from sparsify.strategy import (
    FORMAT_VERSION,
    SiteStrategy,
    Strategy,
    site_fingerprint,
)


def make_sites() -> list[AttentionSite]:
    # Names deliberately out of alphabetical order: the document keeps the model's order.
    return [
        AttentionSite("h.1.attn", 0, num_heads=4, num_kv_heads=2, head_dim=32,
                      q_len=300, k_len=300, causal=True),
        AttentionSite("h.0.attn", 1, num_heads=4, num_kv_heads=4, head_dim=32,
                      q_len=256, k_len=256, causal=True),
        AttentionSite("cross", 2, num_heads=2, num_kv_heads=1, head_dim=16,
                      q_len=128, k_len=77, is_self_attention=False),
    ]


def mixed_strategy(sites: list[AttentionSite]) -> Strategy:
    window, sinks = sliding_window(64), attention_sinks(4)
    per_site = {
        "h.1.attn": SiteStrategy(
            "h.1.attn",
            [window | sinks, dense(), window | sinks, window],
            head_metrics=[{"recall": 0.99, "error": 0.01}, {}, {"recall": 0.97}, {"cost": 1e-5}],
        ),
        "h.0.attn": SiteStrategy(
            "h.0.attn",
            [window, window, window, dense()],
            dense_steps=3,
        ),
        "cross": SiteStrategy("cross", [dense(), sinks]),
    }
    return Strategy(
        block_size=32,
        sites=per_site,
        fingerprint=[site_fingerprint(site) for site in sites],
        metadata={"sparsify_version": "0.1.0", "notes": ["calibrated on 4 samples"]},
    )


@pytest.fixture
def sites() -> list[AttentionSite]:
    return make_sites()


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "uniform", "mixed"])
def test_save_load_round_trip(tmp_path, sites, kind):
    strategy = {
        "dense": lambda: Strategy.dense(sites),
        "uniform": lambda: Strategy.uniform(sites, sliding_window(128) | attention_sinks(4), 16),
        "mixed": lambda: mixed_strategy(sites),
    }[kind]()
    path = tmp_path / "strategy.json"
    strategy.save(path)
    loaded = Strategy.load(path)
    assert loaded == strategy
    assert list(loaded.sites) == ["h.1.attn", "h.0.attn", "cross"]
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION == 2
    assert list(data["sites"]) == ["h.1.attn", "h.0.attn", "cross"]
    # Saving again gives the same bytes (stable diffs).
    second = tmp_path / "again.json"
    loaded.save(second)
    assert second.read_text() == path.read_text()


def test_document_layout(sites):
    data = mixed_strategy(sites).to_dict()
    assert list(data) == ["format_version", "block_size", "fingerprint", "sites", "metadata"]
    assert data["fingerprint"][0] == {
        "name": "h.1.attn", "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
        "causal": True, "kind": "self", "q_len": 300, "k_len": 300,
    }
    site = data["sites"]["h.1.attn"]
    assert site["heads"][3] == {"pattern": "sliding_window", "window": 64}
    assert "fusion_groups" not in site     # format 2: nothing read them
    assert data["sites"]["h.0.attn"]["dense_steps"] == 3
    assert json.loads(json.dumps(data)) == data


def test_from_dict_defaults_optional_keys(sites):
    data = Strategy.dense(sites).to_dict()
    del data["metadata"]
    for site in data["sites"].values():
        del site["head_metrics"], site["dense_steps"]
    strategy = Strategy.from_dict(data)
    assert strategy == Strategy.dense(sites)


# --- head queries, and version-1 files -------------------------------------------------------


def test_head_queries():
    window = sliding_window(64)
    site = SiteStrategy("attn", [window, dense(), sliding_window(64), window | attention_sinks(4), dense()])
    assert site.dense_heads == [1, 4]
    assert site.sparse_heads == [0, 2, 3]
    assert site.is_dense(1) and not site.is_dense(0)


def test_a_version_1_file_still_loads_and_its_fusion_groups_are_dropped(tmp_path, sites):
    strategy = mixed_strategy(sites)
    old = strategy.to_dict()
    old["format_version"] = 1
    old["sites"]["h.1.attn"]["fusion_groups"] = [[0, 2], [1], [3]]    # as version 1 wrote them
    old["sites"]["h.0.attn"]["fusion_groups"] = [[0], [1, 2], [3]]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = Strategy.load(path)
    assert loaded == strategy and loaded.summary() == strategy.summary()
    again = tmp_path / "again.json"
    loaded.save(again)
    assert json.loads(again.read_text())["format_version"] == 2
    # Version 2 has no fusion groups: a document that says 2 and has them is refused, naming the key.
    newer = dict(old, format_version=2)
    with pytest.raises(StrategyError, match=r"sites\['h.1.attn'\]: unknown key\(s\) 'fusion_groups'"):
        Strategy.from_dict(newer)
    broken = json.loads(json.dumps(old))
    broken["sites"]["cross"]["fusion_groups"] = "all"
    with pytest.raises(StrategyError, match=r"fusion_groups: must be a JSON array"):
        Strategy.from_dict(broken)


# --- malformed documents ----------------------------------------------------------------------


def _set(path, value):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _delete(path):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


SITE = ["sites", "h.0.attn"]

# case: (edit of a valid document, substrings the error message must contain)
MALFORMED = {
    "unknown version": (
        _set(["format_version"], 3), ["format_version 3", "understood versions: 1, 2"]
    ),
    "version as string": (_set(["format_version"], "2"), ["format_version: must be an int"]),
    "missing version": (_delete(["format_version"]), ["missing key 'format_version'"]),
    "missing sites": (_delete(["sites"]), ["missing key 'sites'"]),
    "missing block size": (_delete(["block_size"]), ["missing key 'block_size'"]),
    "unknown top key": (
        _set(["site"], {}), ["unknown key(s) 'site'", "expected: format_version"]
    ),
    "block size not power of two": (
        _set(["block_size"], 48), ["block_size: must be a power of two in [16, 4096]", "got 48"]
    ),
    "block size too small": (_set(["block_size"], 8), ["block_size", "got 8"]),
    "block size string": (_set(["block_size"], "64"), ["block_size: must be an integer"]),
    "block size bool": (_set(["block_size"], True), ["block_size", "true (boolean)"]),
    "sites not object": (_set(["sites"], []), ["sites: must be a JSON object"]),
    "no sites": (_set(["sites"], {}), ["at least one site"]),
    "site not object": (_set(SITE, [1]), ["sites['h.0.attn']: must be a JSON object"]),
    "heads missing": (
        _delete([*SITE, "heads"]), ["sites['h.0.attn']: missing key 'heads'"]
    ),
    "heads not list": (
        _set([*SITE, "heads"], {}), ["sites['h.0.attn'].heads: must be a JSON array"]
    ),
    "unknown site key": (
        _set([*SITE, "head"], []), ["sites['h.0.attn']: unknown key(s) 'head'"]
    ),
    "unknown pattern": (
        _set([*SITE, "heads", 3], {"pattern": "slidng_window", "window": 4}),
        [
            "sites['h.0.attn'].heads[3]: unknown pattern 'slidng_window'",
            "known: a_shape, attention_sinks",
        ],
    ),
    "bad pattern parameter": (
        _set([*SITE, "heads", 1], {"pattern": "sliding_window", "window": -4}),
        ["sites['h.0.attn'].heads[1]: sliding_window: window must be an int in [1, 16777216] (MAX_TOKENS in sparsify.limits), got -4"],
    ),
    "unknown pattern parameter": (
        _set([*SITE, "heads", 1], {"pattern": "sliding_window", "size": 4}),
        ["sites['h.0.attn'].heads[1]", "unknown parameter(s) 'size'", "expected: window"],
    ),
    "head count vs fingerprint": (
        lambda data: data["sites"]["h.0.attn"].update(
            heads=[{"pattern": "dense"}] * 3
        ),
        ["sites['h.0.attn'].heads: has 3 patterns", "fingerprint[1] says the site has 4 heads"],
    ),
    "fusion groups in version 2": (
        _set([*SITE, "fusion_groups"], [[0, 1, 2, 3]]),
        ["sites['h.0.attn']: unknown key(s) 'fusion_groups'"],
    ),
    "metrics length": (
        _set([*SITE, "head_metrics"], [{}]),
        ["sites['h.0.attn'].head_metrics: has 1 entries for 4 heads"],
    ),
    "metrics entry": (
        _set([*SITE, "head_metrics"], [{}, {}, 0.5, {}]),
        ["sites['h.0.attn'].head_metrics[2]: must be a JSON object"],
    ),
    "negative dense steps": (
        _set([*SITE, "dense_steps"], -1), ["sites['h.0.attn'].dense_steps: must be an int in [0, 1000000] (MAX_STEPS in sparsify.limits), got -1"]
    ),
    "dense steps string": (
        _set([*SITE, "dense_steps"], "3"), ["sites['h.0.attn'].dense_steps: must be an integer"]
    ),
    "fingerprint not list": (_set(["fingerprint"], {}), ["fingerprint: must be a JSON array"]),
    "fingerprint entry missing key": (
        _delete(["fingerprint", 0, "head_dim"]), ["fingerprint[0]: missing key 'head_dim'"]
    ),
    "fingerprint wrong type": (
        _set(["fingerprint", 2, "causal"], "no"), ["fingerprint[2].causal: must be true or false"]
    ),
    "fingerprint bad kind": (
        _set(["fingerprint", 2, "kind"], "encoder"),
        ["fingerprint[2].kind: must be 'self' or 'cross'"],
    ),
    "fingerprint bad length": (
        _set(["fingerprint", 1, "q_len"], 0), ["fingerprint[1].q_len: must be an int in [1, 16777216] (MAX_TOKENS in sparsify.limits), got 0"]
    ),
    "fingerprint order": (
        _set(["fingerprint", 0, "name"], "h.9.attn"),
        ["fingerprint: names ['h.9.attn', 'h.0.attn', 'cross'] do not match the sites"],
    ),
    "metadata not object": (_set(["metadata"], "v1"), ["metadata: must be a JSON object"]),
    # Unbounded numbers (issue 11): each is refused at load with the field, the value and the bound,
    # before anything allocates (the block size 2**40 asked for 562 TB, window 10**30 overflowed
    # int64 at apply time, source_k_blocks 10**12 asked for 32 TB).
    "huge block size": (
        _set(["block_size"], 2**40), ["block_size: must be a power of two in [16, 4096]", "got 1099511627776"]
    ),
    "huge window": (
        _set([*SITE, "heads", 1], {"pattern": "sliding_window", "window": 10**30}),
        ["sites['h.0.attn'].heads[1]: sliding_window: window must be an int in [1, 16777216]",
         "MAX_TOKENS in sparsify.limits", "got 1000000000000000000000000000000"],
    ),
    "huge static table grid": (
        _set([*SITE, "heads", 0], {"pattern": "block_top_k", "table": [[0]], "source_q_blocks": 1,
                                   "source_k_blocks": 10**12, "relative_to": "start", "near_blocks": 4}),
        ["sites['h.0.attn'].heads[0]", "source_k_blocks must be an int in [1, 16777216]",
         "MAX_GRID_BLOCKS", "got 1000000000000"],
    ),
    "static table grid too large in all": (
        _set([*SITE, "heads", 0], {"pattern": "block_top_k", "table": [[0]] * 8, "source_q_blocks": 8,
                                   "source_k_blocks": 2**22, "relative_to": "start", "near_blocks": 4}),
        ["source_q_blocks x source_k_blocks = 8 x 4194304 = 33554432 blocks; at most 16777216"],
    ),
    "huge slash offset": (
        _set([*SITE, "heads", 0], {"pattern": "vertical_slash", "vertical": [], "slash": [-(10**9)], "width": 1}),
        ["vertical_slash: slash entry must be an int in [-16777216, 16777216]", "got -1000000000"],
    ),
    "huge exponent": (
        _set([*SITE, "heads", 0], {"pattern": "power_of_two", "max_exponent": 100, "width": 0}),
        ["power_of_two: max_exponent must be an int in [0, 24] (MAX_EXPONENT in sparsify.limits), got 100"],
    ),
    "too many slash lines": (
        _set([*SITE, "heads", 0], {"pattern": "vertical_slash", "vertical": [], "slash": list(range(5000)),
                                   "width": 1}),
        ["vertical_slash: slash holds 5000 entries; at most 4096 (MAX_LINES in sparsify.limits)"],
    ),
    "fingerprint length too long": (
        _set(["fingerprint", 1, "q_len"], 2**25), ["fingerprint[1].q_len: must be an int in [1, 16777216]",
                                                   "got 33554432"]
    ),
    "fingerprint grid too large": (
        lambda data: data["fingerprint"][1].update(q_len=10**7, k_len=10**7),
        ["fingerprint[1]: q_len x k_len = 10000000 x 10000000 tokens is 312500 x 312500",
         "at most 16777216 (MAX_GRID_BLOCKS in sparsify.limits)"],
    ),
    "fingerprint too many heads": (
        lambda data: data["fingerprint"][2].update(num_heads=10**6, num_kv_heads=10**6),
        ["fingerprint[2].num_heads: must be an int in [1, 4096] (MAX_HEADS in sparsify.limits), got 1000000"],
    ),
    "fingerprint kv heads do not divide": (
        _set(["fingerprint", 1, "num_kv_heads"], 3), ["fingerprint[1]: num_heads=4 is not a multiple of num_kv_heads=3"]
    ),
    "huge dense steps": (
        _set([*SITE, "dense_steps"], 10**12),
        ["sites['h.0.attn'].dense_steps: must be an int in [0, 1000000] (MAX_STEPS in sparsify.limits)"],
    ),
    "negative measured error": (
        _set(["sites", "h.1.attn", "head_metrics", 0, "error"], -0.5),
        ["sites['h.1.attn'].head_metrics[0].error: must be a number >= 0 and finite, got -0.5"],
    ),
    "recall above one": (
        _set(["sites", "h.1.attn", "head_metrics", 2, "recall"], 3),
        ["sites['h.1.attn'].head_metrics[2].recall: must be a number [0, 1], got 3"],
    ),
    "negative end-to-end error": (
        _set(["metadata", "end_to_end_error"], -1), ["metadata.end_to_end_error: must be a number >= 0"]
    ),
    "zero speedup": (
        _set(["metadata", "estimated_attention_speedup"], 0), ["metadata.estimated_attention_speedup: must be > 0"]
    ),
    "bad steps per generation": (
        _set(["metadata", "steps_per_generation"], 0),
        ["metadata.steps_per_generation: must be an int in [1, 1000000]"],
    ),
    "metadata nested too deep": (
        _set(["metadata", "notes"], json.loads("[" * 40 + "]" * 40)),
        ["nested more than 32 levels deep (MAX_JSON_DEPTH in sparsify.limits)"],
    ),
    "patterns nested too deep": (
        _set([*SITE, "heads", 0], json.loads(
            '{"pattern": "union", "parts": [{"pattern": "dense"}, ' * 12 + '{"pattern": "dense"}' + "]}" * 12)),
        ["patterns nested more than 8 deep (MAX_PATTERN_DEPTH in sparsify.limits)"],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_document_names_file_and_location(tmp_path, sites, case):
    edit, expected = MALFORMED[case]
    data = copy.deepcopy(mixed_strategy(sites).to_dict())
    edit(data)
    path = tmp_path / "strategy.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StrategyError) as caught:
        Strategy.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1, 2]", "a strategy must be a JSON object, got an array"),
        ("{\"format_version\": 1,", "not valid JSON"),
        ("{\"format_version\": NaN}", "NaN is not valid JSON"),
        ("{\"format_version\": 1, \"format_version\": 1}", "key 'format_version' appears twice"),
        ("", "not valid JSON"),
    ],
)
def test_unreadable_documents(tmp_path, text, expected):
    path = tmp_path / "strategy.json"
    path.write_text(text)
    with pytest.raises(StrategyError) as caught:
        Strategy.load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_metadata_nested_past_the_recursion_limit_is_refused_clearly(tmp_path, sites):
    # 100k levels: json itself cannot read it (RecursionError); the error names the file and the bound.
    text = json.dumps(mixed_strategy(sites).to_dict())
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "strategy.json"
    path.write_text(text.replace('"notes": ["calibrated on 4 samples"]', f'"notes": {deep}'))
    with pytest.raises(StrategyError) as caught:
        Strategy.load(path)
    assert str(caught.value).startswith(f"{path}: ") and "MAX_JSON_DEPTH" in str(caught.value)


def test_numbers_too_large_for_a_float_are_refused(tmp_path, sites):
    text = json.dumps(mixed_strategy(sites).to_dict())  # json reads 1e400 as inf
    path = tmp_path / "strategy.json"
    path.write_text(text.replace('"notes": ["calibrated on 4 samples"]', '"notes": [1e400]'))
    with pytest.raises(StrategyError, match=r"metadata\['notes'\]\[0\]: inf is not a JSON number"):
        Strategy.load(path)


def test_every_bound_is_documented_in_one_place():
    import sparsify.limits as limits

    names = [name for name in limits.__all__ if name.isupper()]
    assert names and all(f"``{name}``" in limits.__doc__ for name in names)


def test_summary_and_report_of_the_largest_allowed_grid_stay_cheap():
    # The largest recorded grid the bounds allow is counted without running out of memory.
    site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=16, q_len=4096 * 16, k_len=4096 * 16)
    strategy = Strategy.uniform([site], sliding_window(64), block_size=16)
    assert 0 < strategy.summary()["mean_density"] < 0.003
    from sparsify.report import strategy_table

    assert "sliding_window(64)" in strategy_table(strategy)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(StrategyError, match=r"nowhere\.json: cannot read strategy file"):
        Strategy.load(path)


def test_from_dict_names_its_source():
    with pytest.raises(StrategyError, match=r"^<dict>: a strategy must be a JSON object"):
        Strategy.from_dict("strategy")
    with pytest.raises(StrategyError, match=r"^mine\.json: missing key 'format_version'"):
        Strategy.from_dict({}, source="mine.json")


def test_constructors_validate(sites):
    with pytest.raises(StrategyError, match=r"block_size: must be a power of two in \[16, 4096\]"):
        Strategy.dense(sites, block_size=100)
    with pytest.raises(StrategyError, match="at least one site"):
        Strategy.dense([])
    with pytest.raises(StrategyError, match=r"duplicate site names \['h.1.attn'\]"):
        Strategy.dense([sites[0], sites[0]])
    with pytest.raises(StrategyError, match="expected a Pattern, got str"):
        Strategy.uniform(sites, "sliding_window")
    with pytest.raises(StrategyError, match=r"metadata\['when'\]: set is not a JSON value"):
        Strategy.dense(sites, metadata={"when": {1}})
    nan_metric = r"head_metrics\[0\]\['recall'\]: nan is not a JSON number"
    with pytest.raises(StrategyError, match=nan_metric):
        SiteStrategy("attn", [dense()], head_metrics=[{"recall": float("nan")}])
    with pytest.raises(StrategyError, match=r"sites\['a'\]: holds the strategy of site 'b'"):
        Strategy(64, {"a": SiteStrategy("b", [dense()])}, [])


# --- matching a model --------------------------------------------------------------------------


def test_validate_for_accepts_its_own_model(sites):
    mixed_strategy(sites).validate_for(sites)
    Strategy.dense(sites).validate_for(list(reversed(sites)))


def test_validate_for_lists_every_mismatch(sites):
    strategy = mixed_strategy(sites)
    model = [
        AttentionSite("h.1.self_attn", 0, num_heads=4, num_kv_heads=2, head_dim=32,
                      q_len=300, k_len=300, causal=True),
        AttentionSite("h.0.attn", 1, num_heads=8, num_kv_heads=2, head_dim=64,
                      q_len=256, k_len=256, causal=False),
        AttentionSite("cross", 2, num_heads=2, num_kv_heads=1, head_dim=16,
                      q_len=128, k_len=77, is_self_attention=True),
        AttentionSite("extra", 3, num_heads=1, num_kv_heads=1, head_dim=16, q_len=8, k_len=8),
    ]
    with pytest.raises(StrategyError) as caught:
        strategy.validate_for(model, source="strategy.json")
    message = str(caught.value)
    assert message.startswith("strategy.json does not match the model (7 problems):")
    for part in [
        "strategy sites not in the model: ['h.1.attn'] "
        "(did you mean: 'h.1.attn' -> 'h.1.self_attn'?)",
        "model sites not in the strategy: ['h.1.self_attn', 'extra']",
        "site 'h.0.attn': strategy has 4 heads, the model has 8",
        "site 'h.0.attn': num_kv_heads is 2 in the model but 4 in the strategy",
        "site 'h.0.attn': head_dim is 64 in the model but 32 in the strategy",
        "site 'h.0.attn': causal is False in the model but True in the strategy",
        "site 'cross': kind is 'self' in the model but 'cross' in the strategy",
    ]:
        assert part in message, message


def test_validate_for_rejects_a_strategy_for_another_model(sites):
    other = [AttentionSite("encoder.attn", 0, num_heads=4, num_kv_heads=4, head_dim=32,
                           q_len=64, k_len=64)]
    with pytest.raises(StrategyError) as caught:
        Strategy.dense(sites).validate_for(other)
    message = str(caught.value)
    assert "covers none of the model's 1 sites" in message
    assert "['h.1.attn', 'h.0.attn', 'cross']" in message and "['encoder.attn']" in message


def test_long_site_lists_are_shortened():
    many = [AttentionSite(f"layer.{i}", i, num_heads=1, num_kv_heads=1, head_dim=8,
                          q_len=16, k_len=16) for i in range(30)]
    with pytest.raises(StrategyError) as caught:
        Strategy.dense(many[:29]).validate_for(many[:1] + many[29:])
    message = str(caught.value)
    assert "'layer.10', ... and 18 more]" in message  # layer.1 .. layer.28 unknown to the model
    assert "model sites not in the strategy: ['layer.29']" in message
    assert message.count("->") == 1  # one suggestion, not the same name over and over


# --- summary and display -----------------------------------------------------------------------


def test_summary_counts_and_density(sites):
    summary = mixed_strategy(sites).summary()
    assert {key: summary[key] for key in
            ("num_sites", "num_heads", "dense_heads", "sparse_heads", "block_size")} == {
        "num_sites": 3, "num_heads": 10, "dense_heads": 3, "sparse_heads": 7, "block_size": 32,
    }
    assert "fusion_groups" not in summary
    assert 0 < summary["mean_density"] < 1
    assert Strategy.dense(sites).summary()["mean_density"] == 1.0


def test_mean_density_weights_heads_over_dense_blocks(sites):
    window = sliding_window(64)
    strategy = Strategy.uniform(sites, window, block_size=32)
    kept = computed = 0
    for site in sites:
        q_blocks, k_blocks = -(-site.q_len // 32), -(-site.k_len // 32)
        mask = window.block_mask(q_blocks, k_blocks, block_size=32, causal=site.causal,
                                 q_len=site.q_len, k_len=site.k_len)
        dense_mask = dense().block_mask(q_blocks, k_blocks, causal=site.causal)
        # Each head's blocks weigh by its work per block (proportional to head_dim).
        kept += int(mask.sum()) * site.num_heads * site.head_dim
        computed += int(dense_mask.sum()) * site.num_heads * site.head_dim
    assert strategy.summary()["mean_density"] == pytest.approx(kept / computed)


def test_mean_density_is_none_without_lengths(sites):
    data = Strategy.dense(sites).to_dict()
    del data["fingerprint"][0]["q_len"]
    assert Strategy.from_dict(data).summary()["mean_density"] is None


def test_fingerprint_may_carry_extra_keys(sites):
    data = Strategy.dense(sites).to_dict()
    data["fingerprint"][0]["value_head_dim"] = 32
    assert Strategy.from_dict(data).fingerprint[0]["value_head_dim"] == 32


def test_repr_is_short(sites):
    assert repr(mixed_strategy(sites)) == (
        "Strategy(3 sites, 10 heads: 7 sparse, 3 dense, block_size=32)"
    )
    assert repr(SiteStrategy("a", [dense(), sliding_window(8)])) == (
        "SiteStrategy('a', 2 heads: 1 sparse, 1 dense)"
    )
