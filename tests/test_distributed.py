"""Distributed calibration (2 gloo ranks on CPU) equals one process on the union; failures stop every rank; head shards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from distributed_helpers import COLLECTIVE_TIMEOUT, JOIN_SECONDS, gpu_world_sizes, needs_gpus, run_ranks
from helpers import masked_attention_reference
import sparsify
from sparsify import patterns
from sparsify.api import search_model
from sparsify.cost import BackendCosts, CostModel, HardwareProfile
from sparsify.distributed import (
    BatchShard,
    calibration_group,
    contiguous_shard,
    is_main_process,
)
from sparsify.errors import SparsifyError, StrategyError
from sparsify.toy_models import StructuredVideoTransformer
from sparsify.options import CompileOptions
from sparsify.site import AttentionSite
from sparsify.strategy import Strategy

# Prices work only, so that at test lengths the search picks sparse patterns (see tests/test_search.py).
WORK_ONLY = CostModel([HardwareProfile("torch", "cpu", "any", BackendCosts(0.0, 0.0, 1e-11, 0.0, 1e-11))],
                      match_device_name=False)
# Block 32 with 8 sampled rows: the profile and the scores sample rows, so the per-call seeding is exercised.
SAMPLED = dict(block_size=32, profile_rows_per_block=8, score_rows_per_block=8)


# -- data-parallel search equals one process on the union ----------------------------------------

def video_model() -> StructuredVideoTransformer:
    return StructuredVideoTransformer(frames=4, height=8, width=8, dim=64, heads=4, layers=2).eval()


def shards_of(scenario: str) -> list[list[torch.Tensor]]:
    """Per rank, its calibration batches; the union is their rank-major concatenation."""
    model = video_model()
    tokens = [model.example_tokens(seed=seed) for seed in range(1, 6)]
    if scenario == "uneven":  # 3 + 2 batches, same lengths: every rank adds to the profile
        return [tokens[:3], tokens[3:]]
    if scenario == "lengths":  # only rank 1 sees the longest sequence: its profile wins
        short = [t[:, :192] for t in tokens]
        return [short[:3], [tokens[3], short[4]]]
    if scenario == "generations":  # 2 + 1 generations of 2 steps; step 0 of each stays dense and is not profiled
        return [tokens[:4], [tokens[4], tokens[0]]]
    raise ValueError(scenario)


def scenario_config(scenario: str) -> CompileOptions:
    if scenario == "lengths":
        return CompileOptions(target_density=0.5, **SAMPLED)  # a global target: one multiplier over every site
    if scenario == "generations":
        return CompileOptions(max_error=0.05, dense_steps=1, steps_per_generation=2, **SAMPLED)
    return CompileOptions(max_error=0.05, **SAMPLED)


def search_summary(model, batches, config, process_group) -> dict:
    result = search_model(model, batches, config, cost_model=WORK_ONLY, progress=False, process_group=process_group)
    return {
        "strategy": result.compiled.strategy.to_dict(),
        "profiles": {name: {"mass": profile.mass.tolist(), "rows": profile.rows, "lengths": [profile.q_len, profile.k_len]}
                     for name, profile in result.search.profiles.items()},
    }


SCENARIOS = ("uneven", "lengths", "generations")


def _every_job(rank, world_size, directory):
    """What each of the two ranks runs (one spawn for the whole module: starting processes is the slow part)."""
    results = {scenario: _search_job(rank, world_size, directory / scenario, scenario) for scenario in SCENARIOS}
    results["failures"] = _failure_job(rank, world_size)
    dist.destroy_process_group()
    results["cli"] = _cli_job(directory / "cli")  # initialises its own group from torchrun's variables
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("two_ranks")
    for job in (*SCENARIOS, "cli"):
        (directory / job).mkdir()
    return directory, run_ranks(_every_job, 2, directory)


def _search_job(rank, world_size, directory, scenario):
    model = video_model()
    summary = search_summary(model, shards_of(scenario)[rank], scenario_config(scenario), None)
    strategy = Strategy.from_dict(summary["strategy"])
    # Rank 0 alone writes a whole-model strategy; every rank writes its own head shard.
    if is_main_process():  # the caller decides which rank writes a file every rank holds
        strategy.save(directory / "whole.json")
        strategy.save(directory / f"whole_from_rank_{rank}.json")
    strategy.shard_heads(rank, world_size).save(directory / f"shard_{rank}.json")
    summary["is_main_process"] = is_main_process()
    return summary


def assert_same_search(distributed: dict, single: dict, rel: float = 1e-9) -> None:
    """The same pattern on every head; metrics, errors and profiles equal up to the order of sums (``rel``)."""
    got, expected = distributed["strategy"], single["strategy"]
    assert list(got["sites"]) == list(expected["sites"])
    assert got["fingerprint"] == expected["fingerprint"]  # rank 0's capture lengths = the union's first batch
    for name, site in expected["sites"].items():
        assert got["sites"][name]["heads"] == site["heads"], name  # the same pattern choice, head by head
        for mine, theirs in zip(got["sites"][name]["head_metrics"], site["head_metrics"]):
            for key, value in theirs.items():
                assert mine[key] == pytest.approx(value, rel=rel, abs=1e-12), (name, key)
        assert got["metadata"]["site_errors"][name] == pytest.approx(expected["metadata"]["site_errors"][name], abs=1e-6)
    assert got["metadata"]["end_to_end_error"] == pytest.approx(expected["metadata"]["end_to_end_error"],
                                                                 rel=max(rel, 1e-6))
    assert distributed["profiles"].keys() == single["profiles"].keys()
    for name, profile in single["profiles"].items():
        other = distributed["profiles"][name]
        assert other["lengths"] == profile["lengths"] and other["rows"] == profile["rows"], name
        torch.testing.assert_close(torch.tensor(other["mass"], dtype=torch.float64),
                                   torch.tensor(profile["mass"], dtype=torch.float64), rtol=rel * 1e-3, atol=1e-12)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_find_the_strategy_one_process_finds_on_the_union(two_ranks, scenario):
    directory, everything = two_ranks
    results = [result[scenario] for result in everything]
    union = [batch for shard in shards_of(scenario) for batch in shard]
    single = search_summary(video_model(), union, scenario_config(scenario), False)
    assert any(site["heads"] != [{"pattern": "dense"}] * 4 for site in single["strategy"]["sites"].values())
    for rank, result in enumerate(results):
        assert_same_search(result, single)
        assert result["strategy"] == results[0]["strategy"], f"rank {rank} differs from rank 0"
        assert result["is_main_process"] == (rank == 0)
    counts = [len(shard) for shard in shards_of(scenario)]
    assert results[0]["strategy"]["metadata"]["distributed"] == {"world_size": 2, "batches_per_rank": counts}
    if scenario == "lengths":
        assert next(iter(single["profiles"].values()))["lengths"] == [256, 256]  # rank 1's longest batch won
    if scenario == "generations":
        assert all(site["dense_steps"] == 1 for site in single["strategy"]["sites"].values())
    # Files: the whole strategy from rank 0 only; a head shard from every rank.
    files = directory / scenario
    assert sorted(p.name for p in files.iterdir()) == ["shard_0.json", "shard_1.json", "whole.json",
                                                       "whole_from_rank_0.json"]
    whole = Strategy.load(files / "whole.json")
    for rank in range(2):
        assert Strategy.load(files / f"shard_{rank}.json") == whole.shard_heads(rank, 2)


# -- failures stop every rank -------------------------------------------------------------------

# What rank 1 does wrong, and what every rank's error must quote. Of the 2 + 2 batches, global
# batches 0-2 profile and 3 (rank 1's second) is held out: the NaN cases fail while profiling and
# while scoring candidates, after the profiles were reduced.
FAILURES = {
    "nan profile batch": "calibration batch 0: the query of site 'blocks.0.attn' holds NaN",
    "nan held-out batch": "calibration batch 1: the query of site 'blocks.0.attn' holds NaN",
    "batch structure": "every batch must have the same structure",
    "empty loader": "the calibration loader is empty",
}


def _failing_rank_batches(case: str, rank: int) -> list:
    model = video_model()
    batches = [model.example_tokens(seed=seed + 10 * rank) for seed in range(1, 3)]
    if case == "both ranks fail" and rank == 0:
        return []
    if rank != 1:
        return batches
    if case.startswith("nan"):
        poisoned = 0 if case == "nan profile batch" else 1
        batches[poisoned] = batches[poisoned].clone()
        batches[poisoned][0, 5, 3] = float("nan")
    elif case in ("batch structure", "both ranks fail"):
        batches[1] = (batches[1], batches[1])
    elif case == "empty loader":
        batches = []
    return batches


def _failure_job(rank, world_size):
    model = video_model()
    outcomes = {}
    cases = [(case, _failing_rank_batches(case, rank), CompileOptions(**SAMPLED)) for case in [*FAILURES, "both ranks fail"]]
    # Ranks that disagree on the options, or whose step numbers would not agree, are refused on every rank.
    cases.append(("options differ", _failing_rank_batches("none", rank), CompileOptions(max_error=0.05 + 0.05 * rank,
                                                                                       **SAMPLED)))
    batches = [model.example_tokens(seed=seed) for seed in range(3 - rank)]  # 3 + 2: rank 0 ends mid-generation
    cases.append(("partial generation", batches, CompileOptions(dense_steps=1, steps_per_generation=2, **SAMPLED)))
    for case, batches, config in cases:
        started = time.monotonic()
        try:
            search_model(model, batches, config, cost_model=WORK_ONLY, progress=False)
            outcomes[case] = {"raised": None}
        except Exception as error:  # noqa: BLE001 - what each rank raised is the result
            outcomes[case] = {"raised": type(error).__name__, "message": str(error),
                              "failures": sorted(getattr(error, "failures", {})),
                              "seconds": time.monotonic() - started}
    # After every failure the ranks are still in step: one more collective lines up.
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    outcomes["in step"] = float(total)
    return outcomes


def test_a_failing_rank_makes_every_rank_raise_naming_it(two_ranks):
    results = [result["failures"] for result in two_ranks[1]]
    for rank, outcomes in enumerate(results):
        assert outcomes["in step"] == 3.0
        for case, text in FAILURES.items():
            outcome = outcomes[case]
            assert outcome["raised"] == "DistributedCalibrationError", (rank, case, outcome)
            assert outcome["failures"] == [1], (rank, case)
            assert "calibration failed on rank 1 of 2" in outcome["message"]
            assert text in outcome["message"], (rank, case, outcome["message"])
            assert outcome["seconds"] < COLLECTIVE_TIMEOUT.total_seconds() / 2  # reported, not timed out
        both = outcomes["both ranks fail"]
        assert both["failures"] == [0, 1] and "calibration failed on rank 0, 1 of 2" in both["message"], both
        assert FAILURES["empty loader"] in both["message"] and FAILURES["batch structure"] in both["message"]
        refused = outcomes["options differ"]
        assert refused["raised"] == "DistributedCalibrationError" and "max_error" in refused["message"], refused
        refused = outcomes["partial generation"]
        assert refused["raised"] == "DistributedCalibrationError", refused
        assert "rank(s) [0] calibrate on [3] calls, not a multiple of steps_per_generation=2" in refused["message"]
    # Rank 0 waited where rank 1's failure reached it: before reducing the profile, then before reducing the scores.
    assert "stopped at 'agreeing on profile lengths'" in results[0]["nan profile batch"]["message"]
    assert "stopped at 'agreeing on candidate patterns'" in results[0]["nan held-out batch"]["message"]


# -- the CLI under torchrun's environment -------------------------------------------------------

def tiny_video_factory():
    """``--model`` for the CLI tests."""
    model = video_model()
    return model, (model.example_tokens(seed=1),)


def tiny_video_batches():
    """``--calib`` for the CLI tests: 5 batches, split 3 + 2 over two ranks."""
    return [batch for shard in shards_of("uneven") for batch in shard]


def _cli_arguments(out: Path) -> list[str]:
    return ["search", "--model", "test_distributed:tiny_video_factory", "--calib", "test_distributed:tiny_video_batches",
            "--block-size", "32", "--max-error", "0.05", "--no-progress", "--out", str(out)]


def _cli_job(directory):
    from sparsify import cli

    code = cli.main(_cli_arguments(directory / "distributed.json"))
    return {"code": code, "initialised_after": dist.is_initialized()}


def test_cli_search_under_torchrun_environment_writes_once_and_matches_one_process(two_ranks, tmp_path, capsys):
    from sparsify import cli

    directory = two_ranks[0] / "cli"
    results = [result["cli"] for result in two_ranks[1]]
    assert [r["code"] for r in results] == [0, 0]
    assert not any(r["initialised_after"] for r in results)  # the CLI closes the group it opened
    assert sorted(p.name for p in directory.iterdir()) == ["distributed.json", "distributed.profile.json"]
    assert cli.main(_cli_arguments(tmp_path / "single.json")) == 0
    capsys.readouterr()
    distributed, single = Strategy.load(directory / "distributed.json"), Strategy.load(tmp_path / "single.json")
    assert distributed.sites == single.sites
    assert distributed.metadata["distributed"] == {"world_size": 2, "batches_per_rank": [3, 2]}
    maps = [json.loads(path.read_text()) for path in (directory / "distributed.profile.json",
                                                      tmp_path / "single.profile.json")]
    assert maps[0]["sites"].keys() == maps[1]["sites"].keys()
    for name, site in maps[1]["sites"].items():  # the same maps (written to 4 significant digits)
        torch.testing.assert_close(torch.tensor(maps[0]["sites"][name]["heads"]), torch.tensor(site["heads"]),
                                   rtol=1e-3, atol=1e-6)


# -- helpers that need no second process --------------------------------------------------------

def test_contiguous_shards_concatenate_to_the_whole_and_refuse_empty_ranks():
    items = list(range(7))
    shards = [contiguous_shard(items, rank, 3) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert [i for shard in shards for i in shard] == items
    with pytest.raises(SparsifyError, match="2 calibration batches cannot be split over 3 ranks"):
        contiguous_shard([0, 1], 0, 3)


def test_batch_shard_maps_global_indices_to_the_rank_holding_them():
    shards = [BatchShard(rank, (3, 1, 2)) for rank in range(3)]
    assert [s.offset for s in shards] == [0, 3, 4] and all(s.total == 6 for s in shards)
    held_out = [3, 4, 5]
    assert [s.local(held_out) for s in shards] == [[], [0], [0, 1]]


def test_a_local_group_changes_nothing():
    group = calibration_group(False)
    assert not group.is_distributed and group.is_main
    assert group.batch_shard(3) == BatchShard(0, (3,))
    assert group.sum_floats([1.0, 2.5]) == [1.0, 2.5]
    with pytest.raises(ValueError):
        with group.guard():
            raise ValueError("passes through unchanged")
    assert calibration_group(group) is group
    assert not calibration_group(None).is_distributed  # no process group initialised in this process


def test_a_process_group_without_initialisation_is_refused():
    with pytest.raises(SparsifyError, match="torch.distributed is not initialised"):
        calibration_group(object())


# -- head shards ----------------------------------------------------------------------------------

class HeadAttention(nn.Module):
    """SDPA self-attention over the heads it holds; returns ``[batch, seq, heads, head_dim]`` (no output projection)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, causal: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, causal
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * head_dim, bias=False)

    def projections(self, x):
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x):
        q, k, v = self.projections(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.kv_heads != self.heads)
        return out.transpose(1, 2)

    def shard(self, rank: int, world_size: int) -> "HeadAttention":
        """Rank ``rank``'s contiguous heads, as tensor parallel splits a layer (kv heads replicated when fewer than ranks)."""
        heads = self.heads // world_size
        kv_heads = max(1, self.kv_heads // world_size)
        first_kv = rank * heads // (self.heads // self.kv_heads)
        shard = HeadAttention(self.q.in_features, heads, kv_heads, self.head_dim, self.causal)
        with torch.no_grad():
            shard.q.weight.copy_(self.q.weight[rank * heads * self.head_dim:(rank + 1) * heads * self.head_dim])
            rows = slice(first_kv * self.head_dim, (first_kv + kv_heads) * self.head_dim)
            shard.k.weight.copy_(self.k.weight[rows])
            shard.v.weight.copy_(self.v.weight[rows])
        return shard


class TwoAttentions(nn.Module):
    """A multi-head and a grouped-query causal attention over one input: ``[batch, seq, 2, heads, head_dim]``."""

    def __init__(self, dim=32, heads=8, kv_heads=4, head_dim=8):
        super().__init__()
        self.mha = HeadAttention(dim, heads, heads, head_dim, causal=False)
        self.gqa = HeadAttention(dim, heads, kv_heads, head_dim, causal=True)

    def forward(self, x):
        return torch.stack([self.mha(x), self.gqa(x)], dim=2)

    def shard(self, rank: int, world_size: int) -> "TwoAttentions":
        shard = TwoAttentions.__new__(TwoAttentions)
        nn.Module.__init__(shard)
        shard.mha = self.mha.shard(rank, world_size)
        shard.gqa = self.gqa.shard(rank, world_size)
        return shard.eval()


HEAD_PATTERNS = [patterns.dense(), patterns.sliding_window(64), patterns.skip(), patterns.a_shape(32, 32),
                 patterns.multi_diagonal(96, 16), patterns.vertical_slash([0.5], [0, 128], 32), patterns.dense(),
                 patterns.radial(32, 32)]


def mixed_strategy(sites) -> Strategy:
    strategy = Strategy.dense(sites, block_size=32)
    strategy = strategy.with_heads("mha", HEAD_PATTERNS)
    return strategy.with_heads("gqa", HEAD_PATTERNS[::-1])


def dense_reference(attention: HeadAttention, x: torch.Tensor, head_patterns, block_size: int) -> torch.Tensor:
    """float64 attention of every head restricted to its pattern's blocks (and causality)."""
    q, k, v = (t.double() for t in attention.projections(x))
    seq = x.shape[1]
    blocks = math.ceil(seq / block_size)
    keep = []
    for pattern in head_patterns:
        mask = pattern.block_mask(blocks, blocks, block_size=block_size, causal=attention.causal, q_len=seq, k_len=seq)
        element = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:seq, :seq]
        if getattr(pattern, "is_skip", False):
            element = torch.zeros_like(element)
        if attention.causal:
            element = element & torch.ones(seq, seq, dtype=torch.bool).tril()
        keep.append(element)
    return masked_attention_reference(q, k, v, torch.stack(keep)[None]).transpose(1, 2)


