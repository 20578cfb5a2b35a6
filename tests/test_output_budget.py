"""The model-level budget: sensitivities that differ by site, one global allocation, verification, the metrics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import model_zoo
from helpers import call, first_tensor
import sparsify
from sparsify import SparsifyError
from sparsify.cost import BackendCosts, CostModel, HardwareProfile
from sparsify.options import CompileOptions
from sparsify.search import allocate_within_budget, output_metric
from sparsify.search.output_budget import tighten_until_within

WORK_ONLY = CostModel([HardwareProfile("torch", "cpu", "any", BackendCosts(0.0, 0.0, 1e-11, 0.0, 1e-11))],
                      match_device_name=False)


class LoudAndQuiet(torch.nn.Module):
    """Two causal attention layers: the first's output is amplified into the model's output, the second's damped."""

    def __init__(self, dim: int = 32, heads: int = 4, loud: float = 3.0, quiet: float = 0.03, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.first_qkv, self.first_out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.second_qkv, self.second_out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.loud, self.quiet = loud, quiet

    def attend(self, x, qkv, out):
        batch, seq, dim = x.shape
        q, k, v = qkv(x).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q * 2.0, k, v, is_causal=True)   # sharper attention: sparse pays
        return out(y.transpose(1, 2).reshape(batch, seq, dim))

    def forward(self, x):
        h = x + self.loud * self.attend(x, self.first_qkv, self.first_out)
        return h + self.quiet * self.attend(h, self.second_qkv, self.second_out)


def tokens(seed: int, seq: int = 256, dim: int = 32) -> torch.Tensor:
    return torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(seed))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.double() - reference.double()).norm() / reference.double().norm())


@pytest.fixture(scope="module")
def loud_and_quiet():
    model = LoudAndQuiet().eval()
    batches = [tokens(seed) for seed in range(1, 5)]
    compiled = sparsify.compile(model, batches, max_output_error=0.05, block_size=16, progress=False,
                                cost_model=WORK_ONLY, adaptive=False)
    return model, batches, compiled


def test_sensitivities_differ_and_the_insensitive_site_takes_more_error(loud_and_quiet):
    model, _, compiled = loud_and_quiet
    record = compiled.strategy.metadata["output_budget"]
    first, second = (site.name for site in compiled.sites)
    sensitivity = record["sensitivities"]
    assert sensitivity[first] > 20 * sensitivity[second] > 0     # measured, not assumed uniform
    errors = compiled.strategy.metadata["site_errors"]
    assert errors[second] > 2 * errors[first]                   # the budget goes where it costs the output least
    assert record["metric"] == "relative_l2" and record["within_budget"]
    assert record["measured"] <= 0.05
    assert record["promised"] / 1.5 <= record["measured"] <= record["promised"] * 1.5
    summary = compiled.strategy.summary()
    assert summary["output_error"] == {"metric": "relative_l2", "budget": 0.05, "promised": record["promised"],
                                       "measured": record["measured"]}
    assert summary["mean_density"] < 0.9


def test_the_verified_error_holds_on_fresh_inputs_against_the_dense_model(loud_and_quiet):
    model, _, compiled = loud_and_quiet
    record = compiled.strategy.metadata["output_budget"]
    for seed in (101, 102):
        x = tokens(seed)
        measured = relative_error(call(compiled, (x,)), call(model, (x,)))
        assert 0 < measured <= 1.5 * 0.05
        assert measured <= 1.5 * record["measured"] + 1e-3


def test_report_shows_sensitivities_and_promised_versus_measured(loud_and_quiet):
    _, _, compiled = loud_and_quiet
    text = compiled.report()
    assert "sensitivity" in text
    assert "model-level relative_l2" in text and "promised" in text and "measured" in text


def test_a_per_site_cap_is_kept_under_the_model_level_budget():
    model = LoudAndQuiet().eval()
    batches = [tokens(seed) for seed in range(1, 5)]
    compiled = sparsify.compile(model, batches, max_output_error=0.05, max_error=0.02, block_size=16,
                                progress=False, cost_model=WORK_ONLY, adaptive=False)
    assert all(error <= 0.02 + 1e-6 for error in compiled.strategy.metadata["site_errors"].values())
    x = tokens(7)
    assert relative_error(call(compiled, (x,)), call(model, (x,))) <= 1.5 * 0.05


