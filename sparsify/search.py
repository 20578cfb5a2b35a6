"""Search: for every site and head, the cheapest sparse pattern whose output error fits the budget.

Flow (DESIGN.md §5):

1. profile — the first calibration batches give each head's block-pooled attention mass;
2. candidates — every pattern family over a parameter grid, plus static block top-k tables
   picked from the profile; candidates the cost model says are not faster than dense drop out;
3. filter — candidates whose attention-mass recall on the profile is below ``min_recall``;
4. confirm — the held-out batches score every survivor by the relative L2 error of the head's
   output against dense (`sparsify.profile.CandidateErrors`);
5. choose — per site, the cheapest combination whose site output error stays within
   ``max_error`` (a multiple-choice knapsack solved with a Lagrange multiplier); with a global
   ``target_density`` / ``target_speedup``, the least total error that meets the target with
   every site still within ``max_error`` (`allocate_with_target`). A target out of reach
   within the budget is reported (strategy metadata ``target``, a warning), never met by
   exceeding ``max_error`` — unless ``target_overrides_max_error`` asks for it, and then the
   sites over budget are named. A site never drops all of its heads (``skip``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Any, Callable, Sequence

import torch

from sparsify import patterns as pattern_library
from sparsify.capture import Captured, normalize_inputs
from sparsify.cost import CostModel
from sparsify.distributed import CalibrationGroup, calibration_group
from sparsify.errors import SparsifyError
from sparsify.options import DEFAULT_OPTIONS, CompileOptions
from sparsify.patterns import Pattern
from sparsify.adaptive_search import AdaptiveCandidateMasks, adaptive_candidates
from sparsify.profile import BlockMassProfile, CandidateErrors
from sparsify.site import AttentionSite
from sparsify.strategy import SiteStrategy, Strategy
from sparsify.tables import blocks_for

logger = logging.getLogger(__name__)

# Static block tables hold positions of the calibration length; at equal cost a pattern defined
# relative to the query and the sequence ends transfers better, so tables pay this much more.
STATIC_TABLE_COST_FACTOR = 1.05

SearchConfig = CompileOptions
"""The search reads the shared options object (`sparsify.options.CompileOptions`)."""

DEFAULT_MAX_ERROR = DEFAULT_OPTIONS.max_error


# -- calibration data -----------------------------------------------------------------------------

def collect_batches(model: torch.nn.Module, calib_loader: Any) -> list[tuple[tuple, dict]]:
    """Calibration batches as ``(args, kwargs)``: from an iterable of batches or a ``forward_loop(model)``.

    Every batch must have the same structure as the first (tensor / tuple of the same length /
    dict with the same keys).

    Example:
        >>> batches = collect_batches(torch.nn.Identity(), [torch.zeros(2), torch.ones(2)])
        >>> len(batches), batches[0][0][0].shape
        (2, torch.Size([2]))
    """
    if calib_loader is None:
        raise SparsifyError("no calibration data: pass an iterable of batches or a forward_loop(model) callable")
    if callable(calib_loader) and not hasattr(calib_loader, "__iter__"):
        recorded: list[tuple[tuple, dict]] = []

        class _Recorder(torch.nn.Module):
            """Stands in for the model in ``forward_loop``: records each call's inputs (copies)."""

            def __init__(self):
                super().__init__()
                self.inner = model

            def __getattr__(self, name: str) -> Any:
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.inner, name)  # model.device, model.config, ...

            def forward(self, *args, **kwargs):
                # Copies: a loop that updates its latents in place must not rewrite earlier batches.
                recorded.append(torch.utils._pytree.tree_map(
                    lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs)))
                return self.inner(*args, **kwargs)

        with torch.no_grad():
            calib_loader(_Recorder())
        raw = [(args, kwargs) for args, kwargs in recorded]
    else:
        try:
            raw = [normalize_inputs(batch) for batch in calib_loader]
        except TypeError as error:
            raise SparsifyError(f"calibration batches must be tensors, tuples of arguments or dicts of keyword "
                                f"arguments: {error}") from None
    if not raw:
        raise SparsifyError("the calibration loader is empty: it yielded no batch (forward_loop made no call)")
    first_args, first_kwargs = raw[0]
    for index, (args, kwargs) in enumerate(raw[1:], start=1):
        if len(args) != len(first_args) or sorted(kwargs) != sorted(first_kwargs):
            raise SparsifyError(
                f"calibration batch {index} has {len(args)} positional arguments and keys {sorted(kwargs)}, but batch 0 "
                f"has {len(first_args)} and {sorted(first_kwargs)}: every batch must have the same structure"
            )
    return raw


