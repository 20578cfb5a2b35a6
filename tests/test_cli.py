"""sparsify-cli: sites, apply and demo print what a user expects and fail clearly."""

from __future__ import annotations

import json

import pytest

from sparsify import Strategy, find_attention, patterns
from sparsify.cli import main
from sparsify.toy_models import manual_attention_block


def test_sites_prints_a_table(capsys):
    assert main(["sites", "--model", "sparsify.toy_models:manual_attention_block"]) == 0
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
    assert main(["apply", "--model", "sparsify.toy_models:manual_attention_block", "--strategy", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 sites run sparse" in out and "relative L2 error" in out


def test_apply_with_wrong_strategy_exits_2(tmp_path, capsys):
    path = tmp_path / "strategy.json"
    path.write_text("{not json")
    assert main(["apply", "--model", "sparsify.toy_models:manual_attention_block", "--strategy", str(path)]) == 2
    assert "strategy.json" in capsys.readouterr().err


def test_demo_runs_on_the_builtin_example(tmp_path, capsys):
    out_path = tmp_path / "demo.json"
    assert main(["demo", "--frames", "2", "--out", str(out_path)]) == 0
    assert "output relative L2 error" in capsys.readouterr().out
    assert Strategy.load(out_path).block_size == 64


def test_search_on_the_builtin_example_then_report_and_apply(tmp_path, capsys):
    out = tmp_path / "strategy.json"
    picture = tmp_path / "report.png"
    # A per-site budget (--max-error alone): every site keeps its structure (the default model-level budget lets this
    # model, whose attention barely reaches its output, drop heads instead).
    assert main(["search", "--max-error", "0.05", "--out", str(out), "--png", str(picture), "--no-progress"]) == 0
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


def test_report_draws_a_pareto_rows_document(tmp_path, capsys):
    import json

    rows = tmp_path / "pareto.json"
    rows.write_text(json.dumps({"meta": {"tokens": 1024}, "complete": True, "rows": [
        {"method": "ours", "target_density": 0.3, "density": 0.3, "ppl_ratio": 1.02},
        {"method": "ours", "target_density": 0.5, "density": 0.49, "ppl_ratio": 1.005},
        {"method": "streaming_llm", "target_density": 0.3, "density": 0.31, "ppl_ratio": 1.2}]}))
    picture = tmp_path / "pareto.png"
    assert main(["report", str(rows), "--quality-png", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "0.490 -> 1.0050" in printed and "streaming_llm" in printed
    with pytest.raises(SystemExit, match="use --quality-png"):
        main(["report", str(rows), "--png", str(tmp_path / "masks.png")])


def test_search_with_a_model_level_budget_then_the_quality_picture(tmp_path, capsys):
    out = tmp_path / "strategy.json"
    assert main(["search", *MANUAL, "--max-output-error", "0.02", "--output-metric", "relative_l2", "--block-size", "16",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model-level relative_l2: budget 0.02" in printed and "sensitivity" in printed
    strategy = Strategy.load(out)
    record = strategy.metadata["output_budget"]
    assert record["budget"] == 0.02 and record["measured"] <= 0.02 and record["sensitivities"]
    assert strategy.metadata["search"]["max_output_error"] == 0.02
    picture = tmp_path / "quality.png"
    assert main(["report", str(out), "--quality-png", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "picture written to" in capsys.readouterr().out
    # A per-site budget records no verified allocations: the picture is refused with what to do.
    per_site = tmp_path / "per_site.json"
    assert main(["search", *MANUAL, "--max-error", "0.05", "--out", str(per_site), "--no-progress"]) == 0
    with pytest.raises(SystemExit, match="--max-output-error"):
        main(["report", str(per_site), "--quality-png", str(tmp_path / "none.png")])
    with pytest.raises(SystemExit):
        main(["search", *MANUAL, "--output-metric", "relative_l3", "--out", str(tmp_path / "x.json")])


def test_search_with_bad_budget_exits_2(tmp_path, capsys):
    code = main(["search", "--model", "sparsify.toy_models:manual_attention_block", "--max-error", "1.5",
                 "--out", str(tmp_path / "s.json"), "--no-progress"])
    assert code == 2 and "max_error" in capsys.readouterr().err


def test_calibrate_writes_a_profile(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["calibrate", "--backend", "torch", "--lengths", "256", "512", "--repeats", "1", "--out", str(out)]) == 0
    from sparsify.cost import HardwareProfile

    assert HardwareProfile.load(out).backend == "torch"


# -- early checks, quiet runs, the picture (issue 11) ----------------------------------------------

MANUAL = ["--model", "sparsify.toy_models:manual_attention_block", "--calib", "sparsify.toy_models:manual_attention_batches"]


def unavailable_backend() -> str | None:
    """A registered backend that cannot run in this process (on a CPU machine: fa4, flex, ...), or None."""
    from sparsify.backends import backend_names, get_backend

    return next((name for name in backend_names() if get_backend(name).availability() is not None), None)


def test_search_with_an_unavailable_backend_fails_before_the_search(tmp_path, capfd):
    backend = unavailable_backend()
    if backend is None:
        pytest.skip("every registered backend can run here: nothing to refuse")
    out = tmp_path / "s.json"
    assert main(["search", *MANUAL, "--backend", backend, "--out", str(out)]) == 2
    captured = capfd.readouterr()
    assert f"backend '{backend}' is not available" in captured.err and "profiling" not in captured.err
    assert not out.exists()


def test_png_without_matplotlib_fails_before_the_search(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out = tmp_path / "s.json"
    with pytest.raises(SystemExit, match="--png needs matplotlib"):
        main(["search", *MANUAL, "--png", str(tmp_path / "p.png"), "--out", str(out)])
    assert not out.exists()


def test_output_folder_is_checked_before_the_search(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["search", *MANUAL, "--out", str(tmp_path / "no" / "such" / "s.json")])


def test_a_normal_run_prints_no_warnings(tmp_path, capfd):
    assert main(["sites"]) == 0
    assert capfd.readouterr().err == ""
    out = tmp_path / "s.json"
    assert main(["search", *MANUAL, "--out", str(out), "--no-progress"]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and "strategy written to" in captured.out


def test_calibrate_writes_a_profile_that_search_reads(tmp_path, capfd):
    profile = tmp_path / "cpu.json"
    assert main(["calibrate", "--backend", "torch", "--lengths", "256", "512", "--repeats", "2",
                 "--out", str(profile)]) == 0
    assert f"--hardware-profile {profile}" in capfd.readouterr().out
    out = tmp_path / "s.json"
    assert main(["search", *MANUAL, "--hardware-profile", str(profile), "--out", str(out), "--no-progress"]) == 0
    assert Strategy.load(out).metadata["search"]["hardware_profiles"] == [str(profile)]
    missing = tmp_path / "missing.json"
    assert main(["search", *MANUAL, "--hardware-profile", str(missing), "--out", str(out)]) == 2
    assert "missing.json" in capfd.readouterr().err


def test_export_is_a_cli_command_and_export_py_knows_no_cli(tmp_path, capfd):
    import inspect

    import sparsify.export

    assert "sparsify.cli" not in inspect.getsource(sparsify.export)
    assert not hasattr(sparsify.export, "command_export") and not hasattr(sparsify.export, "add_export_command")
    model, inputs = manual_attention_block()
    strategy = tmp_path / "s.json"
    Strategy.uniform(find_attention(model, inputs), patterns.sliding_window(64), block_size=32).save(strategy)
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--model", "sparsify.toy_models:manual_attention_block", "--strategy", str(strategy),
                 "--out", str(onnx_file), "--check"]) == 0
    captured = capfd.readouterr()
    assert onnx_file.exists() and "max relative error" in captured.out
    assert "serves any sequence length" in captured.out
    assert captured.err == ""  # no FutureWarning, no "torchvision is not installed" lines


def test_export_lengths_that_are_not_lengths_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--lengths: '2y' is not a length"):
        main(["export", "--model", "sparsify.toy_models:manual_attention_block", "--strategy", str(tmp_path / "s.json"),
              "--out", str(tmp_path / "m.onnx"), "--lengths", "512,2y"])


def test_report_draws_every_site_over_pages(tmp_path, capsys):
    from sparsify import AttentionSite

    sites = [AttentionSite(f"layers.{i}.attn", i, num_heads=3, num_kv_heads=3, head_dim=16, q_len=256, k_len=256)
             for i in range(8)]
    path = tmp_path / "s.json"
    Strategy.uniform(sites, patterns.sliding_window(32), block_size=32).save(path)
    picture = tmp_path / "r.png"
    assert main(["report", str(path), "--png", str(picture)]) == 0
    printed = capsys.readouterr().out
    assert "2 pages" in printed and "masks only" in printed
    assert picture.exists() and (tmp_path / "r-2.png").exists()


def test_an_export_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch, capfd):
    onnx = pytest.importorskip("onnx")
    model, inputs = manual_attention_block()
    strategy = tmp_path / "s.json"
    Strategy.uniform(find_attention(model, inputs), patterns.sliding_window(64), block_size=32).save(strategy)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"the previous, working model")

    def refuse(*args, **kwargs):  # the file is written (to the temporary path), then its check fails
        raise onnx.checker.ValidationError("simulated failure after the write")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(onnx.checker.ValidationError):
        main(["export", "--model", "sparsify.toy_models:manual_attention_block", "--strategy", str(strategy),
              "--out", str(onnx_file)])
    assert onnx_file.read_bytes() == b"the previous, working model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "s.json"]