@pytest.mark.parametrize("world_size", [2, 8])  # 8: the 4 key/value heads are replicated
def test_head_shards_concatenate_to_the_unsharded_compiled_model(world_size):
    model = TwoAttentions().eval()
    x = torch.randn(2, 256, 32)
    sites = sparsify.find_attention(model, (x,))
    assert [(s.name, s.num_heads, s.num_kv_heads) for s in sites] == [("mha", 8, 8), ("gqa", 8, 4)]
    strategy = mixed_strategy(sites)
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=(x,))
    fresh = torch.randn(2, 256, 32)  # another length-256 input than the one captured with
    with torch.no_grad():
        whole = compiled(fresh)
        reference = torch.stack([dense_reference(model.mha, fresh, strategy.sites["mha"].heads, 32),
                                 dense_reference(model.gqa, fresh, strategy.sites["gqa"].heads, 32)], dim=2)
        torch.testing.assert_close(whole.double(), reference, rtol=1e-4, atol=1e-5)
        pieces = []
        for rank in range(world_size):
            shard_model = model.shard(rank, world_size)
            shard_strategy = strategy.shard_heads(rank, world_size)
            shard = sparsify.compile(shard_model, strategy=shard_strategy, example_inputs=(x,))
            expected_sparse = sum(not all(p == patterns.dense() for p in site.heads)
                                  for site in shard_strategy.sites.values())
            assert shard.rewritten_sites == expected_sparse
            pieces.append(shard(fresh))
    torch.testing.assert_close(torch.cat(pieces, dim=3), whole, rtol=1e-5, atol=1e-6)


