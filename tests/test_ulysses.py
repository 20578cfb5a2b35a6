"""Ulysses sequence parallelism (2 gloo ranks on CPU): the all-to-alls, and a Wan step dense and sparse equal one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sparsify
from distributed_helpers import gpu_world_sizes, needs_gpus, run_ranks
from sparsify import UnsupportedError, patterns
from sparsify.integrations import attached_sites
from sparsify.integrations.ulysses import (
    SequencePlan,
    SequenceSplit,
    heads_to_sequence,
    sequence_parallel,
    sequence_to_heads,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIM = 32
BLOCK = 32
# Per head of every self-attention site (4 heads; rank 0 runs the first two, rank 1 the last two), and of cross attention.
SELF_PATTERNS = [patterns.sliding_window(64), patterns.a_shape(32, 32), patterns.dense(), patterns.radial(32, 32)]
CROSS_PATTERNS = [patterns.dense(), patterns.attention_sinks(32), patterns.attention_sinks(32), patterns.dense()]


def wan_model(heads: int = 4):
    """A 2-layer `WanTransformer3DModel` with ``heads`` heads of 16 (random weights, the same on every rank)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=16,
                                 out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64).eval()


def wan_inputs(seed: int, frames: int = 4, size: int = 16) -> dict:
    """A batch of 2 latent videos (``frames`` x ``size/2`` x ``size/2`` tokens: 256 by default) and 64 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 16, frames, size, size, generator=generator),
            "timestep": torch.tensor([500, 500]), "return_dict": False,
            "encoder_hidden_states": torch.randn(2, 64, TEXT_DIM, generator=generator)}


def sparse_strategy(model) -> sparsify.Strategy:
    """The per-head patterns above (repeated when the model has more heads) on every site."""
    sites = sparsify.find_attention(model, wan_inputs(seed=1))
    strategy = sparsify.Strategy.dense(sites, block_size=BLOCK)
    for site in sites:
        chosen = SELF_PATTERNS if site.kind == "self" else CROSS_PATTERNS
        strategy = strategy.with_heads(site.name, [chosen[head % len(chosen)] for head in range(site.num_heads)])
    return strategy


# -- what each rank runs ---------------------------------------------------------------------------

def _exchange_job(rank, world_size, directory):
    """The all-to-alls against slicing the whole tensor (every rank builds the same one from a seed)."""
    whole = torch.randn(2, 4, 6 * world_size, 8, generator=torch.Generator().manual_seed(5))
    tokens = whole.shape[2] // world_size
    mine = whole[:, :, rank * tokens:(rank + 1) * tokens]
    heads = sequence_to_heads(mine)
    back = heads_to_sequence(heads)
    return {"heads_equal": torch.equal(heads, whole[:, 2 * rank:2 * rank + 2]), "back_equal": torch.equal(back, mine)}


def _wan_job(rank, world_size, directory):
    model = wan_model()
    strategy = sparsify.Strategy.load(directory / "strategy.json")
    inputs = wan_inputs(seed=7)
    parallel = sequence_parallel(model)
    sparse = sparsify.attach(parallel, strategy.shard_heads(rank, world_size))
    seen = []  # tokens each block of the sparse copy holds outside attention
    for block in sparse.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        dense_output = parallel(**inputs)[0]
        sparse_output = sparse(**inputs)[0]
    torch.save({"dense": dense_output, "sparse": sparse_output}, directory / f"outputs_{rank}.pt")
    refused = {}
    attempts = {
        # the whole strategy instead of this rank's shard
        "whole strategy": lambda: sparsify.attach(parallel, strategy)(**inputs),
        # 3 x 3 tokens do not split over 2 ranks
        "odd tokens": lambda: parallel(**wan_inputs(seed=2, frames=1, size=6)),
        # sparsify.attach first, then Ulysses: the wrong order
        "attach first": lambda: sequence_parallel(sparsify.attach(model, strategy)),
    }
    for case, attempt in attempts.items():
        try:
            with torch.no_grad():
                attempt()
            refused[case] = None
        except Exception as error:  # noqa: BLE001 - what each rank raised is the result
            refused[case] = f"{type(error).__name__}: {error}"
    return {"sparse_sites": len(attached_sites(sparse)), "refused": refused, "model_untouched": not attached_sites(model),
            "block_tokens": seen}


def _bench_job(directory):
    """benchmarks/ulysses_bench.py's smoke run, in these ranks (starting processes is the slow part)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ulysses_bench

    ulysses_bench.run(ulysses_bench.parse_arguments(["--smoke", "--out", str(directory / "bench.json")]))


def _every_job(rank, world_size, directory):
    results = {"exchange": _exchange_job(rank, world_size, directory), "wan": _wan_job(rank, world_size, directory)}
    _bench_job(directory)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ulysses")
    model = wan_model()
    strategy = sparse_strategy(model)
    strategy.save(directory / "strategy.json")
    return directory, model, strategy, run_ranks(_every_job, 2, directory)


# -- the checks --------------------------------------------------------------------------------------

