"""Reports: the table states what was measured, the picture labels every site, head and axis, files are atomic."""

from __future__ import annotations

import json

import pytest
import torch

from sparsify import AttentionSite, SparsifyError, Strategy, patterns
from sparsify.report import load_profile_maps, page_paths, render_png, report_figures, save_profile_maps, strategy_table
from sparsify.strategy import SiteStrategy

pytest.importorskip("matplotlib")


def mixed_strategy(layers: int = 2) -> Strategy:
    sites = [AttentionSite(f"model.layers.{i}.self_attn", i, num_heads=4, num_kv_heads=2, head_dim=32, q_len=1000,
                           k_len=1000, causal=True) for i in range(layers)]
    strategy = Strategy.dense(sites, block_size=64)
    long_pattern = patterns.sliding_window(128) | patterns.attention_sinks(64) | patterns.vertical_slash([0.5], [256])
    for site in sites:
        heads = [patterns.dense(), patterns.skip(), long_pattern, patterns.multi_diagonal(256, 32)]
        metrics = [{"error": 0.0}, {"error": 0.0123}, {"error": 0.0456}, {"error": 0.0789}]
        strategy = strategy.with_heads(site.name, heads, head_metrics=metrics)
    return strategy


def texts_of(figure) -> list[str]:
    from matplotlib.text import Text

    return [artist.get_text() for artist in figure.findobj(Text) if artist.get_text()]


def test_every_site_head_and_axis_is_labelled():
    strategy = mixed_strategy()
    maps = {name: torch.rand(4, 16, 16) for name in strategy.sites}
    (figure,) = report_figures(strategy, maps)
    text = "\n".join(texts_of(figure))
    for name in strategy.sites:
        assert name in text
    assert "query block ↓" in text and "key block →" in text
    assert "log10 attention mass\nper block" in text  # the colour bar
    assert "kept block" in text and "skipped block" in text and "head skipped (zeros)" in text  # the legend
    # Each head: its whole pattern (wrapped, not cut at 28 characters), its density and its measured error.
    assert "vertical_slash([0.5], [256])" in text.replace("\n", " ")
    assert "error 0.0456" in text and "error 0.0789" in text and "density 1.000" in text and "density 0.000" in text
    assert text.count("head 3") == 2


def test_masks_only_pictures_still_name_sites_and_heads():
    strategy = mixed_strategy()
    (figure,) = report_figures(strategy)
    text = "\n".join(texts_of(figure))
    assert all(name in text for name in strategy.sites) and "head 0\ndense()" in text
    assert "no profile maps" in text


def test_many_sites_spread_over_pages_and_none_is_dropped(tmp_path):
    strategy = mixed_strategy(layers=13)
    paths = render_png(strategy, tmp_path / "report.png", sites_per_page=6)
    assert paths == page_paths(tmp_path / "report.png", 3) and all(p.stat().st_size > 10_000 for p in paths)
    figures = report_figures(strategy, sites_per_page=6)
    drawn = [name for figure in figures for name in strategy.sites if name + "   ·" in "\n".join(texts_of(figure))]
    assert drawn == list(strategy.sites)


def test_picture_is_readable_at_full_size(tmp_path):
    from matplotlib.image import imread

    (path,) = render_png(mixed_strategy(), tmp_path / "report.png")
    height, width = imread(path).shape[:2]
    assert width >= 4 * 180  # each head's panel is about 200 pixels wide at 100 dpi
    assert height >= 2 * 2 * 180


def test_a_refused_picture_leaves_the_old_file(tmp_path):
    path = tmp_path / "report.png"
    render_png(mixed_strategy(), path)
    before = path.read_bytes()
    with pytest.raises(SparsifyError, match="sites_per_page"):
        render_png(mixed_strategy(), path, sites_per_page=0)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


def test_profile_maps_round_trip_and_bad_files_are_explained(tmp_path):
    path = tmp_path / "s.profile.json"
    mass = torch.rand(2, 40, 40)
    save_profile_maps({"attn": mass / mass.sum((-2, -1), keepdim=True)}, path)
    loaded = load_profile_maps(path)
    assert loaded["attn"].shape == (2, 32, 32) and torch.allclose(loaded["attn"].sum((-2, -1)), torch.ones(2), atol=1e-3)
    path.write_text(json.dumps({"format_version": 1, "sites": {"attn": {"heads": [[[-1.0]]]}}}))
    with pytest.raises(SparsifyError, match="negative or non-finite"):
        load_profile_maps(path)
    path.write_text(json.dumps({"format_version": 1, "sites": {"attn": {"heads": [[1, 2], [3]]}}}))
    with pytest.raises(SparsifyError, match="equally sized"):
        load_profile_maps(path)
    path.write_text("[" * 100_000)
    with pytest.raises(SparsifyError, match="cannot read profile maps"):
        load_profile_maps(path)


def test_table_states_density_error_and_a_sane_speedup():
    strategy = mixed_strategy(layers=1)
    table = strategy_table(strategy)
    assert "model.layers.0.self_attn" in table and "0.0789" in table
    site = AttentionSite("attn", 0, num_heads=1, num_kv_heads=1, head_dim=8, q_len=256, k_len=256)
    skipped = Strategy(64, {"attn": SiteStrategy("attn", [patterns.skip()], head_metrics=[
        {"estimated_seconds": 0.0, "dense_seconds": 1e-3}])}, Strategy.dense([site]).fingerprint)
    assert "all skipped" in strategy_table(skipped)