def test_target_density_spends_the_error_where_the_output_feels_it_least():
    model = LoudAndQuiet().eval()
    batches = [tokens(seed) for seed in range(1, 5)]
    compiled = sparsify.compile(model, batches, target_density=0.5, block_size=16, progress=False,
                                cost_model=WORK_ONLY, adaptive=False)
    first, second = (site.name for site in compiled.sites)
    assert compiled.strategy.summary()["mean_density"] <= 0.5 + 0.02
    errors = compiled.strategy.metadata["site_errors"]
    assert errors[second] >= errors[first]
    record = compiled.strategy.metadata["output_budget"]
    x = tokens(9)
    fresh = relative_error(call(compiled, (x,)), call(model, (x,)))
    assert fresh <= 1.5 * record["measured"] + 1e-3


def test_kl_of_next_token_distributions_on_a_causal_lm():
    model, _ = model_zoo.gpt2(seq=128, batch=1)
    batches = [model_zoo.gpt2(seq=128, batch=1, seed=s)[1] for s in range(1, 5)]
    compiled = sparsify.compile(model, batches, max_output_error=0.01, output_metric="kl", block_size=16,
                                progress=False, cost_model=WORK_ONLY, adaptive=False)
    record = compiled.strategy.metadata["output_budget"]
    assert record["metric"] == "kl" and record["measured"] <= 0.01
    fresh = model_zoo.gpt2(seq=128, batch=1, seed=50)[1]
    dense = torch.log_softmax(first_tensor(call(model, fresh)).double(), -1)
    sparse = torch.log_softmax(first_tensor(call(compiled, fresh)).double(), -1)
    kl = float((dense.exp() * (dense - sparse)).sum(-1).mean())
    assert kl <= 1.5 * 0.01
    assert compiled.strategy.summary()["sparse_heads"] > 0


def test_a_user_metric_is_measured_and_recorded():
    calls = []

    def worst_token(dense, sparse):
        calls.append(1)
        return float((sparse - dense).norm(dim=-1).max() / dense.norm(dim=-1).max())

    model = LoudAndQuiet().eval()
    batches = [tokens(seed) for seed in range(1, 5)]
    compiled = sparsify.compile(model, batches, max_output_error=0.1, output_metric=worst_token, block_size=16,
                                progress=False, cost_model=WORK_ONLY, adaptive=False)
    record = compiled.strategy.metadata["output_budget"]
    assert calls and record["metric"].endswith("worst_token") and record["measured"] <= 0.1
    x = tokens(11)
    assert worst_token(call(model, (x,)), call(compiled, (x,))) <= 1.5 * 0.1
    assert compiled.strategy.metadata["search"]["output_metric"].startswith("callable:")


def test_zero_output_budget_keeps_every_head_dense_and_exact():
    model = LoudAndQuiet().eval()
    batches = [tokens(seed) for seed in range(1, 3)]
    compiled = sparsify.compile(model, batches, max_output_error=0.0, block_size=16, progress=False)
    assert compiled.strategy.summary()["sparse_heads"] == 0
    x = tokens(3)
    assert torch.equal(call(compiled, (x,)), call(model, (x,)))


@pytest.mark.parametrize("keywords, message", [
    ({"output_metric": "relative_l3"}, "output_metric: unknown metric 'relative_l3'; known: kl, .*relative_l2"),
    ({"output_metric": 3}, "output_metric: must be a metric name"),
    ({"max_output_error": -0.1}, "max_output_error: must be a finite number >= 0"),
    ({"max_output_error": math.inf}, "max_output_error: must be a finite number >= 0"),
])
def test_bad_budget_options_are_refused(keywords, message):
    with pytest.raises(SparsifyError, match=message):
        CompileOptions(**keywords)


def test_which_budget_the_options_state():
    assert CompileOptions().output_budget == sparsify.options.DEFAULT_MAX_OUTPUT_ERROR == 0.02 and CompileOptions().max_error is None
    assert CompileOptions(max_error=0.1).output_budget is None            # per-site budget, as before
    assert CompileOptions(max_error=0.1, max_output_error=0.02).output_budget == 0.02
    assert CompileOptions(max_error=0.0).keeps_every_head_dense
    assert not CompileOptions(max_error=0.0, target_density=0.5).keeps_every_head_dense


