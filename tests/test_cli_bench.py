"""`sparsify-cli bench`: both doors, one table row with the measured numbers, clear errors."""

from __future__ import annotations

import pytest

import model_zoo
import sparsify
from sparsify import patterns
from sparsify.cli import main

HEADERS = ["tokens", "sparse sites", "density", "dense ms", "sparse ms", "speedup", "output error"]


def _row(output: str) -> dict[str, str]:
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    values = [cell.strip() for cell in lines[2].strip("|").split("|")]
    return dict(zip(header, values))


def test_bench_times_the_graph_door(tmp_path, capsys):
    model, inputs = sparsify.toy_models.manual_attention_block()
    sites = sparsify.find_attention(model, inputs)
    path = tmp_path / "strategy.json"
    sparsify.Strategy.uniform(sites, patterns.sliding_window(64), block_size=32).save(path)
    assert main(["bench", "--model", "sparsify.toy_models:manual_attention_block", "--strategy", str(path),
                 "--device", "cpu", "--repeats", "2", "--warmup", "1", "--threads", "1"]) == 0
    output = capsys.readouterr().out
    row = _row(output)
    assert list(row) == HEADERS
    assert row["tokens"] == "256" and row["sparse sites"] == "1/1"
    assert 0 < float(row["density"]) < 1
    assert float(row["dense ms"]) > 0 and float(row["sparse ms"]) > 0 and row["speedup"].endswith("x")
    assert 1e-6 < float(row["output error"]) < 1                 # sparse: not the dense output, not garbage
    assert "graph door" in output and "median of 2" in output


def test_bench_times_the_framework_door_on_a_transformers_model(tmp_path, capsys):
    model, inputs = model_zoo.llama()
    sites = sparsify.find_attention(model, inputs)
    path = tmp_path / "strategy.json"
    sparsify.Strategy.dense(sites, block_size=16).save(path)
    assert main(["bench", "--model", "model_zoo:llama", "--strategy", str(path), "--door", "framework",
                 "--device", "cpu", "--repeats", "1", "--warmup", "0"]) == 0
    row = _row(capsys.readouterr().out)
    assert row["tokens"] == "96" and row["sparse sites"] == "0/2" and float(row["density"]) == 1.0
    assert float(row["output error"]) == 0.0                      # dense strategy: the original's output


def test_bench_with_a_strategy_of_another_model_names_the_sites(tmp_path, capsys):
    model, inputs = model_zoo.gpt2()
    path = tmp_path / "strategy.json"
    sparsify.Strategy.dense(sparsify.find_attention(model, inputs)).save(path)
    assert main(["bench", "--model", "model_zoo:llama", "--strategy", str(path), "--door", "framework",
                 "--device", "cpu", "--repeats", "1"]) == 2
    assert "transformer.h.0.attn" in capsys.readouterr().err


def test_bench_needs_its_arguments():
    with pytest.raises(SystemExit):
        main(["bench", "--strategy", "strategy.json"])
