"""Scoring of the search: what each head's candidates cost (the cost model on their runtime masks) and how much
output error they cause (measured on held-out batches), as one `HeadOptions` per head."""

from __future__ import annotations

import dataclasses
import math

import torch

from sparsify import patterns as pattern_library
from sparsify.cost import CostModel
from sparsify.options import CompileOptions
from sparsify.patterns import Pattern
from sparsify.profile import CandidateErrors
from sparsify.search.candidates import SiteMasks, is_skip
from sparsify.site import AttentionSite

__all__ = ["HeadOptions", "STATIC_TABLE_COST_FACTOR", "candidate_masks", "head_options", "pricing"]

# Static block tables hold positions of the calibration length; at equal cost a pattern defined
# relative to the query and the sequence ends transfers better, so tables pay this much more.
STATIC_TABLE_COST_FACTOR = 1.05


@dataclasses.dataclass
class HeadOptions:
    """What the search knows of one head's candidates (dense is index 0)."""

    site: str
    head: int
    patterns: list[Pattern]
    cost: torch.Tensor  # seconds per candidate (estimated)
    work: torch.Tensor  # kept work per candidate, in dense-work units of this head
    squared_error: torch.Tensor  # Σ squared output error per candidate (held-out data)
    relative_error: torch.Tensor
    recall: torch.Tensor
    output_norm: float  # Σ ||dense output||² of the head
    work_spread: torch.Tensor | None = None  # per candidate: std over held-out inputs of the work (adaptive ones)


def pricing(config: CompileOptions, device: torch.device, cost_model: CostModel | None = None) -> tuple[CostModel, str]:
    """The cost model and the backend name the search prices candidates with.

    ``config.price_for`` (a hardware profile) prices everything as that profile's backend on its
    device; otherwise ``backend="auto"`` prices as the backend ``auto`` would run here (the first
    available by declared priority: fa4, then triton, ... on a GPU; torch on a CPU).

    Example:
        >>> pricing(CompileOptions(), torch.device("cpu"))[1]
        'torch'
    """
    if config.price_for is not None:
        model = CostModel.priced_for(config.price_for)
        return model, model.target.backend
    cost_model = cost_model or CostModel.default(config.hardware_profiles)
    if config.backend != "auto":
        return cost_model, config.backend
    from sparsify.backends import auto_candidates

    candidates = auto_candidates(device)
    return cost_model, candidates[0].name if candidates else "torch"


def candidate_masks(per_head: list[list[Pattern]], q_len: int, k_len: int, site_masks: SiteMasks,
                     device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    masks = [torch.stack([site_masks.of(p, q_len, k_len) for p in candidates]).to(device) for candidates in per_head]
    skips = [torch.tensor([is_skip(p) for p in candidates], device=device) for candidates in per_head]
    return masks, skips


def head_options(site: AttentionSite, candidates: list[list[Pattern]], scores: CandidateErrors, site_masks: SiteMasks,
                  cost_model: CostModel, backend: str, device: torch.device, config: CompileOptions,
                  static_counts: list[int] | None = None) -> list[HeadOptions]:
    dense_mask = site_masks.runtime(pattern_library.dense(), site.q_len, site.k_len)
    dense_blocks = dense_mask.kept_blocks_per_head()[0]
    dense_cost = cost_model.head_latency(site, None, backend=backend, device=device)
    options = []
    for head, head_candidates in enumerate(candidates):
        costs, work = [], []
        static_count = static_counts[head] if static_counts is not None else len(head_candidates)
        mean_work = scores.mean_work(head)
        for index, pattern in enumerate(head_candidates):
            if index == 0:
                costs.append(dense_cost)
                work.append(1.0)
                continue
            if is_skip(pattern):
                costs.append(0.0)
                work.append(0.0)
                continue
            if index >= static_count:
                # Input-adaptive: no mask without an input. Priced as the runtime mask of every block keeping the
                # blocks its masks kept on held-out inputs (their mean), plus estimating them.
                kept = float(mean_work[index]) * dense_blocks
                cost = (cost_model.head_latency(site, dense_mask, backend=backend, device=device, kept_blocks=kept)
                        + cost_model.estimation_latency(site, pattern, backend=backend, device=device,
                                                        block_size=site_masks.block_size))
                costs.append(cost)
                work.append(float(mean_work[index]))
                continue
            mask = site_masks.runtime(pattern, site.q_len, site.k_len)
            cost = cost_model.head_latency(site, mask, backend=backend, device=device)
            if isinstance(pattern, pattern_library.BlockTopK):
                cost *= STATIC_TABLE_COST_FACTOR
            costs.append(cost)
            work.append(mask.kept_blocks_per_head()[0] / dense_blocks)
        cost = torch.tensor(costs, dtype=torch.float64)
        relative_error = scores.relative_error(head)
        recall = scores.recall(head)
        squared_error = scores.squared_error[head].clone()
        # Rule out: not faster than dense by the cost model, or too little attention mass kept.
        excluded = (cost >= dense_cost) | ((recall < config.min_recall) & ~torch.tensor([is_skip(p) for p in head_candidates]))
        excluded[0] = False
        squared_error[excluded] = math.inf
        options.append(HeadOptions(site.name, head, list(head_candidates), cost, torch.tensor(work, dtype=torch.float64),
                                   squared_error, relative_error, recall, float(scores.output_norm[head]),
                                   scores.work_spread(head)))
    return options