def test_a_head_shard_describes_its_heads_and_metrics():
    site = AttentionSite("attn", 0, num_heads=8, num_kv_heads=4, head_dim=16, q_len=256, k_len=256, causal=True)
    metrics = [{"error": float(h)} for h in range(8)]
    strategy = Strategy.dense([site], block_size=32).with_heads("attn", HEAD_PATTERNS, head_metrics=metrics)
    shard = strategy.shard_heads(1, 2)
    assert list(shard.sites["attn"].heads) == HEAD_PATTERNS[4:]
    assert shard.sites["attn"].head_metrics == metrics[4:]
    assert shard.fingerprint[0]["num_heads"] == 4 and shard.fingerprint[0]["num_kv_heads"] == 2
    assert shard.metadata["head_shards"] == [{"rank": 1, "world_size": 2}]
    # Nested splits (tensor parallel, then Ulysses within it) compose to the contiguous range.
    nested = shard.shard_heads(0, 2)
    assert list(nested.sites["attn"].heads) == list(strategy.shard_heads(2, 4).sites["attn"].heads)
    assert Strategy.from_dict(shard.to_dict()) == shard
    with pytest.raises(StrategyError, match="strategy has 4 heads, the model has 8"):
        shard.validate_for([site])  # a shard does not apply to the whole model


