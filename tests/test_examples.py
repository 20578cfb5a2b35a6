"""The example scripts' helpers (examples/*.py) on tiny random-weight models built from configs: no downloads."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest
import torch

import model_zoo
import sparsify
from sparsify import patterns

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)  # the scripts import their shared helpers by module name, as when run from there

import example_tools  # noqa: E402
import minilm_embeddings  # noqa: E402
import smollm2_perplexity  # noqa: E402

transformers = pytest.importorskip("transformers")


class WordTokenizer:
    """Stands in for a transformers tokenizer: one id per whitespace-separated word."""

    def __call__(self, text: str, add_special_tokens: bool = True, return_attention_mask: bool = True):
        return {"input_ids": [len(word) % 50 + 3 * index % 7 for index, word in enumerate(text.split())]}


def test_next_token_loss_matches_a_per_position_reference():
    logits = torch.randn(2, 7, 11)
    ids = torch.randint(0, 11, (2, 7))
    total, count = smollm2_perplexity.next_token_loss(logits, ids)
    expected = -sum(float(torch.log_softmax(logits[b, s].double(), -1)[ids[b, s + 1]]) for b in range(2) for s in range(6))
    assert count == 12
    assert total == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        smollm2_perplexity.next_token_loss(logits, ids[:, :5])


def test_window_losses_match_transformers_own_loss():
    model = model_zoo.llama(vocab=96)[0]
    windows = [torch.randint(0, 96, (1, 48)) for _ in range(3)]
    losses = smollm2_perplexity.window_losses(model, windows)
    with torch.no_grad():
        reference = [float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1) for w in windows]
    assert [count for _, count in losses] == [47, 47, 47]
    assert [loss for loss, _ in losses] == pytest.approx(reference, rel=1e-5)
    assert smollm2_perplexity.perplexity(losses) == pytest.approx(math.exp(sum(reference) / 141), rel=1e-5)


def test_dense_strategy_has_perplexity_ratio_one():
    model = model_zoo.llama(vocab=96)[0]
    windows = [torch.randint(0, 96, (1, 128)) for _ in range(2)]
    sites = sparsify.find_attention(model, {"input_ids": windows[0]})
    compiled = sparsify.compile(model, strategy=sparsify.Strategy.dense(sites, block_size=16),
                                example_inputs={"input_ids": windows[0]})
    dense = smollm2_perplexity.perplexity(smollm2_perplexity.window_losses(model, windows))
    sparse = smollm2_perplexity.perplexity(smollm2_perplexity.window_losses(compiled, windows))
    assert sparse / dense == pytest.approx(1.0, abs=1e-5)


def test_paired_evaluation_measures_the_model_level_error_against_dense():
    model = model_zoo.llama(vocab=96)[0]
    windows = [torch.randint(0, 96, (1, 128)) for _ in range(2)]
    sites = sparsify.find_attention(model, {"input_ids": windows[0]})
    compiled = sparsify.compile(model, strategy=sparsify.Strategy.uniform(sites, patterns.sliding_window(16), 16),
                                example_inputs={"input_ids": windows[0]})
    dense, sparse, error = smollm2_perplexity.paired_evaluation(model, compiled, windows)
    with torch.no_grad():
        pairs = [(model(input_ids=w).logits.double(), compiled(input_ids=w).logits.double()) for w in windows]
    squared = [float((s - d).norm() ** 2 / d.norm() ** 2) for d, s in pairs]
    divergence = [float((d.softmax(-1) * (d.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()) for d, s in pairs]
    assert error["relative_l2"] == pytest.approx(math.sqrt(sum(squared) / 2), rel=1e-6) and error["relative_l2"] > 0
    assert error["kl"] == pytest.approx(sum(divergence) / 2, rel=1e-6, abs=1e-12)
    assert dense == smollm2_perplexity.window_losses(model, windows)
    reference = smollm2_perplexity.window_losses(compiled, windows)
    assert [loss for loss, _ in sparse] == pytest.approx([loss for loss, _ in reference], rel=1e-6)


def test_searched_strategy_is_read_back_per_family_and_within_budget():
    model = model_zoo.llama(vocab=96)[0]
    calibration = [{"input_ids": torch.randint(0, 96, (1, 256))} for _ in range(4)]
    compiled = sparsify.compile(model, calibration, max_error=0.1, block_size=16, progress=False,
                                cost_model=smollm2_perplexity.work_only_cost_model())
    totals, per_site = example_tools.family_counts(compiled.strategy)
    assert sum(totals.values()) == 2 * 4
    assert sorted(per_site) == sorted(compiled.strategy.sites)
    assert all(sum(counts.values()) == 4 for counts in per_site.values())
    known = set(patterns.known_patterns())
    assert all(part in known for family in totals for part in family.replace("&", "|").split("|"))
    checks = example_tools.error_checks(compiled.strategy, 0.1)
    assert checks["sites_over_budget"] == {}
    assert checks["max_site_error"] <= 0.1
    windows = [torch.randint(0, 96, (1, 256)) for _ in range(2)]
    ratio = (smollm2_perplexity.perplexity(smollm2_perplexity.window_losses(compiled, windows)) /
             smollm2_perplexity.perplexity(smollm2_perplexity.window_losses(model, windows)))
    assert compiled.strategy.summary()["sparse_heads"] > 0
    assert abs(math.log(ratio)) <= 0.05          # sites within 10% move the perplexity of fresh windows little
    # A random-weight model's perplexity is near its vocabulary size whatever attention does (zeroing every
    # sparse head moves this ratio by 4e-4), so the logits are checked too: within the sites' 10% on fresh
    # windows (measured 0.04; with the sparse heads' output halved, 0.16).
    with torch.no_grad():
        for window in windows:
            sparse, dense = compiled(input_ids=window).logits, model(input_ids=window).logits
            assert float((sparse - dense).norm() / dense.norm()) <= 0.1


def compiled_with(model, window, head_patterns, *, sites_changed=None):
    """``model`` compiled with ``head_patterns`` (one per head) at every site (or the first ``sites_changed``), block 16."""
    sites = sparsify.find_attention(model, {"input_ids": window})
    strategy = sparsify.Strategy.dense(sites, block_size=16)
    for site in sites[:sites_changed]:
        strategy = strategy.with_heads(site.name, head_patterns)
    return sparsify.compile(model, strategy=strategy, example_inputs={"input_ids": window})


def test_realised_density_of_static_heads_is_the_summary_density():
    model = model_zoo.llama(vocab=96)[0]
    window = torch.randint(0, 96, (1, 128))
    compiled = compiled_with(model, window, [patterns.sliding_window(32), patterns.dense(), patterns.skip(),
                                             patterns.a_shape(16, 16)])
    with example_tools.RealisedDensity(compiled) as density, torch.no_grad():
        compiled(input_ids=window)
    result = density.result()
    assert result["adaptive_heads"] == 0
    assert result["mean_density"] == pytest.approx(compiled.strategy.summary()["mean_density"], abs=1e-9)
    # A site left dense is not rewritten, and still counts.
    compiled = compiled_with(model, window, [patterns.sliding_window(32)] * 4, sites_changed=1)
    with example_tools.RealisedDensity(compiled) as density, torch.no_grad():
        compiled(input_ids=window)
    summary = compiled.strategy.summary()["mean_density"]
    assert summary < 1 and density.result()["mean_density"] == pytest.approx(summary, abs=1e-9)


def test_realised_density_counts_adaptive_heads_by_what_they_keep():
    model = model_zoo.llama(vocab=96)[0]
    window = torch.randint(0, 96, (1, 128))
    window_blocks = 128 // 16
    static = patterns.sliding_window(16)
    static_density = static.density(window_blocks, window_blocks, block_size=16, causal=True)
    # Full coverage keeps every visible block: density 1 over the causal triangle (not over the square).
    compiled = compiled_with(model, window, [patterns.pooled_coverage(1.0), static, patterns.pooled_coverage(1.0),
                                             patterns.dense()])
    assert compiled.strategy.summary()["mean_density"] == pytest.approx((3 + static_density) / 4)
    with example_tools.RealisedDensity(compiled) as density, torch.no_grad():
        compiled(input_ids=window)
        compiled(input_ids=torch.randint(0, 96, (1, 128)))
    result = density.result()
    assert result["adaptive_heads"] == 2 * 2 and result["calls_measured"] == 2
    assert result["adaptive_head_mean_density"] == pytest.approx(1.0, abs=1e-6)
    assert result["mean_density"] == pytest.approx((3 + static_density) / 4, abs=1e-6)
    # A partial coverage keeps fewer blocks than the summary (which counts adaptive heads as every block) says.
    compiled = compiled_with(model, window, [patterns.pooled_coverage(0.5)] * 4)
    with example_tools.RealisedDensity(compiled) as density, torch.no_grad():
        compiled(input_ids=window)
    result = density.result()
    assert 0 < result["mean_density"] < 1 == compiled.strategy.summary()["mean_density"]
    assert all(getattr(m, "adaptive_density_log", None) is None for m in compiled.modules())
    with pytest.raises(RuntimeError, match="ran no call"):
        with example_tools.RealisedDensity(compiled) as density:
            pass
        density.result()


def test_searched_density_reads_the_recorded_work():
    model = model_zoo.llama(vocab=96)[0]
    calibration = [{"input_ids": torch.randint(0, 96, (1, 256))} for _ in range(4)]
    compiled = sparsify.compile(model, calibration, max_error=0.1, block_size=16, progress=False, adaptive=False)
    assert example_tools.searched_density(compiled.strategy) == pytest.approx(
        compiled.strategy.summary()["mean_density"], abs=1e-5)


def test_error_checks_names_sites_over_budget():
    site = sparsify.AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=8, q_len=128, k_len=128)
    strategy = sparsify.Strategy.dense([site])
    over = dataclasses.replace(strategy, metadata={"site_errors": {"attn": 0.08}})
    assert example_tools.error_checks(over, 0.05)["sites_over_budget"] == {"attn": 0.08}
    assert example_tools.error_checks(over, 0.1)["sites_over_budget"] == {}
    assert example_tools.error_checks(over, None)["sites_over_budget"] == {}


def test_pattern_family_names_composite_parts():
    composite = (patterns.sliding_window(64) | patterns.attention_sinks(16)) & patterns.dense()
    assert example_tools.pattern_family(composite) == "sliding_window|attention_sinks&dense"
    assert example_tools.pattern_family(patterns.skip()) == "skip"


def test_token_windows_are_consecutive_and_refuse_short_texts():
    tokenizer = WordTokenizer()
    text = " ".join(f"w{'x' * (i % 9)}" for i in range(100))
    ids = tokenizer(text)["input_ids"]
    windows = smollm2_perplexity.token_windows(tokenizer, text, 30, 3)
    assert [tuple(w.shape) for w in windows] == [(1, 30)] * 3
    assert torch.cat(windows, 1).flatten().tolist() == ids[:90]
    with pytest.raises(ValueError, match="holds 100 tokens, fewer than 4 windows of 30"):
        smollm2_perplexity.token_windows(tokenizer, text, 30, 4, source="tiny")


def test_text_sources():
    from pydoc_data import topics

    names = sorted(topics.topics)
    first, held_out = names[: len(names) // 2], names[len(names) // 2:]
    text, other = smollm2_perplexity.python_docs_text(), smollm2_perplexity.python_docs_held_out_text()
    # The two halves of the topic pages, in name order, each page once and in one half only.
    assert text.index(topics.topics[first[0]]) < text.index(topics.topics[first[-1]])
    assert all(text.count(topics.topics[name]) == 1 for name in (first[0], first[-1]))
    assert all(topics.topics[name] in other and topics.topics[name] not in text for name in (held_out[0], held_out[-1]))


def test_missing_evaluation_source_falls_back_to_held_out_python_docs(monkeypatch, capsys):
    def missing():
        raise smollm2_perplexity.TextUnavailable("no license texts in /nowhere")

    monkeypatch.setitem(smollm2_perplexity.TEXT_SOURCES, "licenses", missing)
    monkeypatch.setitem(smollm2_perplexity.TEXT_SOURCES, "vim-manual", lambda: "a manual")
    texts, used, substitutions = smollm2_perplexity.load_texts("python-docs", ["licenses", "vim-manual"])
    assert used == ["vim-manual", "python-docs-held-out"]
    assert substitutions == {"licenses": "no license texts in /nowhere"}
    assert texts["python-docs-held-out"] == smollm2_perplexity.python_docs_held_out_text()
    assert "evaluating on python-docs-held-out instead" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="calibration source licenses"):
        smollm2_perplexity.load_texts("licenses", ["vim-manual"])


def test_vim_manual_reads_the_manual_chapters_only(tmp_path):
    (tmp_path / "usr_02.txt").write_text("second chapter")
    (tmp_path / "usr_01.txt").write_text("first chapter")
    (tmp_path / "options.txt").write_text("reference, not the manual")
    assert smollm2_perplexity.vim_manual_text(str(tmp_path)) == "first chapter\n\nsecond chapter"
    with pytest.raises(smollm2_perplexity.TextUnavailable, match="no Vim user manual"):
        smollm2_perplexity.vim_manual_text(str(tmp_path / "missing"))


def test_licenses_text_reads_each_file_once(tmp_path):
    (tmp_path / "A").write_text("first license")
    (tmp_path / "B").write_text("second license")
    os.symlink(tmp_path / "A", tmp_path / "A-link")
    assert smollm2_perplexity.licenses_text(str(tmp_path)) == "first license\n\nsecond license"
    with pytest.raises(smollm2_perplexity.TextUnavailable, match="no license texts"):
        smollm2_perplexity.licenses_text(str(tmp_path / "missing"))


def test_compile_options_pass_adaptive_only_where_accepted():
    def without(model, calib_loader, *, max_error=0.05):
        return None

    def with_adaptive(model, calib_loader, *, max_error=0.05, adaptive=True):
        return None

    assert example_tools.compile_options(None, without) == ({}, "static (no adaptive option in this sparsify)")
    assert example_tools.compile_options(False, without) == ({}, "static (no adaptive option in this sparsify)")
    with pytest.raises(SystemExit, match="no input-adaptive candidates"):
        example_tools.compile_options(True, without)
    assert example_tools.compile_options(None, with_adaptive) == ({}, "adaptive")
    assert example_tools.compile_options(True, with_adaptive) == ({"adaptive": True}, "adaptive")
    assert example_tools.compile_options(False, with_adaptive) == ({"adaptive": False}, "static")


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "out" / "result.json"
    example_tools.write_json({"ratio": 1.0}, str(path))
    assert json.loads(path.read_text()) == {"ratio": 1.0}
    with pytest.raises(TypeError):
        example_tools.write_json({"ratio": object()}, str(path))
    assert json.loads(path.read_text()) == {"ratio": 1.0}
    assert sorted(os.listdir(path.parent)) == ["result.json"]


def test_arguments_refuse_evaluating_on_the_calibration_text(capsys):
    with pytest.raises(SystemExit):
        smollm2_perplexity.parse_arguments(["--calibration-source", "licenses", "--evaluation-source", "vim-manual",
                                            "licenses"])
    assert "licenses is both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        smollm2_perplexity.parse_arguments(["--evaluation-source", "licenses", "licenses"])
    with pytest.raises(SystemExit):
        smollm2_perplexity.parse_arguments(["--calibration", "1"])
    arguments = smollm2_perplexity.parse_arguments(["--no-adaptive"])
    assert arguments.adaptive is False
    assert arguments.calibration_source not in arguments.evaluation_source


def test_ratio_row_compares_the_same_windows():
    dense = [(2 * math.log(4), 2), (math.log(4), 1)]
    compiled = [(2 * math.log(5), 2), (math.log(5), 1)]
    row = smollm2_perplexity.ratio_row("text", dense, compiled)
    assert row["windows"] == 2 and row["predicted_tokens"] == 3
    assert row["dense"] == pytest.approx(4.0) and row["compiled"] == pytest.approx(5.0)
    assert row["ratio"] == pytest.approx(1.25)


def test_minilm_mean_pooling_ignores_padding():
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = minilm_embeddings.mean_pooled(transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden), mask)
    expected = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    assert torch.allclose(pooled, torch.nn.functional.normalize(expected, dim=-1), atol=1e-6)
    assert minilm_embeddings.paragraphs(2, seed=3) == minilm_embeddings.paragraphs(2, seed=3)