def split_batches(count: int, holdout_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of profile and held-out batches; one batch serves both (with a warning)."""
    if count == 1:
        logger.warning("one calibration batch: it both profiles and scores candidates (no held-out data); "
                       "pass several batches for an honest error estimate")
        return [0], [0]
    held_out = max(1, round(count * holdout_fraction))
    return list(range(count - held_out)), list(range(count - held_out, count))


# -- candidates -------------------------------------------------------------------------------------

def _geometric(low: int, high: int, factor: float = 2.0) -> list[int]:
    values, value = [], float(low)
    while value <= high:
        values.append(int(round(value)))
        value *= factor
    return sorted(set(values))


def candidate_patterns(site: AttentionSite, block_size: int, profile: BlockMassProfile | None) -> list[list[Pattern]]:
    """Per head, the candidate patterns to score (dense first, then sparse families).

    Families: sliding window, A-shape (sinks + window), multi-diagonal with periods read off the
    profile's strongest off-diagonal offsets, vertical-slash from the profile's strongest
    columns and diagonals, static block top-k from the profile, strided, radial, power-of-two,
    and skip.
    """
    length = max(site.q_len, site.k_len)
    shared: list[Pattern] = []
    windows = _geometric(block_size // 2, length, math.sqrt(2))
    for window in windows:
        shared.append(pattern_library.sliding_window(window))
        shared.append(pattern_library.a_shape(block_size, window))
    shared.append(pattern_library.attention_sinks(block_size))
    for stride in _geometric(2 * block_size, length // 2):
        shared.append(pattern_library.strided(stride, block_size) | pattern_library.sliding_window(block_size))
    for window in _geometric(block_size, length // 4):
        shared.append(pattern_library.radial(window, window))
    shared.append(pattern_library.power_of_two(width=block_size // 2))
    shared.append(pattern_library.skip())
    per_head: list[list[Pattern]] = []
    for head in range(site.num_heads):
        candidates = [pattern_library.dense(), *shared]
        if profile is not None:
            mass = profile.normalized()[head]
            candidates += _profile_candidates(mass, block_size, site)
        per_head.append(_unique(candidates))
    return per_head


def _profile_candidates(mass: torch.Tensor, block_size: int, site: AttentionSite) -> list[Pattern]:
    """Candidates read off one head's block attention map."""
    found: list[Pattern] = []
    q_blocks, k_blocks = mass.shape
    # Strongest diagonal offsets (in blocks) beyond the local neighbourhood → multi-diagonal periods.
    offsets = torch.zeros(q_blocks + k_blocks, dtype=torch.float64)
    rows = torch.arange(q_blocks).unsqueeze(1)
    columns = torch.arange(k_blocks).unsqueeze(0)
    distance = (rows - columns).abs()
    offsets.index_add_(0, distance.flatten(), mass.flatten())
    counts = torch.bincount(distance.flatten(), minlength=q_blocks + k_blocks).clamp_min(1)
    per_offset = offsets / counts
    # Periods: the offsets (>= 2 blocks, with at least two periods in the sequence) holding the most mass.
    longest = min(q_blocks, k_blocks) // 2
    if longest >= 2:
        far = offsets[: longest + 1].clone()
        far[:2] = 0
        for offset in far.topk(min(2, int((far > 0).sum()))).indices.tolist():
            if offset >= 2:
                period = offset * block_size
                for width in (0, block_size // 2):
                    found.append(pattern_library.multi_diagonal(period, width))
                    found.append(pattern_library.multi_diagonal(period, width) | pattern_library.attention_sinks(block_size))
    # Vertical-slash: strongest key columns (relative) and diagonals.
    column_mass = mass.sum(0)
    top_columns = column_mass.topk(min(4, k_blocks)).indices.tolist()
    key_length = k_blocks * block_size  # the profile's length, not the captured one
    vertical = sorted({round((c * block_size + block_size / 2) / key_length, 4) for c in top_columns if c > 0})
    vertical = [position for position in vertical if position < 1]
    slash = sorted({int(o) * block_size for o in per_offset.topk(min(4, per_offset.numel())).indices.tolist()})
    if vertical or slash:
        found.append(pattern_library.vertical_slash(vertical, slash, block_size) | pattern_library.attention_sinks(block_size))
    # Static block top-k at several densities.
    for density in (0.05, 0.1, 0.2, 0.3, 0.5):
        found.append(pattern_library.block_top_k.from_block_scores(
            mass, density=density, causal=site.causal,
            relative_to="diagonal" if site.is_self_attention else "start"))
    return found


class SiteMasks:
    """Block masks of one site's candidates, computed once per (pattern, lengths) and shared by the
    prefilter, the scoring and the costing (heads share most candidates).

    Example:
        >>> masks = SiteMasks(block_size=64, causal=True)
        >>> masks.of(pattern_library.sliding_window(64), 256, 256).shape
        torch.Size([4, 4])
    """

    def __init__(self, block_size: int, causal: bool):
        self.block_size = block_size
        self.causal = causal
        self._masks: dict[tuple[str, int, int], torch.Tensor] = {}

    def of(self, pattern: Pattern, q_len: int, k_len: int) -> torch.Tensor:
        key = (repr(pattern.to_dict()), q_len, k_len)
        if key not in self._masks:
            self._masks[key] = pattern.block_mask(blocks_for(q_len, self.block_size), blocks_for(k_len, self.block_size),
                                                  block_size=self.block_size, causal=self.causal,
                                                  q_len=q_len, k_len=k_len)
        return self._masks[key]


def prefilter_candidates(candidates: Sequence[Pattern], profile: BlockMassProfile, head: int, masks: SiteMasks,
                         min_recall: float, dominance_margin: float = 0.002) -> list[Pattern]:
    """Drop candidates the profile already rules out, before the (costlier) output-error scoring.

    A candidate goes when it keeps less than ``min_recall`` of the head's attention mass, or
    when another keeps no more blocks and at least ``dominance_margin`` more mass. Dense
    (index 0) and skip always stay: their errors are exact without the profile.
    """
    stacked = torch.stack([masks.of(p, profile.q_len, profile.k_len) for p in candidates])
    recall = profile.recall(stacked.unsqueeze(0).expand(profile.mass.shape[0], *stacked.shape))[head]
    kept = stacked.flatten(1).sum(1)
    keep = []
    for index, pattern in enumerate(candidates):
        if index == 0 or _is_skip(pattern):
            keep.append(pattern)
            continue
        if recall[index] < min_recall:
            continue
        dominated = (kept <= kept[index]) & (recall >= recall[index] + dominance_margin)
        if not bool(dominated.any()):
            keep.append(pattern)
    return keep


def _unique(candidates: Sequence[Pattern]) -> list[Pattern]:
    seen: set[str] = set()
    unique = []
    for pattern in candidates:
        key = repr(pattern.to_dict())
        if key not in seen:
            seen.add(key)
            unique.append(pattern)
    return unique


# -- choosing ---------------------------------------------------------------------------------------

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


def choose_with_multiplier(options: Sequence[HeadOptions], primary: Callable[[HeadOptions], torch.Tensor],
                           secondary: Callable[[HeadOptions], torch.Tensor], budget: float) -> list[int]:
    """Pick one candidate per head minimising Σ primary subject to Σ secondary <= budget.

    Lagrangian relaxation: each head takes ``argmin primary + λ·secondary``; λ is found by
    bisection (in log space) as the smallest that meets the budget. Index 0 of every head must
    be feasible on its own for the budget (dense has zero error), so a solution always exists.
    Candidates off the convex hull, which no λ picks, are then tried greedily with what is left
    of the budget (`improve_greedily`).

    Example:
        >>> option = HeadOptions("s", 0, [], torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5]),
        ...                      torch.tensor([0.0, 3.0]), torch.zeros(2), torch.ones(2), 1.0)
        >>> choose_with_multiplier([option], lambda o: o.cost, lambda o: o.squared_error, 5.0)
        [1]
    """

    def priced(option: HeadOptions, multiplier: float) -> torch.Tensor:
        # An infinite secondary (an excluded candidate) stays infinite at multiplier 0 (0·inf is NaN).
        penalty = secondary(option)
        return primary(option) + torch.where(torch.isfinite(penalty), multiplier * penalty, math.inf)

    def pick(multiplier: float) -> tuple[list[int], float]:
        choice = [int(torch.argmin(priced(o, multiplier))) for o in options]
        return choice, sum(float(secondary(o)[c]) for o, c in zip(options, choice))

    choice, used = pick(0.0)
    if used <= budget:
        return choice
    low, high = 1e-12, 1.0
    while pick(high)[1] > budget and high < 1e30:
        high *= 16
    best = pick(high)[0]
    for _ in range(60):
        middle = math.sqrt(low * high)
        candidate, used = pick(middle)
        if used <= budget:
            high, best = middle, candidate
        else:
            low = middle
    objective, cost = _padded([primary(o) for o in options]), _padded([secondary(o) for o in options])
    group = torch.zeros(len(options), dtype=torch.long)
    improved = improve_greedily(objective, [(cost, group, torch.tensor([budget], dtype=torch.float64))],
                                torch.tensor(best))
    return improved.tolist()


def _padded(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[len(rows), longest]`` float64, padded with ``inf`` (a padded slot is never feasible)."""
    table = torch.full((len(rows), max(len(r) for r in rows)), math.inf, dtype=torch.float64)
    for index, row in enumerate(rows):
        table[index, :len(row)] = row.to(torch.float64)
    return table


def improve_greedily(objective: torch.Tensor, constraints: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     choice: torch.Tensor) -> torch.Tensor:
    """Move heads to candidates that lower Σ ``objective`` while every constraint stays met, best move first.

    ``objective`` is ``[heads, candidates]``; each constraint is ``(values [heads, candidates],
    group [heads], budgets [groups])``: per group, the chosen values must sum to at most its
    budget. Candidates with an infinite value are never moved to. Stops when no move helps.

    Example:
        >>> objective = torch.tensor([[1.0, 0.6], [1.0, 0.4]], dtype=torch.float64)   # work: dense, sparse
        >>> error = torch.tensor([[0.0, 0.3], [0.0, 0.2]], dtype=torch.float64)
        >>> improve_greedily(objective, [(error, torch.tensor([0, 0]), torch.tensor([0.25]))], torch.tensor([0, 0]))
        tensor([0, 1])
    """
    choice = choice.clone()
    heads = torch.arange(objective.shape[0])
    for _ in range(objective.numel()):
        current = objective[heads, choice]
        gain = current.unsqueeze(1) - objective
        feasible = torch.isfinite(objective) & (gain > 1e-12 * current.abs().clamp_min(1e-300).unsqueeze(1))
        for values, group, budgets in constraints:
            chosen = values[heads, choice]
            used = torch.zeros(len(budgets), dtype=torch.float64).index_add_(0, group, chosen)
            slack = (budgets - used)[group].unsqueeze(1)
            extra = values - chosen.unsqueeze(1)
            feasible &= torch.isfinite(values) & (extra <= slack + 1e-12 * budgets.abs().max().clamp_min(1e-300))
        if not bool(feasible.any()):
            break
        best = torch.where(feasible, gain, -math.inf).flatten().argmax()
        head, candidate = divmod(int(best), objective.shape[1])
        choice[head] = candidate
    return choice


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

    from sparsify.passes.profile import observe

    if not sites:
        raise SparsifyError("search needs at least one attention site")
    progress = config.progress if progress is None else progress
    device = device or _device_of(captured.graph_module)
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
        usable = [i for i in range(shard.total) if _step_of(i, config) >= config.dense_steps]
        if not usable:
            raise SparsifyError(f"every calibration call is one of the first dense_steps={config.dense_steps} steps; "
                                f"calibrate on later steps too (steps_per_generation={config.steps_per_generation})")
        chosen = split_batches(len(usable), config.holdout_fraction)
        profile_indices = [usable[i] for i in chosen[0]]
        holdout_indices = [usable[i] for i in chosen[1]]
    profile_indices, holdout_indices = shard.local(profile_indices), shard.local(holdout_indices)
    held_out_steps = [_step_of(shard.offset + i, config) for i in holdout_indices]
    progress = progress and group.is_main

    if config.max_error == 0 and not config.has_target:
        strategy = Strategy.dense(list(sites), block_size=block_size)
        strategy = _with_metadata(strategy, config, {"note": "max_error=0: every head dense"})
        return SearchResult(strategy, captured, list(sites), {}, {}, [batches[i] for i in holdout_indices],
                            held_out_steps)

    # 1. profile
    profiles: dict[str, BlockMassProfile] = {}
    seeds = _SamplingSeeds(config.seed, shard.offset)

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
            mask_cache[key] = _candidate_masks(static, q.shape[2], k.shape[2], site_masks[site.name], q.device)
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

    # 5. choose
    options: dict[str, list[HeadOptions]] = {}
    for site in sites:
        options[site.name] = _head_options(site, candidates[site.name], scores[site.name], site_masks[site.name],
                                           cost_model, backend, device, config, static_counts[site.name])
    chosen, outcome = _choose(sites, options, config)
    strategy = _build_strategy(sites, options, chosen, block_size, config, cost_model, backend, device, outcome)
    if group.is_distributed:
        calibration = {"world_size": group.world_size, "batches_per_rank": list(shard.counts)}
        strategy = group.agree_on_strategy(dataclasses.replace(strategy, metadata={**strategy.metadata,
                                                                                   "distributed": calibration}))
    # Per held-out batch (this rank's), the padded positions the first masked self-attention site saw
    # (for the end-to-end error).
    held_out_padding = [
        next((scores[site.name].padded_rows[i] for site in sites
              if i < len(scores[site.name].padded_rows) and scores[site.name].padded_rows[i] is not None), None)
        for i in range(len(holdout_indices))
    ]
    return SearchResult(strategy, captured, list(sites), profiles, options, [batches[i] for i in holdout_indices],
                        held_out_steps, target=outcome, held_out_padding=held_out_padding)


class _SamplingSeeds:
    """Seeds the row sampling per (phase, global calibration call, site): a call's draws do not depend on which
    calls ran before it, so a rank's shard samples exactly the rows one process samples on the union.

    Example:
        >>> seeds = _SamplingSeeds(seed=0, first_call=3)
        >>> list(seeds.calls([0, 1])), seeds.call
        ([0, 1], 4)
    """

    def __init__(self, seed: int, first_call: int):
        self.seed = seed
        self.first_call = first_call
        self.call = first_call
        self.generator = torch.Generator()

    def calls(self, indices: Sequence[int]):
        """Iterate ``indices`` (this rank's batch indices), tracking the global call being observed."""
        for index in indices:
            self.call = self.first_call + index
            yield index

    def for_site(self, phase: str, site: AttentionSite) -> torch.Generator:
        text = f"{self.seed}/{phase}/{self.call}/{site.index}".encode()
        return self.generator.manual_seed(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1)


def _step_of(index: int, config: CompileOptions) -> int:
    """The generation step of calibration call ``index``."""
    return index % config.steps_per_generation if config.steps_per_generation else index


def _device_of(graph_module: torch.nn.Module) -> torch.device:
    from sparsify.passes.rewrite import _device_of as device_of

    return device_of(graph_module)


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


def _candidate_masks(per_head: list[list[Pattern]], q_len: int, k_len: int, site_masks: SiteMasks,
                     device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    masks = [torch.stack([site_masks.of(p, q_len, k_len) for p in candidates]).to(device) for candidates in per_head]
    skips = [torch.tensor([_is_skip(p) for p in candidates], device=device) for candidates in per_head]
    return masks, skips


def _is_skip(pattern: Pattern) -> bool:
    return bool(getattr(pattern, "is_skip", False))


def _head_options(site: AttentionSite, candidates: list[list[Pattern]], scores: CandidateErrors, site_masks: SiteMasks,
                  cost_model: CostModel, backend: str, device: torch.device, config: CompileOptions,
                  static_counts: list[int] | None = None) -> list[HeadOptions]:
    block_size = site_masks.block_size
    dense_blocks = float(site_masks.of(pattern_library.dense(), site.q_len, site.k_len).sum())
    dense_cost = cost_model.dense_head_latency(site, backend=backend, device=device)
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
            if _is_skip(pattern):
                costs.append(0.0)
                work.append(0.0)
                continue
            if index >= static_count:  # input-adaptive: the work its masks kept on held-out inputs, plus estimating them
                kept = float(mean_work[index]) * dense_blocks
                cost = (cost_model.sparse_head_latency(site, kept, backend=backend, device=device, block_size=block_size)
                        + cost_model.estimation_latency(site, pattern, backend=backend, device=device,
                                                        block_size=block_size))
                costs.append(cost)
                work.append(float(mean_work[index]))
                continue
            kept = float(site_masks.of(pattern, site.q_len, site.k_len).sum())
            cost = cost_model.sparse_head_latency(site, kept, backend=backend, device=device, block_size=block_size)
            if isinstance(pattern, pattern_library.BlockTopK):
                cost *= STATIC_TABLE_COST_FACTOR
            costs.append(cost)
            work.append(kept / dense_blocks)
        cost = torch.tensor(costs, dtype=torch.float64)
        relative_error = scores.relative_error(head)
        recall = scores.recall(head)
        squared_error = scores.squared_error[head].clone()
        # Rule out: not faster than dense by the cost model, or too little attention mass kept.
        excluded = (cost >= dense_cost) | ((recall < config.min_recall) & ~torch.tensor([_is_skip(p) for p in head_candidates]))
        excluded[0] = False
        squared_error[excluded] = math.inf
        options.append(HeadOptions(site.name, head, list(head_candidates), cost, torch.tensor(work, dtype=torch.float64),
                                   squared_error, relative_error, recall, float(scores.output_norm[head]),
                                   scores.work_spread(head)))
    return options


@dataclasses.dataclass
class TargetOutcome:
    """How a global target fared: reached or not, what was achieved, which sites exceed ``max_error``.

    ``achieved`` is in the target's own unit (density, or speedup); ``sites_over_budget`` maps
    each site whose output error exceeds ``max_error`` to that error (only ever non-empty with
    ``target_overrides_max_error=True``).
    """

    kind: str  # "density" or "speedup"
    value: float
    achieved: float
    reached: bool
    overrides_max_error: bool
    sites_over_budget: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "achieved": round(self.achieved, 6), "reached": self.reached,
                "overrides_max_error": self.overrides_max_error,
                "sites_over_budget": sorted(self.sites_over_budget)}


def _choose(sites: Sequence[AttentionSite], options: dict[str, list[HeadOptions]],
            config: CompileOptions) -> tuple[dict[str, list[int]], TargetOutcome | None]:
    chosen: dict[str, list[int]] = {}
    if not config.has_target:
        for site in sites:
            site_options = options[site.name]
            budget = config.max_error**2 * sum(o.output_norm for o in site_options)
            chosen[site.name] = choose_with_multiplier(site_options, lambda o: o.cost, lambda o: o.squared_error, budget)
        return _keep_one_head_per_site(sites, options, chosen, lambda o: o.cost), None
    # Global target: minimise Σ (site-relative squared error) subject to Σ work (or cost) <= target and, unless
    # the user lets the target override it, every site's error within max_error.
    everything = [o for site in sites for o in options[site.name]]
    site_norm = {site.name: max(sum(o.output_norm for o in options[site.name]), 1e-30) for site in sites}
    if config.target_density is not None:
        weights = {site.name: _dense_work(site) for site in sites}
        secondary = lambda o: o.work * weights[o.site]  # noqa: E731
        budget = config.target_density * sum(weights[o.site] for o in everything)
    else:
        secondary = lambda o: o.cost  # noqa: E731
        budget = sum(float(o.cost[0]) for o in everything) / config.target_speedup
    site_index = {site.name: index for index, site in enumerate(sites)}
    site_budget = math.inf if config.target_overrides_max_error else config.max_error**2
    picks = allocate_with_target(
        [o.squared_error / site_norm[o.site] for o in everything],
        [secondary(o) / budget for o in everything],
        [site_index[o.site] for o in everything],
        [site_budget] * len(sites),
    )
    position = 0
    for site in sites:
        count = len(options[site.name])
        chosen[site.name] = picks[position:position + count]
        position += count
    chosen = _keep_one_head_per_site(sites, options, chosen, secondary)
    # What was reached, and which sites exceed max_error.
    used = sum(float(secondary(o)[c]) for site in sites for o, c in zip(options[site.name], chosen[site.name]))
    if config.target_density is not None:
        kind, value = "density", config.target_density
        achieved = config.target_density * used / budget
        reached = achieved <= config.target_density * (1 + 1e-9)
    else:
        kind, value = "speedup", config.target_speedup
        dense_total = sum(float(o.cost[0]) for o in everything)
        achieved = dense_total / used if used > 0 else math.inf
        reached = achieved >= config.target_speedup * (1 - 1e-9)
    over = {}
    for site in sites:
        error = _site_error(options[site.name], chosen[site.name])
        if error > config.max_error * (1 + 1e-9):
            over[site.name] = error
    outcome = TargetOutcome(kind, value, achieved, reached, config.target_overrides_max_error, over)
    if not reached and config.target_overrides_max_error:
        logger.warning("target_%s=%g is not reachable even past max_error (no site drops all of its heads): the "
                       "closest strategy has %s %.3f", kind, value, kind, achieved)
    elif not reached:
        logger.warning(
            "target_%s=%g is not reachable within max_error=%g: the closest strategy has %s %.3f with every site "
            "within the budget. Raise max_error, or pass target_overrides_max_error=True to let sites exceed it.",
            kind, value, config.max_error, kind, achieved)
    if over:
        listed = ", ".join(f"{name} ({error:.3f})" for name, error in sorted(over.items(), key=lambda item: -item[1]))
        logger.warning("target_%s=%g overrides max_error=%g (target_overrides_max_error=True): %d site(s) exceed the "
                       "budget: %s", kind, value, config.max_error, len(over), listed)
    return chosen, outcome


def allocate_with_target(errors: Sequence[torch.Tensor], works: Sequence[torch.Tensor], site_of_head: Sequence[int],
                         site_budgets: Sequence[float], work_budget: float = 1.0) -> list[int]:
    """Per head one candidate: least Σ error with Σ work <= ``work_budget`` and each site's Σ error <= its budget.

    ``errors[h]`` / ``works[h]`` hold head ``h``'s candidates (index 0 — dense — must have error 0;
    ``inf`` error excludes a candidate); ``site_of_head[h]`` indexes ``site_budgets``. Lagrangian
    relaxation with one multiplier ``λ`` on work and one ``ν_s`` per site on its error: each head
    takes ``argmin (1 + ν_s)·error + λ·work``; for a given ``λ`` every ``ν_s`` is the smallest that
    keeps its site within budget (bisection, all sites at once), and ``λ`` is the smallest that
    meets the work budget (bisection). When no ``λ`` meets it, the result is the least work each
    site can do within its error budget — the closest to the target the budgets allow.

    Example:
        >>> errors = [torch.tensor([0.0, 0.01, 1.0]), torch.tensor([0.0, 0.5, 1.0])]
        >>> works = [torch.tensor([1.0, 0.2, 0.0]), torch.tensor([1.0, 0.2, 0.0])]
        >>> allocate_with_target(errors, works, [0, 0], [0.25], work_budget=1.2)   # second head stays dense
        [1, 0]
    """
    width = max(len(e) for e in errors)
    error = torch.full((len(errors), width), math.inf, dtype=torch.float64)
    work = torch.zeros((len(errors), width), dtype=torch.float64)
    for head, (head_error, head_work) in enumerate(zip(errors, works)):
        error[head, :len(head_error)] = head_error.to(torch.float64)
        work[head, :len(head_work)] = head_work.to(torch.float64)
    error = error.nan_to_num(nan=math.inf)
    sites = torch.tensor(site_of_head, dtype=torch.long)
    budgets = torch.tensor(site_budgets, dtype=torch.float64)
    heads = torch.arange(len(errors))

    def site_totals(choice: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(budgets), dtype=torch.float64).index_add_(0, sites, values[heads, choice])

    def choose(price: float) -> torch.Tensor:
        """Each site within its budget, at the least multiplier that keeps it there."""

        def pick(site_multiplier: torch.Tensor) -> torch.Tensor:
            weighted = (1 + site_multiplier[sites]).unsqueeze(1) * error + price * work
            return weighted.argmin(1)

        multiplier = torch.zeros(len(budgets), dtype=torch.float64)
        choice = pick(multiplier)
        over = site_totals(choice, error) > budgets
        if not bool(over.any()):
            return choice
        low = torch.zeros_like(multiplier)
        high = torch.where(over, torch.ones_like(multiplier), torch.zeros_like(multiplier))
        for _ in range(40):  # grow until every site is within budget (ν → ∞ picks the least error: dense)
            still = site_totals(pick(high), error) > budgets
            if not bool(still.any()):
                break
            high = torch.where(still, high * 16, high)
        best = pick(high)
        for _ in range(50):
            middle = torch.where(over, torch.sqrt(low.clamp_min(1e-12) * high), high)
            trial = pick(middle)
            within = site_totals(trial, error) <= budgets
            high = torch.where(over & within, middle, high)
            low = torch.where(over & ~within, middle, low)
            best = pick(high)
        return best

    def total_work(choice: torch.Tensor) -> float:
        # Relative slack for rounding: 0.2 + 0.2 must meet a budget of 0.4.
        return float(work[heads, choice].sum()) * (1 - 1e-6)

    choice = choose(0.0)
    if total_work(choice) <= work_budget:
        return choice.tolist()
    # The least work within the budgets (λ → ∞): per site, least work subject to its error budget
    # (excluded candidates — infinite error — cost infinite work here, so they are never picked).
    least = torch.zeros(len(errors), dtype=torch.long)
    priced = torch.where(torch.isfinite(error), work, torch.full_like(work, math.inf))
    for site in range(len(budgets)):
        members = (sites == site).nonzero().flatten()
        if not members.numel():
            continue
        site_options = [HeadOptions("", int(h), [], priced[h], work[h], error[h], error[h], work[h], 1.0)
                        for h in members.tolist()]
        picked = choose_with_multiplier(site_options, lambda o: o.cost, lambda o: o.squared_error, float(budgets[site]))
        least[members] = torch.tensor(picked)
    if total_work(least) > work_budget:
        return least.tolist()
    low, high = 0.0, 1.0
    while total_work(choose(high)) > work_budget and high < 1e30:
        high *= 16
    best = choose(high)
    for _ in range(50):
        middle = math.sqrt(max(low, 1e-12) * high)
        candidate = choose(middle)
        if total_work(candidate) <= work_budget:
            high, best = middle, candidate
        else:
            low = middle
    # Candidates off the convex hull (no multiplier picks them) may still lower the error within what is left.
    everyone = torch.zeros(len(errors), dtype=torch.long)
    work_limit = torch.tensor([work_budget / (1 - 1e-6)], dtype=torch.float64)
    best = improve_greedily(error, [(work, everyone, work_limit), (error, sites, budgets)], best)
    return best.tolist()


def _site_error(site_options: Sequence[HeadOptions], choice: Sequence[int]) -> float:
    squared = sum(float(o.squared_error[i]) for o, i in zip(site_options, choice))
    norm = sum(o.output_norm for o in site_options)
    return math.sqrt(squared / max(norm, 1e-300))


def _keep_one_head_per_site(sites: Sequence[AttentionSite], options: dict[str, list[HeadOptions]],
                            chosen: dict[str, list[int]], price: Callable[[HeadOptions], torch.Tensor]) -> dict[str, list[int]]:
    """A site whose every head would be skipped keeps the head that is cheapest to keep (``price``).

    Dropping every head makes the site's output vanish — a relative error of 1, which no
    ``max_error`` in [0, 1) allows — so this only acts where the budget was overridden (or the
    site's output is zero on the calibration data).
    """
    for site in sites:
        site_options = options[site.name]
        if not all(_is_skip(o.patterns[c]) for o, c in zip(site_options, chosen[site.name])):
            continue
        best = None
        for head, option in enumerate(site_options):
            values = price(option)
            for index, pattern in enumerate(option.patterns):
                if _is_skip(pattern) or not math.isfinite(float(option.squared_error[index])):
                    continue
                extra = float(values[index])
                if best is None or extra < best[0]:
                    best = (extra, head, index)
        if best is not None:
            chosen[site.name] = list(chosen[site.name])
            chosen[site.name][best[1]] = best[2]
            logger.info("site %s: every head would be skipped; head %d keeps %s", site.name, best[1],
                        site_options[best[1]].patterns[best[2]])
    return chosen


def _dense_work(site: AttentionSite) -> float:
    return site.q_len * site.k_len * site.head_dim * (0.5 if site.causal else 1.0)


def _build_strategy(sites, options, chosen, block_size, config: CompileOptions, cost_model, backend, device,
                    outcome: TargetOutcome | None = None) -> Strategy:
    site_strategies = {}
    site_errors = {}
    dense_total = sparse_total = 0.0
    for site in sites:
        site_errors[site.name] = round(_site_error(options[site.name], chosen[site.name]), 6)
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
    return _with_metadata(strategy, config, {
        "backend": backend,
        "device": str(device),
        **({"priced_for": cost_model.target.device_name} if cost_model.target is not None else {}),
        # Skipped heads cost nothing: with every head skipped there is no finite speedup to state.
        "estimated_attention_speedup": round(dense_total / sparse_total, 4) if sparse_total > 0 else None,
        "site_errors": site_errors,
        **({"target": outcome.to_json()} if outcome is not None else {}),
        **({"steps_per_generation": config.steps_per_generation} if config.steps_per_generation else {}),
    })


def _with_metadata(strategy: Strategy, config: CompileOptions, extra: dict[str, Any]) -> Strategy:
    from sparsify import __version__

    metadata = dict(strategy.metadata)
    metadata.update({
        "sparsify_version": __version__,
        "search": config.to_json(),
        **extra,
    })
    return dataclasses.replace(strategy, metadata=metadata)