def test_shards_that_do_not_divide_the_heads_are_refused():
    sites = [AttentionSite("self_attn", 0, num_heads=12, num_kv_heads=4, head_dim=16, q_len=128, k_len=128),
             AttentionSite("cross_attn", 1, num_heads=12, num_kv_heads=12, head_dim=16, q_len=128, k_len=128)]
    strategy = Strategy.dense(sites, block_size=32)
    with pytest.raises(StrategyError, match="12 heads do not split into 8 equal shards") as refused:
        strategy.shard_heads(0, 8)
    assert "'self_attn'" in str(refused.value) and "'cross_attn'" in str(refused.value)
    with pytest.raises(StrategyError, match="4 key/value heads neither split into 6 equal shards nor replicate"):
        strategy.shard_heads(0, 6)
    with pytest.raises(StrategyError, match="0 <= rank < world_size"):
        strategy.shard_heads(2, 2)
    assert strategy.shard_heads(5, 12).fingerprint[0]["num_kv_heads"] == 1  # 4 kv heads, each on 3 ranks


# -- the GPU path: NCCL ----------------------------------------------------------------------------

def _nccl_job(rank, world_size, directory):
    torch.cuda.set_device(rank)
    model = video_model().cuda()
    batches = [t.cuda() for shard in shards_of("uneven") for t in shard]
    return search_summary(model, batches, scenario_config("uneven"), None)


