"""sparsify-cli: sites, apply and demo print what a user expects and fail clearly."""

from __future__ import annotations

import json

import pytest

from sparsify import Strategy, find_attention, patterns
from sparsify.cli import main
from sparsify.examples import manual_attention_block


def test_sites_prints_a_table(capsys):
    assert main(["sites", "--model", "sparsify.examples:manual_attention_block"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "manual" in out and "causal" in out


def test_sites_json(capsys):
    assert main(["sites", "--model", "model_zoo:transformer_encoder", "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in sites] == ["layers.0.self_attn", "layers.1.self_attn"]


def test_bad_factory_spec():
    with pytest.raises(SystemExit, match="package.module:factory"):
        main(["sites", "--model", "no_colon_here"])
    with pytest.raises(SystemExit, match="cannot import"):
        main(["sites", "--model", "no_such_module_xyz:factory"])


def test_apply_reports_error(tmp_path, capsys):
    model, inputs = manual_attention_block()
    path = tmp_path / "strategy.json"
    Strategy.uniform(find_attention(model, inputs), patterns.sliding_window(64), block_size=32).save(path)
    assert main(["apply", "--model", "sparsify.examples:manual_attention_block", "--strategy", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 sites run sparse" in out and "relative L2 error" in out


def test_apply_with_wrong_strategy_exits_2(tmp_path, capsys):
    path = tmp_path / "strategy.json"
    path.write_text("{not json")
    assert main(["apply", "--model", "sparsify.examples:manual_attention_block", "--strategy", str(path)]) == 2
    assert "strategy.json" in capsys.readouterr().err


def test_demo_runs_on_the_builtin_example(tmp_path, capsys):
    out_path = tmp_path / "demo.json"
    assert main(["demo", "--frames", "2", "--out", str(out_path)]) == 0
    assert "output relative L2 error" in capsys.readouterr().out
    assert Strategy.load(out_path).block_size == 64


def test_search_on_the_builtin_example_then_report_and_apply(tmp_path, capsys):
    out = tmp_path / "strategy.json"
    picture = tmp_path / "report.png"
    assert main(["search", "--out", str(out), "--png", str(picture), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "built-in example" in printed and "multi_diagonal" in printed and "est. speedup" in printed
    strategy = Strategy.load(out)
    assert strategy.summary()["sparse_heads"] > 0 and strategy.summary()["end_to_end_error"] < 0.05
    assert (tmp_path / "strategy.profile.json").exists() and picture.stat().st_size > 10_000
    picture.unlink()
    assert main(["report", str(out), "--png", str(picture)]) == 0
    assert "site error" in capsys.readouterr().out and picture.exists()
    assert main(["apply", "--strategy", str(out)]) == 0
    assert "4 of 4 sites run sparse" in capsys.readouterr().out


def test_search_with_bad_budget_exits_2(tmp_path, capsys):
    code = main(["search", "--model", "sparsify.examples:manual_attention_block", "--max-error", "1.5",
                 "--out", str(tmp_path / "s.json"), "--no-progress"])
    assert code == 2 and "max_error" in capsys.readouterr().err


def test_calibrate_writes_a_profile(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["calibrate", "--backend", "torch", "--lengths", "256", "512", "--repeats", "1", "--out", str(out)]) == 0
    from sparsify.cost import HardwareProfile

    assert HardwareProfile.load(out).backend == "torch"
