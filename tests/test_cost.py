"""Cost model: dense vs sparse estimates, hardware profiles round-trip, calibration fits real timings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsify import AttentionSite, SparsifyError
from sparsify.cost import DEFAULT_COSTS, BackendCosts, CostModel, HardwareProfile, calibrate, shipped_profiles
from sparsify.block_mask import RuntimeBlockMask

SITE = AttentionSite("attn", 0, num_heads=8, num_kv_heads=8, head_dim=64, q_len=4096, k_len=4096)


def _random_mask(heads: int, density: float, *, length: int = 4096, block_size: int = 64, causal: bool = False,
                 seed: int = 0) -> RuntimeBlockMask:
    blocks = length // block_size
    generator = torch.Generator().manual_seed(seed)
    kept = torch.rand(heads, blocks, blocks, generator=generator) < density
    return RuntimeBlockMask.from_block_masks(kept, block_size=block_size, q_len=length, k_len=length, causal=causal)


def test_sparse_is_cheaper_at_low_density_and_costlier_near_dense():
    model = CostModel()
    dense = model.head_latency(SITE, None, backend="torch", device="cpu")
    assert model.head_latency(SITE, _random_mask(1, 0.1), backend="torch", device="cpu") < dense
    assert model.head_latency(SITE, _random_mask(1, 1.0), backend="torch", device="cpu") > dense


def test_head_latency_prices_the_masks_own_kept_blocks():
    model = CostModel()
    costs = model.costs("torch", "cpu")
    mask = _random_mask(3, 0.3, causal=True, seed=1)
    for head in range(3):
        kept = int(mask.to_block_masks()[0, head].sum())       # counted from the expanded bool grid, independently
        expected = 64 * costs.per_row_block + kept * 64**2 * SITE.head_dim * costs.per_block_element
        assert model.head_latency(SITE, mask, head, backend="torch", device="cpu") == pytest.approx(expected, rel=1e-12)
        assert model.head_latency(SITE, mask, head, backend="torch", device="cpu", batch=2) == pytest.approx(2 * expected)
    # An input-adaptive head: the measured kept blocks replace the mask's own count (its geometry stays).
    override = model.head_latency(SITE, mask, backend="torch", device="cpu", kept_blocks=10.0)
    assert override == pytest.approx(64 * costs.per_row_block + 10 * 64**2 * SITE.head_dim * costs.per_block_element)
    dense = model.head_latency(SITE, None, backend="torch", device="cpu")
    assert dense == pytest.approx(4096 * 4096 * SITE.head_dim * costs.dense_per_element)
    with pytest.raises(SparsifyError, match="head 3 of a mask of 3"):
        model.head_latency(SITE, mask, 3, backend="torch", device="cpu")


def test_site_latency_mixes_dense_and_sparse_heads():
    model = CostModel()
    costs = model.costs("torch", "cpu")
    mask = _random_mask(4, 0.1, seed=2)
    mixed = model.latency(SITE, mask, "torch", "cpu")
    dense = model.dense_latency(SITE, backend="torch", device="cpu")
    assert dense == model.latency(SITE, None, "torch", "cpu")
    assert 0.5 * dense < mixed < dense
    heads = sum(model.head_latency(SITE, mask, head, backend="torch", device="cpu") for head in range(4))
    dense_head = model.head_latency(SITE, None, backend="torch", device="cpu")
    assert mixed == pytest.approx(costs.launch + heads + costs.dense_launch + 4 * dense_head)
    assert model.latency(SITE, mask, "torch", "cpu", dense_heads=0) == pytest.approx(costs.launch + heads)
    with pytest.raises(SparsifyError, match="has 8 heads but its mask holds 9"):
        model.latency(SITE, _random_mask(9, 0.1), "torch", "cpu")


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


def linear_timer(costs: BackendCosts):
    """A timer that answers with the cost model's own formula: calibration must recover ``costs``."""

    def timer(measurement, device, repeats):
        if measurement.kind == "sparse":
            return sum(c * x for c, x in zip((costs.launch, costs.per_row_block, costs.per_block_element),
                                             measurement.features))
        return costs.dense_launch + costs.dense_per_element * measurement.features[1]

    return timer


def test_calibrate_recovers_known_constants_exactly():
    # Deterministic: the measurements come from known constants, so the fit is checked to 1e-6, not "roughly".
    truth = BackendCosts(launch=2e-4, per_row_block=3e-6, per_block_element=4e-11, dense_launch=5e-5,
                         dense_per_element=2e-11)
    profile = calibrate("torch", "cpu", lengths=(256, 512), densities=(0.2, 0.6), heads=2, head_dim=32, block_size=32,
                        repeats=1, timer=linear_timer(truth))
    for name, value in vars(truth).items():
        assert getattr(profile.costs, name) == pytest.approx(value, rel=1e-6), name
    assert profile.fit["samples"] == 6 and profile.fit["mean_relative_error"] < 1e-9