def test_the_all_to_alls_move_tokens_to_heads_and_back(two_ranks):
    for result in two_ranks[3]:
        assert result["exchange"] == {"heads_equal": True, "back_equal": True}


def test_dense_ulysses_equals_the_model_on_one_process(two_ranks):
    directory, model, _, _ = two_ranks
    with torch.no_grad():
        expected = model(**wan_inputs(seed=7))[0]
    for rank in range(2):
        got = torch.load(directory / f"outputs_{rank}.pt")["dense"]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sparse_ulysses_equals_the_attached_strategy_on_one_process(two_ranks):
    directory, model, strategy, results = two_ranks
    inputs = wan_inputs(seed=7)
    with torch.no_grad():
        expected = sparsify.attach(model, strategy)(**inputs)[0]
        dense = model(**inputs)[0]
    assert float((expected - dense).norm() / dense.norm()) > 1e-3  # the sparse heads change the output
    for rank, result in enumerate(results):
        assert result["wan"]["sparse_sites"] == 4  # every site of the shard has a sparse head
        assert result["wan"]["block_tokens"] == [128, 128]  # each rank holds half of the 256 tokens in both blocks
        assert result["wan"]["model_untouched"]
        got = torch.load(directory / f"outputs_{rank}.pt")["sparse"]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_ulysses_refuses_what_it_cannot_run_with_what_to_do(two_ranks):
    for result in two_ranks[3]:
        refused = result["wan"]["refused"]
        assert "attach this rank's shard" in refused["whole strategy"] and "4 heads for it" in refused["whole strategy"]
        assert "9 tokens do not split into 2 equal shards" in refused["odd tokens"]
        assert "make the sequence-parallel copy of the original model first" in refused["attach first"]


def test_the_plan_comes_from_the_model_and_a_model_without_one_is_refused():
    from diffusers import WanTransformer3DModel

    plan = SequencePlan.from_diffusers(WanTransformer3DModel)
    assert SequenceSplit("blocks.0", "hidden_states", 1, 3, False) in plan.splits
    assert [(gather.module, gather.dim) for gather in plan.gathers] == [("proj_out", 1)]
    with pytest.raises(UnsupportedError, match="declares no context-parallel plan"):
        SequencePlan.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedError, match="needs an initialised torch.distributed process group"):
        sequence_parallel(wan_model())


def test_the_benchmark_smoke_run_measures_every_world_size(two_ranks):
    document = json.loads((two_ranks[0] / "bench.json").read_text())
    assert document["complete"]
    rows = document["rows"]
    assert [row["ranks"] for row in rows] == [1, 2]
    for row in rows:
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["sparse_error_vs_one_process"] < 1e-4 and row["dense_error_vs_one_process"] < 1e-4
        assert 1e-3 < row["sparse_error_vs_dense"] < 1 and row["equals_one_gpu"] is True
    assert rows[1]["dense_scaling_efficiency"] > 0


# -- on GPUs: NCCL all-to-alls and the GPU kernels -------------------------------------------------

def _nccl_wan_job(rank, world_size, directory):
    model = wan_model(heads=8).cuda().to(torch.bfloat16)  # run_ranks made cuda:rank the current device
    strategy = sparsify.Strategy.load(directory / "strategy.json")
    inputs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in wan_inputs(seed=7).items()}
    inputs["hidden_states"] = inputs["hidden_states"].to(torch.bfloat16)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(torch.bfloat16)
    parallel = sequence_parallel(model)
    sparse = sparsify.attach(parallel, strategy.shard_heads(rank, world_size))
    with torch.no_grad():
        outputs = {"dense": parallel(**inputs)[0].float().cpu(), "sparse": sparse(**inputs)[0].float().cpu()}
    torch.save(outputs, directory / f"outputs_{rank}.pt")
    return {"device": torch.cuda.current_device()}


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", gpu_world_sizes())
def test_nccl_ulysses_on_gpus_equals_one_gpu_dense_and_sparse(tmp_path, world_size):
    needs_gpus(world_size)
    model = wan_model(heads=8).cuda().to(torch.bfloat16)
    strategy = sparse_strategy(wan_model(heads=8))
    strategy.save(tmp_path / "strategy.json")
    results = run_ranks(_nccl_wan_job, world_size, tmp_path, backend="nccl")
    assert [result["device"] for result in results] == list(range(world_size))
    inputs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in wan_inputs(seed=7).items()}
    inputs["hidden_states"] = inputs["hidden_states"].to(torch.bfloat16)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(torch.bfloat16)
    with torch.no_grad():
        expected = {"dense": model(**inputs)[0].float().cpu(),
                    "sparse": sparsify.attach(model, strategy)(**inputs)[0].float().cpu()}
    assert float((expected["sparse"] - expected["dense"]).norm() / expected["dense"].norm()) > 1e-2
    for rank in range(world_size):
        got = torch.load(tmp_path / f"outputs_{rank}.pt")
        for label in ("dense", "sparse"):
            error = float((got[label] - expected[label]).norm() / expected[label].norm())
            assert error < 1e-2, (rank, label, error)  # bf16 rounding only
