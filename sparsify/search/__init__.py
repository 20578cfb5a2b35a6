"""Search: for every site and head, the cheapest sparse pattern whose error fits the budget (DESIGN.md §5).

The package splits the search by job:

* `sparsify.search.calibration` — recording calibration batches, profile / held-out split, seeds;
* `sparsify.search.candidates` — per head the patterns to score (static families, profile-read
  tables, input-adaptive estimators), their masks, the profile prefilter;
* `sparsify.search.scoring` — each candidate's cost (cost model) and measured output error;
* `sparsify.search.allocation` — the knapsacks: per-site budget, model-level budget, targets;
* `sparsify.search.output_budget` / `sparsify.output_metrics` — sensitivities, verification and
  tightening of the model-level budget, and the output metrics;
* `sparsify.search.assembly` — the strategy with what was measured.

Flow: (1) profile — the first calibration batches give each head's block-pooled attention mass;
(2) candidates, minus those the cost model says are not faster than dense; (3) filter — recall on
the profile below ``min_recall``; (4) score every survivor on held-out batches by the relative
L2 error of the head's output against dense; (5) allocate:

* **model-level budget** (the default, ``max_output_error``): each site's sensitivity is measured
  on the held-out batches (`measure_sensitivities`), one global multiplier allocates error over
  all sites and heads (`allocation.allocate_within_budget`), and the whole sparsified model is
  verified on the held-out batches, the budget's scale bisected until the measured model-level
  error is within it (`tighten_until_within`); ``max_error``, when given too, caps each site;
* ``max_error`` alone: per site, the cheapest combination within it;
* ``target_density`` / ``target_speedup``: the least (model-level) error that meets the target,
  every site within ``max_error`` when given, unless ``target_overrides_max_error``.

A site never drops all of its heads (``skip``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import torch

from sparsify.capture import Captured
from sparsify.cost import CostModel
from sparsify.distributed import CalibrationGroup, calibration_group
from sparsify.errors import SparsifyError
from sparsify.options import CompileOptions
from sparsify.patterns import Pattern
from sparsify.profile import BlockMassProfile, CandidateErrors
from sparsify.search.allocation import (
    Allocation,
    TargetOutcome,
    allocate_with_target,
    allocate_within_budget,
    choose,
    choose_with_multiplier,
    improve_greedily,
    site_error,
)
from sparsify.search.assembly import SearchResult, build_strategy, with_metadata
from sparsify.search.calibration import SamplingSeeds, collect_batches, split_batches, step_of
from sparsify.search.candidates import (
    AdaptiveCandidateMasks,
    SiteMasks,
    adaptive_candidates,
    candidate_patterns,
    prefilter_candidates,
)
from sparsify.output_metrics import OUTPUT_METRICS, OutputMetric, output_metric, register_output_metric
from sparsify.search.output_budget import (
    OutputVerifier,
    is_low_precision,
    measure_noise_floors,
    measure_sensitivities,
    sparse_replacement,
    tighten_until_within,
)
from sparsify.search.scoring import HeadOptions, candidate_masks, head_options, pricing
from sparsify.site import AttentionSite
from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)

__all__ = ["Allocation", "HeadOptions", "OUTPUT_METRICS", "OutputMetric", "SearchResult", "SiteMasks",
           "TargetOutcome", "allocate_with_target", "allocate_within_budget", "candidate_patterns", "choose",
           "choose_with_multiplier", "collect_batches", "improve_greedily", "output_metric", "prefilter_candidates",
           "pricing", "register_output_metric", "search", "split_batches"]


def search(captured: Captured, sites: Sequence[AttentionSite], batches: Sequence[tuple[tuple, dict]],
           config: CompileOptions, *, cost_model: CostModel | None = None, device: torch.device | None = None,
           progress: bool | None = None, process_group: Any = None) -> SearchResult:
    """Profile, score and choose patterns for every head of every site (see the module docstring).

    ``captured`` is the graph after `FindAttention` (canonical nodes with sites); ``batches``
    are ``(args, kwargs)`` pairs from `collect_batches`. Under ``torch.distributed`` (an
    initialised default group, or ``process_group``; ``False`` opts out) every rank passes its
    own shard of the batches and the statistics are summed over the ranks
    (`sparsify.distributed`): every rank returns the strategy one process would find on the
    rank-major concatenation of the shards.
    """
    group = calibration_group(process_group)
    with group.guard("the search"):
        return _search(captured, sites, batches, config, cost_model, device, progress, group)


def _search(captured: Captured, sites: Sequence[AttentionSite], batches: Sequence[tuple[tuple, dict]],
            config: CompileOptions, cost_model: CostModel | None, device: torch.device | None, progress: bool | None,
            group: CalibrationGroup) -> SearchResult:
    from tqdm.auto import tqdm

    from sparsify.passes.observe import observe

    if not sites:
        raise SparsifyError("search needs at least one attention site")
    progress = config.progress if progress is None else progress
    device = device or captured.device
    block_size = config.block_size or (128 if device.type == "cuda" else 64)
    cost_model, backend = pricing(config, device, cost_model)
    # Indices are global: batch i of this rank is batch shard.offset + i of the union of the ranks' batches.
    shard = group.batch_shard(len(batches), dense_steps=config.dense_steps,
                              steps_per_generation=config.steps_per_generation)
    sites = group.agree_on_sites(sites, {"search": config.to_json(), "block_size": block_size,
                                         "backend": backend})
    profile_indices, holdout_indices = split_batches(shard.total, config.holdout_fraction)
    if config.dense_steps:
        # Steps that run dense teach nothing about the sparse steps: leave them out.
        usable = [i for i in range(shard.total) if step_of(i, config) >= config.dense_steps]
        if not usable:
            raise SparsifyError(f"every calibration call is one of the first dense_steps={config.dense_steps} steps; "
                                f"calibrate on later steps too (steps_per_generation={config.steps_per_generation})")
        chosen = split_batches(len(usable), config.holdout_fraction)
        profile_indices = [usable[i] for i in chosen[0]]
        holdout_indices = [usable[i] for i in chosen[1]]
    profile_indices, holdout_indices = shard.local(profile_indices), shard.local(holdout_indices)
    held_out_steps = [step_of(shard.offset + i, config) for i in holdout_indices]
    progress = progress and group.is_main

    if config.keeps_every_head_dense:
        which = "max_output_error" if config.output_budget == 0 else "max_error"
        strategy = Strategy.dense(list(sites), block_size=block_size)
        strategy = with_metadata(strategy, config, {"note": f"{which}=0: every head dense"})
        return SearchResult(strategy, captured, list(sites), {}, {}, [batches[i] for i in holdout_indices],
                            held_out_steps)

    clock = _PhaseClock(device)
    # 1. profile
    profiles: dict[str, BlockMassProfile] = {}
    seeds = SamplingSeeds(config.seed, shard.offset)

    def profile_site(site, q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
        key = site.name
        existing = profiles.get(key)
        if existing is None or (existing.q_len, existing.k_len) != (q.shape[2], k.shape[2]):
            if existing is not None and (existing.q_len * existing.k_len, existing.q_len) >= (q.shape[2] * k.shape[2],
                                                                                               q.shape[2]):
                return  # keep the profile of the longest sequence seen (ties: the longer query), in any batch order
            profiles[key] = BlockMassProfile.empty(site.num_heads, q.shape[2], k.shape[2], block_size)
        profiles[key].add(q, k, v, attn_mask, is_causal or site.causal, scale,
                          rows_per_block=config.profile_rows_per_block, generator=seeds.for_site("profile", site),
                          softcap=softcap, sinks=sinks)

    observe(captured.graph_module, batches, profile_site,
            progress=tqdm(seeds.calls(profile_indices), total=len(profile_indices), desc="sparsify: profiling",
                          disable=not progress, unit="batch"))
    profiles = group.reduce_profiles(profiles, sites, block_size)
    clock.lap("profile")

    # 2. candidates per site/head (at the profile's lengths); input-adaptive ones after the static ones
    site_masks = {site.name: SiteMasks(block_size, site.causal) for site in sites}
    candidates: dict[str, list[list[Pattern]]] = {}
    static_counts: dict[str, list[int]] = {}
    adaptive: dict[str, AdaptiveCandidateMasks] = {}
    for site in sites:
        per_head = candidate_patterns(site, block_size, profiles.get(site.name))
        if site.name in profiles:
            per_head = [prefilter_candidates(patterns, profiles[site.name], head, site_masks[site.name], config.min_recall)
                        for head, patterns in enumerate(per_head)]
        static_counts[site.name] = [len(patterns) for patterns in per_head]
        extra = adaptive_candidates(site, block_size) if config.adaptive else []
        if extra:
            adaptive[site.name] = AdaptiveCandidateMasks(site, block_size, extra)
        candidates[site.name] = [patterns + extra for patterns in per_head]

    # 3-4. score on held-out batches
    scores: dict[str, CandidateErrors] = {
        site.name: CandidateErrors.empty([len(c) for c in candidates[site.name]]) for site in sites
    }
    mask_cache: dict[tuple[str, int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def score_site(site, q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
        key = (site.name, q.shape[2], k.shape[2])
        if key not in mask_cache:
            static = [patterns[:count] for patterns, count in zip(candidates[site.name], static_counts[site.name])]
            mask_cache[key] = candidate_masks(static, q.shape[2], k.shape[2], site_masks[site.name], q.device)
        masks, skips = mask_cache[key]
        batch_masks = None
        if site.name in adaptive:  # the masks the adaptive candidates estimate on this very batch
            batch_masks, work = adaptive[site.name].masks(q, k, attn_mask, scale)
            scores[site.name].add_work(work, static_counts[site.name])
        return scores[site.name].add(q, k, v, attn_mask, is_causal or site.causal, scale, block_size, masks, skips,
                                     rows_per_block=config.score_rows_per_block, generator=seeds.for_site("score", site),
                                     softcap=softcap, sinks=sinks, batch_masks=batch_masks)

    observe(captured.graph_module, batches, score_site,
            progress=tqdm(seeds.calls(holdout_indices), total=len(holdout_indices), desc="sparsify: scoring candidates",
                          disable=not progress, unit="batch"))
    group.reduce_candidate_errors(scores, candidates)
    clock.lap("score")

    # 5. choose
    options: dict[str, list[HeadOptions]] = {}
    for site in sites:
        options[site.name] = head_options(site, candidates[site.name], scores[site.name], site_masks[site.name],
                                           cost_model, backend, device, config, static_counts[site.name])
    # Per held-out batch (this rank's), the padded positions the first masked self-attention site saw
    # (for the model-level errors).
    held_out_padding = [
        next((scores[site.name].padded_rows[i] for site in sites
              if i < len(scores[site.name].padded_rows) and scores[site.name].padded_rows[i] is not None), None)
        for i in range(len(holdout_indices))
    ]
    clock.lap("price")
    budget_record: dict[str, Any] = {}
    if config.output_budget is None:
        allocation = choose(sites, options, config)
        clock.lap("allocate")
    else:
        allocation, budget_record = _allocate_for_output(
            captured, sites, options, config, [batches[i] for i in holdout_indices], held_out_steps, held_out_padding,
            block_size, backend, cost_model, group, clock, device)
    strategy = build_strategy(sites, options, allocation.chosen, block_size, config, cost_model, backend, device,
                              allocation.target, budget_record)
    if group.is_distributed:
        calibration = {"world_size": group.world_size, "batches_per_rank": list(shard.counts)}
        strategy = group.agree_on_strategy(dataclasses.replace(strategy, metadata={**strategy.metadata,
                                                                                   "distributed": calibration}))
    logger.info("search phases (s): %s", ", ".join(f"{name} {value:.1f}" for name, value in clock.seconds.items()))
    return SearchResult(strategy, captured, list(sites), profiles, options, [batches[i] for i in holdout_indices],
                        held_out_steps, target=allocation.target, held_out_padding=held_out_padding,
                        seconds=dict(clock.seconds))


def _allocate_for_output(captured: Captured, sites: Sequence[AttentionSite], options: dict[str, list[HeadOptions]],
                         config: CompileOptions, held_out: list[tuple[tuple, dict]], steps: list[int],
                         padding: list[torch.Tensor | None], block_size: int, backend: str, cost_model: CostModel,
                         group: CalibrationGroup, clock: "_PhaseClock",
                         device: torch.device) -> tuple[Allocation, dict[str, Any]]:
    """The model-level budget: sensitivities, one global allocation, verification and tightening (module docstring).

    Returns the allocation and what the strategy records of it (``output_budget`` metadata).
    """
    from sparsify.runtime.sparse_attention import StepCounter
    from sparsify.search.output_budget import PROBE_SITE_ERROR

    metric = output_metric(config.output_metric)
    counter = StepCounter(config.steps_per_generation)
    verifier = OutputVerifier(captured.graph_module, held_out, metric, group, steps=steps, padding=padding,
                              step_counter=counter)

    def runtime(site: AttentionSite, heads: Sequence[Pattern], dense_steps: int = 0):
        return sparse_replacement(site, heads, block_size, backend=config.backend, cost_model=cost_model,
                                  dense_steps=dense_steps, step_counter=counter, device=device)

    # Probes: per site, the candidates a per-site budget at the probe error would pick (their real error direction).
    probe_options = dataclasses.replace(config, max_output_error=None, max_error=PROBE_SITE_ERROR,
                                        target_density=None, target_speedup=None)
    probe_choice = choose(sites, options, probe_options).chosen
    probes = {}
    for site in sites:
        picks = list(probe_choice[site.name])
        if all(pick == 0 for pick in picks):  # nothing that cheap: the least-error sparse candidate of each head
            picks = [_least_error_sparse(option) for option in options[site.name]]
        heads = [option.patterns[pick] for option, pick in zip(options[site.name], picks)]
        probe = runtime(site, heads)
        if probe is not None:
            probes[site.name] = probe
    dense_outputs = verifier.dense_outputs()
    clock.lap("dense outputs")
    # In 16-bit floats any change at a site moves the output by a rounding-noise floor besides what the change causes:
    # measured per site, it is taken out of each verification (the budget bounds what the sparsity adds; the floor
    # is recorded beside it). The sensitivities keep it (they err high; `measure_sensitivities`).
    floors = (measure_noise_floors(verifier, sites, probes)
              if probes and is_low_precision(captured.graph_module, dense_outputs) else {})
    if floors:
        clock.lap("noise floors")
    sensitivities = measure_sensitivities(verifier, sites, probes)
    clock.lap("sensitivities")
    dense_work_total = {site.name: site.q_len * site.k_len * (0.5 if site.causal else 1.0) for site in sites}

    def density(allocation: Allocation) -> float:
        kept = total = 0.0
        for site in sites:
            for option, pick in zip(options[site.name], allocation.chosen[site.name]):
                kept += float(option.work[pick]) * dense_work_total[site.name]
                total += dense_work_total[site.name]
        return kept / max(total, 1e-30)

    with_noise: dict[Any, tuple[float, float]] = {}   # allocation key -> (measured with the noise, the floor)

    def measure(allocation: Allocation) -> tuple[float, float]:
        replacements = {}
        for site in sites:
            heads = [option.patterns[pick] for option, pick in zip(options[site.name], allocation.chosen[site.name])]
            replacement = runtime(site, heads, config.dense_steps)
            if replacement is not None:
                replacements[site.name] = replacement
        measured = verifier.measure(replacements)
        # The earliest perturbed site sets how much of the model rounds differently: the largest of their floors.
        floor = max((floors.get(name, 0.0) for name in replacements), default=0.0)
        with_noise[allocation.key()] = (measured, floor)
        return max(0.0, measured - floor), density(allocation)

    budget = float(config.output_budget) ** metric.power
    if config.has_target:  # the target fixes the work: the least model-level error there, measured once
        allocation = choose(sites, options, config, sensitivities)
        measured, achieved_density = measure(allocation)
        from sparsify.search.output_budget import Verification

        trail, chosen_index = [Verification(1.0, float(allocation.predicted or 0.0), measured, achieved_density)], 0
    else:
        def allocate(scale: float) -> Allocation:
            if scale == 0.0:
                return Allocation({site.name: [0] * len(options[site.name]) for site in sites}, None, 0.0)
            return choose(sites, options, config, sensitivities, budget_scale=scale)

        allocation, trail, chosen_index = tighten_until_within(allocate, measure, budget)
    clock.lap("allocate and verify")
    chosen = trail[chosen_index]
    unit = 1.0 / metric.power
    record = {
        "metric": metric.name,
        "budget": float(config.output_budget),
        "promised": round(chosen.promised**unit, 8),
        "measured": round(chosen.measured**unit, 8),
        "within_budget": bool(chosen.measured <= budget * (1 + 1e-9)),
        "sensitivities": {name: round(value, 8) for name, value in sensitivities.items()},
        "verifications": [entry.to_json(metric) for entry in trail],
        "forward_passes": verifier.passes,
    }
    if floors:   # measured above is what the sparsity adds; with the rounding noise it was measured_with_noise
        measured_with_noise, floor = with_noise.get(allocation.key(), (chosen.measured, 0.0))
        record.update(noise_floor=round(floor**unit, 8), measured_with_noise=round(measured_with_noise**unit, 8),
                      noise_floors={name: round(value**unit, 8) for name, value in floors.items()})
    logger.info("model-level %s: promised %.3e, measured %.3e (budget %g) after %d verification(s), %d forward passes%s",
                metric.name, record["promised"], record["measured"], config.output_budget, len(trail), verifier.passes,
                f"; rounding-noise floor {record['noise_floor']:.3e} taken out (with it: "
                f"{record['measured_with_noise']:.3e})" if floors else "")
    return allocation, record


class _PhaseClock:
    """Wall seconds per phase of the search (the device is synchronised at each lap, so GPU work is counted)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + round(now - self.last, 3)
        self.last = now


def _least_error_sparse(option: HeadOptions) -> int:
    """The sparse candidate of a head with the least measured error (0 — dense — when every other is excluded)."""
    errors = option.squared_error.clone()
    errors[0] = float("inf")
    index = int(torch.argmin(errors))
    return index if bool(torch.isfinite(errors[index])) else 0