@pytest.mark.gpu
def test_nccl_world_of_one_equals_the_local_search(tmp_path):
    (result,) = run_ranks(_nccl_job, 1, tmp_path, backend="nccl")
    model = video_model().cuda()
    batches = [t.cuda() for shard in shards_of("uneven") for t in shard]
    assert_same_search(result, search_summary(model, batches, scenario_config("uneven"), False))


def union_batches(world_size: int) -> list[torch.Tensor]:
    """2·W + 1 calibration batches: split over W ranks, the first rank gets one more."""
    model = video_model()
    return [model.example_tokens(seed=seed) for seed in range(1, 2 * world_size + 2)]


def _nccl_shard_job(rank, world_size, directory):
    model = video_model().cuda()  # run_ranks made cuda:rank the current device
    batches = [t.cuda() for t in contiguous_shard(union_batches(world_size), rank, world_size)]
    summary = search_summary(model, batches, scenario_config("uneven"), None)
    summary["device"] = torch.cuda.current_device()
    return summary


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", gpu_world_sizes())
def test_nccl_ranks_on_their_own_gpus_find_the_strategy_one_process_finds_on_the_union(tmp_path, world_size):
    needs_gpus(world_size)
    results = run_ranks(_nccl_shard_job, world_size, tmp_path, backend="nccl")
    assert [result["device"] for result in results] == list(range(world_size))
    model = video_model().cuda()
    single = search_summary(model, [t.cuda() for t in union_batches(world_size)], scenario_config("uneven"), False)
    assert any(site["heads"] != [{"pattern": "dense"}] * 4 for site in single["strategy"]["sites"].values())
    counts = [len(contiguous_shard(union_batches(world_size), rank, world_size)) for rank in range(world_size)]
    for rank, result in enumerate(results):
        # Per batch every GPU computes the same numbers; only the order of the float64 sums differs.
        assert_same_search(result, single, rel=1e-6)
        assert result["strategy"] == results[0]["strategy"], f"rank {rank} differs from rank 0"
    assert results[0]["strategy"]["metadata"]["distributed"] == {"world_size": world_size, "batches_per_rank": counts}