def test_metrics_against_their_definitions():
    generator = torch.Generator().manual_seed(0)
    dense, sparse = torch.randn(3, 7, 11, generator=generator), torch.randn(3, 7, 11, generator=generator)
    l2 = output_metric("relative_l2")
    assert l2(dense, sparse) == pytest.approx(float((sparse - dense).double().norm() / dense.double().norm()), rel=1e-6)
    kl = output_metric("kl")
    p, q = dense.double().softmax(-1), sparse.double().softmax(-1)
    assert kl(dense, sparse) == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-9)
    assert kl(dense, dense) == 0.0 and l2.power == 2 and kl.power == 1
    with pytest.raises(SparsifyError, match="returned nan"):
        output_metric(lambda a, b: float("nan"))(dense, sparse)


def test_allocation_within_a_global_budget_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(25):
        heads, width = 4, 3
        cost = [torch.cat([torch.tensor([1.0]), torch.rand(width - 1, generator=generator, dtype=torch.float64)])
                for _ in range(heads)]
        share = [torch.cat([torch.tensor([0.0]), torch.rand(width - 1, generator=generator, dtype=torch.float64)])
                 for _ in range(heads)]
        sites, caps = [0, 0, 1, 1], [0.9, math.inf]
        budget = float(torch.rand(1, generator=generator)) * 1.5
        picks = allocate_within_budget(cost, share, budget, share, sites, caps)
        used = sum(float(s[p]) for s, p in zip(share, picks))
        assert used <= budget + 1e-9
        assert float(share[0][picks[0]] + share[1][picks[1]]) <= 0.9 + 1e-9
        best = min(sum(float(c[p]) for c, p in zip(cost, choice))
                   for choice in itertools.product(range(width), repeat=heads)
                   if sum(float(s[p]) for s, p in zip(share, choice)) <= budget
                   and float(share[0][choice[0]] + share[1][choice[1]]) <= 0.9)
        assert sum(float(c[p]) for c, p in zip(cost, picks)) <= best + 0.35
        checked += 1
    assert checked == 25


class _Choice:
    """A stand-in allocation whose predicted error is its scale."""

    def __init__(self, scale: float):
        self.scale = scale
        self.predicted = scale

    def key(self):
        return round(self.scale, 12)


@pytest.mark.parametrize("bias", [0.3, 1.0, 3.0, 50.0])
def test_tightening_ends_within_the_budget_whatever_the_prediction_bias(bias):
    measured = []

    def measure(choice):
        measured.append(choice.scale)
        return bias * choice.predicted, None

    choice, trail, best = tighten_until_within(_Choice, measure, budget=1.0)
    assert trail[best].measured <= 1.0 and trail[best].measured == bias * choice.scale
    assert len(trail) == len(set(measured)) <= 7
    assert trail[best].measured >= 0.5          # not tightened far past the budget


def test_sensitivities_resumed_at_each_site_equal_whole_runs():
    # measure_each_alone resumes every site's pass from the dense run's values at that site: the
    # errors must be the ones whole passes measure (same arithmetic), site by site.
    from sparsify.api import capture_attention
    from sparsify.distributed import calibration_group
    from sparsify.search.output_budget import OutputVerifier, _mutates_in_place

    model = LoudAndQuiet().eval()
    batches = [((tokens(seed),), {}) for seed in (7, 8)]
    captured, sites = capture_attention(model, batches[0][0])
    assert len(sites) == 2 and not _mutates_in_place(captured.graph_module)
    generator = torch.Generator().manual_seed(3)
    noise = {site.name: torch.randn(1, 4, 256, 8, generator=generator) for site in sites}

    def perturbed(name):
        def replacement(q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale) + 0.01 * noise[name]
        return replacement

    replacements = {site.name: perturbed(site.name) for site in sites}
    verifier = OutputVerifier(captured.graph_module, batches, output_metric("relative_l2"), calibration_group(False))
    alone = verifier.measure_each_alone(replacements)
    whole = {name: verifier.measure({name: replacement}) for name, replacement in replacements.items()}
    assert alone.keys() == whole.keys()
    for name in whole:
        assert whole[name] > 0 and math.isclose(alone[name], whole[name], rel_tol=1e-9), (name, alone, whole)
    # The loud (first) site reaches the output more than the quiet one.
    first, second = (site.name for site in sites)
    assert alone[first] > 10 * alone[second]


