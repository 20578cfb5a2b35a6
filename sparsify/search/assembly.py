"""Assembly of the search's result: the chosen candidates as a `Strategy` with what was measured in its metadata."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sparsify.capture import Captured
from sparsify.options import CompileOptions
from sparsify.profile import BlockMassProfile
from sparsify.search.allocation import TargetOutcome, site_error
from sparsify.search.scoring import HeadOptions
from sparsify.site import AttentionSite
from sparsify.version import sparsify_version
from sparsify.strategy import SiteStrategy, Strategy

__all__ = ["SearchResult", "build_strategy", "with_metadata"]


@dataclasses.dataclass
class SearchResult:
    """The search's output: the strategy plus what it measured (for reports and pictures)."""

    strategy: Strategy
    captured: Captured
    sites: list[AttentionSite]
    profiles: dict[str, BlockMassProfile]
    options: dict[str, list[HeadOptions]]
    held_out: list[tuple[tuple, dict]]
    held_out_steps: list[int] = dataclasses.field(default_factory=list)
    target: TargetOutcome | None = None
    # Per held-out batch: bool [batch, seq] padded positions (None: no padding seen), see `padded_query_rows`.
    held_out_padding: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    # Wall seconds per phase (profile, score, allocate, sensitivities, verification): where the search's time went.
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

def build_strategy(sites, options, chosen, block_size, config: CompileOptions, cost_model, backend, device,
                   outcome: TargetOutcome | None = None, output_budget: dict[str, Any] | None = None) -> Strategy:
    """The strategy of the chosen candidates, with per head its measured numbers and per site its error; the
    search's options, target outcome and model-level budget record (sensitivities, promised vs measured) in the
    metadata."""
    site_strategies = {}
    site_errors = {}
    dense_total = sparse_total = 0.0
    for site in sites:
        site_errors[site.name] = round(site_error(options[site.name], chosen[site.name]), 6)
        heads, metrics = [], []
        for option, index in zip(options[site.name], chosen[site.name]):
            heads.append(option.patterns[index])
            metric = {
                "recall": round(min(max(float(option.recall[index]), 0.0), 1.0), 6),
                "error": round(float(option.relative_error[index]), 6),
                "work": round(float(option.work[index]), 6),
                "estimated_seconds": float(option.cost[index]),
                "dense_seconds": float(option.cost[0]),
            }
            if option.patterns[index].is_adaptive and option.work_spread is not None:
                metric["work_spread"] = round(float(option.work_spread[index]), 6)   # over held-out inputs
            metrics.append(metric)
            dense_total += float(option.cost[0])
            sparse_total += float(option.cost[index])
        site_strategies[site.name] = SiteStrategy(site.name, heads, head_metrics=metrics, dense_steps=config.dense_steps)
    base = Strategy.dense(list(sites), block_size=block_size)
    strategy = dataclasses.replace(base, sites=site_strategies)
    return with_metadata(strategy, config, {
        "backend": backend,
        "device": str(device),
        **({"priced_for": cost_model.target.device_name} if cost_model.target is not None else {}),
        # Skipped heads cost nothing: with every head skipped there is no finite speedup to state.
        "estimated_attention_speedup": round(dense_total / sparse_total, 4) if sparse_total > 0 else None,
        "site_errors": site_errors,
        **({"target": outcome.to_json()} if outcome is not None else {}),
        **({"output_budget": output_budget} if output_budget else {}),
        **({"steps_per_generation": config.steps_per_generation} if config.steps_per_generation else {}),
    })


def with_metadata(strategy: Strategy, config: CompileOptions, extra: dict[str, Any]) -> Strategy:
    """``strategy`` with the library version, the search's options and ``extra`` in its metadata."""

    metadata = dict(strategy.metadata)
    metadata.update({
        "sparsify_version": sparsify_version(),
        "search": config.to_json(),
        **extra,
    })
    return dataclasses.replace(strategy, metadata=metadata)