def cuda_video_factory():
    """``--model`` for the torchrun test: the video model on this rank's GPU (``LOCAL_RANK``)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model = video_model().to(device)
    return model, (model.example_tokens(seed=1).to(device),)


def cuda_video_batches(rank: int = 0, world_size: int = 1):
    """``--calib`` for the torchrun test: this rank's contiguous share of ``union_batches`` (all of it alone)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    total = int(os.environ.get("SPARSIFY_TEST_UNION_RANKS", world_size))
    return [t.to(device) for t in contiguous_shard(union_batches(total), rank, world_size)]


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", gpu_world_sizes())
def test_torchrun_cli_search_over_nccl_writes_the_strategy_of_one_process(tmp_path, world_size):
    needs_gpus(world_size)
    arguments = ["search", "--model", "test_distributed:cuda_video_factory", "--calib",
                 "test_distributed:cuda_video_batches", "--block-size", "32", "--max-error", "0.05", "--no-progress"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                os.environ.get("PYTHONPATH", "")]),
                   "SPARSIFY_TEST_UNION_RANKS": str(world_size), "NCCL_NVLS_ENABLE": "0"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(world_size), "-m", "sparsify.cli", *arguments, "--out", str(tmp_path / "nccl.json")],
                              env=environment, capture_output=True, text=True, timeout=JOIN_SECONDS)
    assert launched.returncode == 0, launched.stderr[-4000:]
    alone = subprocess.run([sys.executable, "-m", "sparsify.cli", *arguments, "--out", str(tmp_path / "one.json")],
                           env=environment, capture_output=True, text=True, timeout=JOIN_SECONDS)
    assert alone.returncode == 0, alone.stderr[-4000:]
    distributed, single = Strategy.load(tmp_path / "nccl.json"), Strategy.load(tmp_path / "one.json")
    assert [site.heads for site in distributed.sites.values()] == [site.heads for site in single.sites.values()]
    assert distributed.metadata["distributed"]["world_size"] == world_size
    assert "distributed" not in single.metadata
