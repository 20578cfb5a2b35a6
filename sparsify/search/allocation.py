"""Allocation of the search: per head one candidate, as multiple-choice knapsacks solved with Lagrange multipliers —
per-site budgets, one global model-level budget, and global density / speedup targets."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import torch

from sparsify.options import CompileOptions
from sparsify.search.candidates import is_skip
from sparsify.search.scoring import HeadOptions
from sparsify.site import AttentionSite

logger = logging.getLogger(__name__)

__all__ = ["TargetOutcome", "allocate_with_target", "choose_with_multiplier", "improve_greedily", "site_error"]


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
            finite = budgets[torch.isfinite(budgets)]  # an infinite budget must not make the rounding slack infinite
            tolerance = 1e-12 * (float(finite.abs().max()) if finite.numel() else 1.0)
            feasible &= torch.isfinite(values) & (extra <= slack + max(tolerance, 1e-300))
        if not bool(feasible.any()):
            break
        best = torch.where(feasible, gain, -math.inf).flatten().argmax()
        head, candidate = divmod(int(best), objective.shape[1])
        choice[head] = candidate
    return choice


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


@dataclasses.dataclass
class Allocation:
    """One allocation: per site the chosen candidate of each head, and what the error model predicts of it.

    ``predicted`` is the model-level error in the metric's additive form (``value ** power``: a
    squared relative L2, or KL) that the sensitivities predict; ``None`` for a per-site budget.
    """

    chosen: dict[str, list[int]]
    target: TargetOutcome | None = None
    predicted: float | None = None

    def key(self) -> tuple:
        """Hashable identity of the choice (two scales that pick the same candidates give the same key)."""
        return tuple((name, tuple(choice)) for name, choice in sorted(self.chosen.items()))


def choose(sites: Sequence[AttentionSite], options: dict[str, list[HeadOptions]], config: CompileOptions,
           sensitivities: dict[str, float] | None = None, budget_scale: float = 1.0) -> Allocation:
    """Per head one candidate, by the budget ``config`` states (DESIGN.md §5).

    * a model-level budget (``config.output_budget``, with ``sensitivities``): the cheapest
      total cost whose predicted model-level error ``Σ_site sensitivity · site_error²`` is within
      ``budget_scale · output_budget ** power`` — one global multiplier over every site and
      head — with each site under ``max_error`` when that cap is given (`allocate_within_budget`);
    * ``max_error`` alone: per site the cheapest combination within it;
    * a global ``target_density`` / ``target_speedup``: the least (model-level, with
      ``sensitivities``; else site-relative) error that meets the target, every site within
      ``max_error`` unless ``target_overrides_max_error``.

    Example:
        >>> from sparsify import patterns
        >>> option = HeadOptions("s", 0, [patterns.dense(), patterns.sliding_window(16)], torch.tensor([2.0, 1.0]),
        ...                      torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.001]), torch.zeros(2), torch.ones(2), 1.0)
        >>> site = AttentionSite("s", 0, num_heads=1, num_kv_heads=1, head_dim=8, q_len=64, k_len=64)
        >>> choose([site], {"s": [option]}, CompileOptions(max_output_error=0.05), {"s": 0.5}).chosen
        {'s': [1]}
    """
    cap = math.inf if config.max_error is None else config.max_error**2
    site_norm = {site.name: max(sum(o.output_norm for o in options[site.name]), 1e-30) for site in sites}
    weight = None
    if sensitivities is not None:
        weight = {site.name: max(float(sensitivities.get(site.name, 0.0)), 0.0) for site in sites}
    if not config.has_target:
        if weight is None:
            chosen = {}
            for site in sites:
                site_options = options[site.name]
                budget = cap * sum(o.output_norm for o in site_options)
                chosen[site.name] = choose_with_multiplier(site_options, lambda o: o.cost, lambda o: o.squared_error,
                                                           budget)
            return Allocation(_keep_one_head_per_site(sites, options, chosen, lambda o: o.cost))
        from sparsify.output_metrics import output_metric

        budget = budget_scale * float(config.output_budget) ** output_metric(config.output_metric).power
        everything = [o for site in sites for o in options[site.name]]
        site_index = {site.name: index for index, site in enumerate(sites)}
        picks = allocate_within_budget(
            [o.cost for o in everything],
            [weight[o.site] * o.squared_error / site_norm[o.site] for o in everything], budget,
            [o.squared_error / site_norm[o.site] for o in everything],
            [site_index[o.site] for o in everything], [cap] * len(sites))
        chosen = _split(sites, options, picks)
        chosen = _keep_one_head_per_site(sites, options, chosen, lambda o: o.cost)
        return Allocation(chosen, None, predicted_output_error(sites, options, chosen, weight))
    # Global target: minimise Σ error (model-level with sensitivities, else site-relative) subject to Σ work (or cost)
    # <= target and, unless the user lets the target override it, every site's error within max_error.
    everything = [o for site in sites for o in options[site.name]]
    if config.target_density is not None:
        weights = {site.name: dense_work(site) for site in sites}
        secondary = lambda o: o.work * weights[o.site]  # noqa: E731
        budget = config.target_density * sum(weights[o.site] for o in everything)
    else:
        secondary = lambda o: o.cost  # noqa: E731
        budget = sum(float(o.cost[0]) for o in everything) / config.target_speedup
    site_index = {site.name: index for index, site in enumerate(sites)}
    # With sensitivities the objective of a site is weighted by it, and so is its cap (a floor keeps a cap on a
    # site whose error reaches nothing).
    scale = {site.name: 1.0 if weight is None else max(weight[site.name], 1e-12) for site in sites}
    site_budget = [math.inf if config.target_overrides_max_error else cap * scale[site.name] for site in sites]
    work_budget = 1.0
    for _ in range(4):
        picks = allocate_with_target(
            [scale[o.site] * o.squared_error / site_norm[o.site] for o in everything],
            [secondary(o) / budget for o in everything],
            [site_index[o.site] for o in everything],
            site_budget, work_budget,
        )
        chosen = _keep_one_head_per_site(sites, options, _split(sites, options, picks), secondary)
        # A site kept from dropping every head spends work the allocation did not plan: plan with that much less.
        used = sum(float(secondary(o)[c]) for site in sites for o, c in zip(options[site.name], chosen[site.name]))
        if used <= budget * (1 + 1e-9) or used <= sum(float(secondary(o)[p]) for o, p in zip(everything, picks)):
            break
        work_budget -= (used - budget) / budget
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
    if config.max_error is not None:
        for site in sites:
            error = site_error(options[site.name], chosen[site.name])
            if error > config.max_error * (1 + 1e-9):
                over[site.name] = error
    outcome = TargetOutcome(kind, value, achieved, reached, config.target_overrides_max_error, over)
    if not reached and config.target_overrides_max_error:
        logger.warning("target_%s=%g is not reachable even past max_error (no site drops all of its heads): the "
                       "closest strategy has %s %.3f", kind, value, kind, achieved)
    elif not reached:
        logger.warning(
            "target_%s=%g is not reachable within max_error=%s: the closest strategy has %s %.3f with every site "
            "within the budget. Raise max_error, or pass target_overrides_max_error=True to let sites exceed it.",
            kind, value, config.max_error, kind, achieved)
    if over:
        listed = ", ".join(f"{name} ({error:.3f})" for name, error in sorted(over.items(), key=lambda item: -item[1]))
        logger.warning("target_%s=%g overrides max_error=%g (target_overrides_max_error=True): %d site(s) exceed the "
                       "budget: %s", kind, value, config.max_error, len(over), listed)
    predicted = None if weight is None else predicted_output_error(sites, options, chosen, weight)
    return Allocation(chosen, outcome, predicted)


def _split(sites: Sequence[AttentionSite], options: dict[str, list[HeadOptions]], picks: Sequence[int]) -> dict[str, list[int]]:
    """Flat per-head picks (sites in order) back into per-site lists."""
    chosen, position = {}, 0
    for site in sites:
        count = len(options[site.name])
        chosen[site.name] = list(picks[position:position + count])
        position += count
    return chosen


def predicted_output_error(sites: Sequence[AttentionSite], options: dict[str, list[HeadOptions]],
                           chosen: dict[str, list[int]], sensitivities: dict[str, float]) -> float:
    """``Σ_site sensitivity · site_error²``: the model-level error (additive form) the sensitivities predict."""
    return sum(max(float(sensitivities.get(site.name, 0.0)), 0.0) * site_error(options[site.name], chosen[site.name]) ** 2
               for site in sites)


def allocate_within_budget(objectives: Sequence[torch.Tensor], contributions: Sequence[torch.Tensor], budget: float,
                           site_values: Sequence[torch.Tensor], site_of_head: Sequence[int],
                           site_budgets: Sequence[float]) -> list[int]:
    """Per head one candidate: least Σ objective with Σ contribution <= ``budget`` and each site's Σ value <= its budget.

    The model-level knapsack: objective = cost, contribution = a candidate's predicted share of
    the model-level error, site values = its share of the site's relative error (for the
    ``max_error`` cap). Index 0 (dense) must have contribution and value 0 (always feasible);
    ``inf`` excludes a candidate. One global multiplier ``λ`` prices contributions (bisection in
    log space: the least that meets the budget) and one ``ν_s`` per site keeps it under its cap;
    candidates off the convex hull are then tried greedily (`improve_greedily`).

    Example:
        >>> costs = [torch.tensor([1.0, 0.3, 0.1]), torch.tensor([1.0, 0.3, 0.1])]
        >>> shares = [torch.tensor([0.0, 0.01, 0.5]), torch.tensor([0.0, 0.2, 0.9])]
        >>> allocate_within_budget(costs, shares, 0.3, shares, [0, 0], [math.inf])
        [1, 1]
        >>> allocate_within_budget(costs, shares, 0.8, shares, [0, 0], [math.inf])   # room for one head's cheapest
        [2, 1]
    """
    objective, contribution, value = _padded(objectives), _padded(contributions), _padded(site_values)
    excluded = ~torch.isfinite(contribution) | ~torch.isfinite(value) | ~torch.isfinite(objective)
    contribution = contribution.masked_fill(excluded, math.inf)
    value = value.masked_fill(excluded, math.inf)
    sites = torch.tensor(site_of_head, dtype=torch.long)
    budgets = torch.tensor(site_budgets, dtype=torch.float64)
    heads = torch.arange(objective.shape[0])
    finite_objective = objective.masked_fill(excluded, math.inf)

    def site_totals(choice: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(budgets), dtype=torch.float64).index_add_(0, sites, value[heads, choice])

    def pick(price: float, site_multiplier: torch.Tensor) -> torch.Tensor:
        weighted = finite_objective + price * contribution.masked_fill(excluded, 0) \
            + site_multiplier[sites].unsqueeze(1) * value.masked_fill(excluded, 0)
        return weighted.argmin(1)

    def choose_at(price: float) -> torch.Tensor:
        multiplier = torch.zeros(len(budgets), dtype=torch.float64)
        choice = pick(price, multiplier)
        over = site_totals(choice) > budgets
        if not bool(over.any()):
            return choice
        low = torch.zeros_like(multiplier)
        high = torch.where(over, torch.ones_like(multiplier), multiplier)
        for _ in range(60):
            still = site_totals(pick(price, high)) > budgets
            if not bool(still.any()):
                break
            high = torch.where(still, high * 16, high)
        for _ in range(50):
            middle = torch.where(over, torch.sqrt(low.clamp_min(1e-12) * high), high)
            within = site_totals(pick(price, middle)) <= budgets
            high = torch.where(over & within, middle, high)
            low = torch.where(over & ~within, middle, low)
        return pick(price, high)

    def total(choice: torch.Tensor) -> float:
        return float(contribution[heads, choice].sum()) * (1 - 1e-9)

    best = choose_at(0.0)
    if total(best) > budget:
        low, high = 1e-12, 1.0
        while total(choose_at(high)) > budget and high < 1e30:
            high *= 16
        best = choose_at(high)
        for _ in range(60):
            middle = math.sqrt(low * high)
            candidate = choose_at(middle)
            if total(candidate) <= budget:
                high, best = middle, candidate
            else:
                low = middle
            if high / low < 1 + 1e-6:
                break
    everyone = torch.zeros(objective.shape[0], dtype=torch.long)
    best = improve_greedily(finite_objective, [(contribution, everyone, torch.tensor([budget], dtype=torch.float64)),
                                               (value, sites, budgets)], best)
    return best.tolist()


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


def site_error(site_options: Sequence[HeadOptions], choice: Sequence[int]) -> float:
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
        if not all(is_skip(o.patterns[c]) for o, c in zip(site_options, chosen[site.name])):
            continue
        best = None
        for head, option in enumerate(site_options):
            values = price(option)
            for index, pattern in enumerate(option.patterns):
                if is_skip(pattern) or not math.isfinite(float(option.squared_error[index])):
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


def dense_work(site: AttentionSite) -> float:
    return site.q_len * site.k_len * site.head_dim * (0.5 if site.causal else 1.0)