def test_calibrate_refuses_timings_that_do_not_grow_with_density():
    # Under load the sparse time can look flat in the density: no per-block cost can be fitted, and
    # a profile saying "every density costs the same" would mislead the search. It is re-measured, then refused.
    attempts = []

    def flat(measurement, device, repeats):
        attempts.append(repeats)
        return 1e-3

    with pytest.raises(SparsifyError, match="did not grow with the number of kept blocks"):
        calibrate("torch", "cpu", lengths=(256,), densities=(0.2, 0.6), heads=2, head_dim=32, block_size=32,
                  repeats=1, timer=flat, attempts=3)
    assert sorted(set(attempts)) == [1, 2, 4]  # each attempt doubles the repeats


def test_calibrate_measures_the_torch_backend(tmp_path):
    # Real timings (noisy on a shared machine): calibration either fits a per-block cost or re-measures
    # until it does; the profile it returns is valid and round-trips.
    profile = calibrate("torch", "cpu", lengths=(256, 512), densities=(0.1, 0.8), heads=2, head_dim=32,
                        block_size=32, repeats=2)
    assert all(value >= 0 and math.isfinite(value) for value in vars(profile.costs).values())
    assert profile.costs.per_block_element > 0
    assert profile.fit["samples"] == 6 and profile.fit["dtype"] == "float32"
    path = tmp_path / "cpu.json"
    profile.save(path)
    assert HardwareProfile.load(path).costs == profile.costs


def test_a_failed_profile_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "profile.json"
    good = HardwareProfile("torch", "cpu", "a test cpu", DEFAULT_COSTS[("torch", "cpu")])
    good.save(path)
    broken = HardwareProfile("torch", "cpu", "a test cpu", DEFAULT_COSTS[("torch", "cpu")], fit={"bad": {1, 2}})
    with pytest.raises(TypeError):
        broken.save(path)  # not JSON: fails while producing the text
    assert HardwareProfile.load(path).costs == good.costs and sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]


def test_chosen_hardware_profiles_come_first(tmp_path, caplog):
    mine = HardwareProfile("triton", "cuda", "Some Other GPU X1", BackendCosts(1.0, 2.0, 3.0, 4.0, 5.0))
    path = tmp_path / "mine.json"
    mine.save(path)
    model = CostModel.default([path])
    assert model.costs("torch", "cpu") == DEFAULT_COSTS[("torch", "cpu")]  # other backends: as before
    assert CostModel.default([str(path)]).preferred[0].costs == mine.costs
    with pytest.raises(SparsifyError, match="cannot read hardware profile"):
        CostModel.default([tmp_path / "missing.json"])


def test_shipped_profiles_load():
    profiles = shipped_profiles()
    assert {(p.backend, p.device_name.split()[1]) for p in profiles} >= {("fa4", "H200"), ("triton", "H100")}
    site = AttentionSite("attn", 0, num_heads=16, num_kv_heads=16, head_dim=128, q_len=16384, k_len=16384, causal=True)
    for profile in profiles:
        assert profile.device_type == "cuda" and profile.backend in ("fa4", "triton", "flex", "torch")
        costs = profile.costs
        # Measured numbers of a Hopper GPU in bf16: a multiply-add of dense attention at 20-2000 TFLOP/s
        # (2 flops each), a launch between 1 us and 1 ms, and a fit that explains its own samples.
        assert 1e-15 <= costs.dense_per_element <= 1e-13 and 1e-15 <= costs.per_block_element <= 1e-13
        assert 1e-6 <= costs.dense_launch <= 1e-3 and 0 <= costs.launch <= 1e-3
        assert profile.fit["mean_relative_error"] < 0.2 and profile.fit.get("density_growth", 1.05) >= 1.05
        model = CostModel.priced_for(profile)
        dense = model.dense_latency(site, backend=profile.backend, device="cuda")
        sparse = [model.latency(site, _random_mask(16, density, length=16384, block_size=128, causal=True), profile.backend,
                                "cuda") for density in (0.1, 0.3, 0.6)]
        assert sparse[0] < sparse[1] < sparse[2]                     # more kept blocks, more time
        assert sparse[0] < dense                                      # at 16K tokens a 10% mask pays


@pytest.mark.gpu
def test_default_cuda_constants_say_where_they_were_measured(caplog):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sparsify.cost import DEFAULT_CUDA_COSTS_MEASURED_ON, _same_device

    model = CostModel(match_device_name=True)   # no shipped profiles: the defaults
    with caplog.at_level("WARNING", logger="sparsify.cost"):
        model.costs("triton", "cuda")
        model.costs("triton", "cuda")
    warned = [record for record in caplog.records if "no hardware profile for backend 'triton'" in record.message]
    expected = 0 if _same_device(DEFAULT_CUDA_COSTS_MEASURED_ON, "cuda") else 1
    assert len(warned) == expected    # once per backend, and only away from the card the defaults were measured on
