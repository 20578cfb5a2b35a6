"""Cost model: dense vs sparse estimates, hardware profiles round-trip, calibration fits real timings."""

from __future__ import annotations

import json

import pytest

from sparsify import AttentionSite, SparsifyError
from sparsify.cost import DEFAULT_COSTS, CostModel, HardwareProfile, calibrate, shipped_profiles

SITE = AttentionSite("attn", 0, num_heads=8, num_kv_heads=8, head_dim=64, q_len=4096, k_len=4096)


def test_sparse_is_cheaper_at_low_density_and_costlier_near_dense():
    model = CostModel()
    blocks = 64 * 64
    dense = model.dense_head_latency(SITE, backend="torch", device="cpu")
    assert model.sparse_head_latency(SITE, 0.1 * blocks, backend="torch", device="cpu", block_size=64) < dense
    assert model.sparse_head_latency(SITE, 1.0 * blocks, backend="torch", device="cpu", block_size=64) > dense


def test_site_latency_mixes_dense_and_sparse_heads():
    model = CostModel()
    mixed = model.sparse_latency(SITE, [None] * 4 + [400.0] * 4, backend="torch", device="cpu", block_size=64)
    dense = model.dense_latency(SITE, backend="torch", device="cpu")
    assert 0.5 * dense < mixed < dense


def test_profile_overrides_defaults(tmp_path):
    costs = DEFAULT_COSTS[("torch", "cpu")]
    profile = HardwareProfile("torch", "cpu", "a test cpu", type(costs)(1.0, 0, 0, 1.0, 0))
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = HardwareProfile.load(path)
    assert loaded.costs == profile.costs
    model = CostModel([loaded], match_device_name=False)
    assert model.costs("torch", "cpu").launch == 1.0
    assert CostModel([loaded]).costs("torch", "cpu") == costs  # another device name: defaults


def test_malformed_profiles_are_explained(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format_version": 7}))
    with pytest.raises(SparsifyError, match="bad.json.*format_version 7"):
        HardwareProfile.load(path)
    path.write_text(json.dumps({"format_version": 1, "backend": "torch"}))
    with pytest.raises(SparsifyError, match="malformed"):
        HardwareProfile.load(path)
    with pytest.raises(SparsifyError, match="finite number"):
        HardwareProfile.from_dict({"format_version": 1, "backend": "torch", "device_type": "cpu", "device_name": "x",
                                   "costs": {"launch": -1, "per_row_block": 0, "per_block_element": 0,
                                             "dense_launch": 0, "dense_per_element": 0}})


def test_unknown_backend_device_pair_says_how_to_calibrate():
    with pytest.raises(SparsifyError, match="sparsify-cli calibrate"):
        CostModel().costs("torch", "mps")
    # A backend without constants on a known device type is priced as the torch backend.
    assert CostModel().costs("triton", "cpu") == DEFAULT_COSTS[("torch", "cpu")]


def test_calibrate_fits_the_torch_backend(tmp_path):
    profile = calibrate("torch", "cpu", lengths=(256, 512), densities=(0.2, 0.6), heads=2, head_dim=32,
                        block_size=32, repeats=1)
    # Timings on a shared 2-core machine are noisy: check the fit's shape, not its precision
    # (benchmarks/ holds the measured numbers).
    assert all(value >= 0 for value in vars(profile.costs).values())
    assert profile.costs.per_block_element > 0 or profile.costs.per_row_block > 0
    assert profile.fit["samples"] == 6 and profile.fit["mean_relative_error"] >= 0
    path = tmp_path / "cpu.json"
    profile.save(path)
    assert HardwareProfile.load(path).costs == profile.costs


def test_shipped_profiles_load():
    for profile in shipped_profiles():
        assert profile.device_type == "cuda" and profile.backend in ("triton", "flex", "torch")