@pytest.mark.gpu
def test_the_model_level_search_runs_on_a_cuda_model():
    # The sensitivity probes and the verification build runtime modules for the model's device: a model on the GPU
    # searched under the default (model-level) budget must not meet CPU sites (it did once: every GPU search failed).
    model = LoudAndQuiet().eval().cuda()
    batches = [tokens(seed).cuda() for seed in range(1, 4)]
    work_only = CostModel([HardwareProfile(backend, "cuda", "any", BackendCosts(0.0, 0.0, 1e-11, 0.0, 1e-11))
                           for backend in ("torch", "triton", "flex", "fa4")], match_device_name=False)
    compiled = sparsify.compile(model, batches, max_output_error=0.05, block_size=16, progress=False,
                                cost_model=work_only, adaptive=False)
    record = compiled.strategy.metadata["output_budget"]
    assert record["within_budget"] and record["measured"] <= 0.05
    assert compiled.strategy.summary()["mean_density"] < 1.0
    x = tokens(101).cuda()
    assert relative_error(call(compiled, (x,)), call(model, (x,))) <= 1.5 * 0.05


class _RoundingModel:
    """A verifier stand-in: a perturbation of relative size ``e`` at site ``s`` moves the output by ``κ_s e² + ν_s``
    (additive form) — the growing part and a rounding-noise floor, as a bfloat16 model behaves."""

    def __init__(self, kappa: dict[str, float], floor: dict[str, float]):
        generator = torch.Generator().manual_seed(5)
        self.q, self.k, self.v = (torch.randn(1, 2, 64, 8, generator=generator, dtype=torch.float64) for _ in range(3))
        self.kappa, self.floor = kappa, floor

    def measure_each_alone(self, replacements):
        from sparsify.ops import dense_attention

        dense = dense_attention(self.q, self.k, self.v, None, True, None)
        errors = {name: relative_error(replacement(self.q, self.k, self.v, None, True, None), dense)
                  for name, replacement in replacements.items()}
        return {name: self.kappa[name] * error**2 + self.floor[name] for name, error in errors.items()}


def test_the_rounding_noise_floor_is_what_a_perturbation_of_one_rounding_step_moves():
    from types import SimpleNamespace

    from sparsify.ops import dense_attention
    from sparsify.search.output_budget import FLOOR_PROBE_ERROR, measure_noise_floors, measure_sensitivities

    sites = [SimpleNamespace(name="early"), SimpleNamespace(name="late"), SimpleNamespace(name="dense only")]
    kappa, floor = {"early": 0.2, "late": 0.01}, {"early": 4e-4, "late": 1e-5}
    verifier = _RoundingModel(kappa, floor)
    noise = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def probe(q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):   # a sparse output: dense + a change
        return dense_attention(q, k, v, attn_mask, is_causal, scale) + 0.1 * noise

    probes = {"early": probe, "late": probe}
    floors = measure_noise_floors(verifier, sites, probes)
    assert floors["dense only"] == 0.0
    for name in probes:   # the floor probe's growing part is one rounding step's
        assert math.isclose(floors[name], floor[name] + kappa[name] * FLOOR_PROBE_ERROR**2, rel_tol=1e-6)
    sensitivities = measure_sensitivities(verifier, sites, probes)   # they keep the floor: they err high
    for name in probes:
        assert math.isclose(sensitivities[name], kappa[name] + floor[name] / 0.05**2, rel_tol=1e-6)


def test_a_bfloat16_search_takes_the_rounding_floor_out_and_records_it(loud_and_quiet):
    # In bfloat16 the floor is measured per site and recorded; the budget bounds what the sparsity adds beyond it.
    # In float32 (the fixture) nothing is measured or recorded.
    assert "noise_floor" not in loud_and_quiet[2].strategy.metadata["output_budget"]
    model = LoudAndQuiet(loud=1.0, quiet=0.3).eval().to(torch.bfloat16)
    batches = [tokens(seed).to(torch.bfloat16) for seed in range(1, 5)]
    compiled = sparsify.compile(model, batches, max_output_error=0.05, block_size=16, progress=False,
                                cost_model=WORK_ONLY, adaptive=False)
    record = compiled.strategy.metadata["output_budget"]
    floors = record["noise_floors"]
    assert set(floors) == {site.name for site in compiled.sites} and all(value > 0 for value in floors.values())
    assert record["noise_floor"] in floors.values() or record["noise_floor"] == 0.0
    assert record["measured"] <= 0.05 and record["within_budget"]
    assert math.isclose(record["measured"] ** 2, max(0.0, record["measured_with_noise"] ** 2 - record["noise_floor"] ** 2),
                        rel_tol=1e-4, abs_tol=1e-10)
    assert "rounding-noise floor" in compiled.report()
