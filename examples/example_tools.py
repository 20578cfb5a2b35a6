"""Helpers the example scripts share: the adaptive-candidates option, chosen-pattern counts, realised densities,
timing and atomic JSON."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
import time
from collections import Counter
from typing import Any, Callable

import torch

import sparsify
from sparsify.patterns import causal_block_mask
from sparsify.block_mask import blocks_for


def compile_options(adaptive: bool | None, compile_function: Callable[..., Any] = sparsify.compile) -> tuple[dict[str, Any], str]:
    """Keyword arguments selecting (or not) input-adaptive candidates, and a label for what the search uses.

    ``adaptive`` is passed to ``compile_function`` only when it takes an ``adaptive`` parameter
    (sparsify versions before input-adaptive patterns do not); ``None`` leaves the library
    default. Asking for ``True`` from a sparsify without adaptive candidates is an error (the run
    would not measure what was asked); ``False`` there is what it does anyway.

    Example:
        >>> compile_options(False, lambda model, calib: None)
        ({}, 'static (no adaptive option in this sparsify)')
        >>> compile_options(True, lambda model, calib, adaptive=True: None)
        ({'adaptive': True}, 'adaptive')
    """
    parameters = inspect.signature(compile_function).parameters
    options_class = getattr(sparsify, "CompileOptions", None)
    fields = {field.name: field.default for field in dataclasses.fields(options_class)} if options_class else {}
    if "adaptive" in parameters:
        default = parameters["adaptive"].default
    elif "adaptive" in fields and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        default = fields["adaptive"]  # compile(model, calib, **options): the options object's default
    else:
        if adaptive:
            raise SystemExit(f"sparsify {sparsify.__version__} ({os.path.dirname(sparsify.__file__)}) has no "
                             "input-adaptive candidates (sparsify.compile takes no adaptive=); run with --no-adaptive")
        return {}, "static (no adaptive option in this sparsify)"
    if adaptive is None:
        return {}, "adaptive" if default else "static"
    return {"adaptive": adaptive}, "adaptive" if adaptive else "static"


def pattern_family(pattern: sparsify.patterns.Pattern) -> str:
    """The family of a chosen pattern: its registered name, or its parts' families joined by ``|`` / ``&``.

    Example:
        >>> from sparsify import patterns
        >>> pattern_family(patterns.sliding_window(128) | patterns.attention_sinks(64))
        'sliding_window|attention_sinks'
    """
    parts = getattr(pattern, "parts", None)
    if parts:
        operator = "&" if pattern.pattern_name == "intersection" else "|"
        return operator.join(pattern_family(part) for part in parts)
    return pattern.pattern_name


def family_counts(strategy: sparsify.Strategy) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Heads per pattern family over the whole strategy (most frequent first), and per site (site → family → heads).

    Example:
        >>> from sparsify import AttentionSite, Strategy, patterns
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=8, q_len=128, k_len=128)
        >>> family_counts(Strategy.uniform([site], patterns.sliding_window(64)))
        ({'sliding_window': 2}, {'attn': {'sliding_window': 2}})
    """
    total: Counter[str] = Counter()
    per_site: dict[str, dict[str, int]] = {}
    for name, site in strategy.sites.items():
        counts = Counter(pattern_family(pattern) for pattern in site.heads)
        per_site[name] = dict(counts.most_common())
        total.update(counts)
    return dict(total.most_common()), per_site


def error_checks(strategy: sparsify.Strategy, max_error: float | None) -> dict[str, Any]:
    """What the search recorded against the budget: the largest site and head errors, and the sites over
    ``max_error`` (``None``: a density target, no per-site budget).

    Example:
        >>> from sparsify import AttentionSite, Strategy
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=8, q_len=128, k_len=128)
        >>> error_checks(Strategy.dense([site]), 0.05)["sites_over_budget"]
        {}
    """
    site_errors = strategy.metadata.get("site_errors", {})
    over = {} if max_error is None else {name: error for name, error in site_errors.items()
                                         if error > max_error * (1 + 1e-6)}
    head_errors = [metric.get("error", 0.0) for site in strategy.sites.values() for metric in site.head_metrics or []]
    return {"max_site_error": max(site_errors.values(), default=None), "sites_over_budget": over,
            "max_head_error": max(head_errors, default=None)}


class RealisedDensity:
    """Measures the causal block density a compiled model really runs while the ``with`` block calls it.

    Static heads keep their pattern's blocks at the site's recorded lengths; input-adaptive heads
    keep what their estimate keeps on each call, read from the runtime sites'
    ``adaptive_density_log``. `result` gives the mean over every head of the strategy (sites left
    dense included) as `Strategy.summary` weighs it: kept blocks over the blocks dense attention
    computes (the lower triangle at causal sites), each head weighted by its head dim and its
    site's dense blocks. It differs from the summary's ``mean_density`` only where heads are
    adaptive (the summary counts them at the work the search recorded). Calls must have the recorded lengths.

    Example:
        >>> with RealisedDensity(compiled) as density:      # doctest: +SKIP
        ...     compiled(**batch)
        >>> density.result()["mean_density"]                 # doctest: +SKIP
    """

    def __init__(self, compiled: torch.nn.Module | None = None, *, strategy: sparsify.Strategy | None = None,
                 modules: Any = ()):
        # A compiled module, or a strategy and the runtime site modules that run it (e.g. an interpreter's replacements).
        self.strategy = compiled.strategy if compiled is not None else strategy
        if self.strategy is None:
            raise ValueError("RealisedDensity needs a compiled module, or strategy= and modules=")
        found = compiled.modules() if compiled is not None else modules
        # Runtime sites with adaptive heads, by site name (sites left dense are not rewritten at all).
        self.adaptive_sites = {module.site.name: module for module in found
                               if getattr(module, "adaptive_heads", None) is not None and module.adaptive_heads.numel()}
        self.logs: dict[str, list[torch.Tensor]] = {}

    def __enter__(self) -> "RealisedDensity":
        for module in self.adaptive_sites.values():
            module.adaptive_density_log = []
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for name, module in self.adaptive_sites.items():
            self.logs.setdefault(name, []).extend(entry.detach().cpu() for entry in module.adaptive_density_log or [])
            module.adaptive_density_log = None

    def result(self) -> dict[str, Any]:
        """``mean_density`` over all heads, the adaptive heads' count and mean, the calls measured, and per site."""
        strategy = self.strategy
        weighted = total_weight = 0.0
        adaptive_values: list[float] = []
        per_site: dict[str, float] = {}
        for entry in strategy.fingerprint:
            name, block_size = entry["name"], strategy.block_size
            q_blocks, k_blocks = blocks_for(entry["q_len"], block_size), blocks_for(entry["k_len"], block_size)
            visible = int(causal_block_mask(q_blocks, k_blocks).sum()) if entry["causal"] else q_blocks * k_blocks
            realised: dict[int, float] = {}
            if name in self.adaptive_sites:
                if not self.logs.get(name):
                    raise RuntimeError(f"site {name!r} has input-adaptive heads but ran no call inside the `with` block")
                # Per call, each adaptive head's mean kept blocks per query row, over all key blocks.
                shares = torch.stack(self.logs[name]).double().mean(0) * q_blocks * k_blocks / visible
                realised = dict(zip(self.adaptive_sites[name].adaptive_heads.tolist(), shares.tolist()))
            densities = []
            for head, pattern in enumerate(strategy.sites[name].heads):
                if pattern.is_adaptive:
                    densities.append(realised[head])
                    adaptive_values.append(realised[head])
                else:
                    densities.append(pattern.density(q_blocks, k_blocks, block_size=block_size, causal=entry["causal"],
                                                     q_len=entry["q_len"], k_len=entry["k_len"]))
            per_site[name] = round(sum(densities) / len(densities), 6)
            weight = entry.get("head_dim", 1) * visible
            weighted += weight * sum(densities)
            total_weight += weight * len(densities)
        return {
            "mean_density": weighted / total_weight if total_weight else None,
            "adaptive_heads": len(adaptive_values),
            "adaptive_head_mean_density": sum(adaptive_values) / len(adaptive_values) if adaptive_values else None,
            "calls_measured": max((len(log) for log in self.logs.values()), default=0),
            "per_site": per_site,
        }


def searched_density(strategy: sparsify.Strategy) -> float | None:
    """Mean causal density by the work the search recorded per head (``head_metrics[...]["work"]``: static heads'
    kept share, adaptive heads' mean kept share on the held-out calibration batches), weighted as
    `Strategy.summary` weighs heads; ``None`` where a head has no recorded work.

    Example:
        >>> from sparsify import AttentionSite, Strategy
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=8, q_len=128, k_len=128)
        >>> searched_density(Strategy.dense([site])) is None
        True
    """
    fingerprints = {entry["name"]: entry for entry in strategy.fingerprint}
    weighted = total_weight = 0.0
    for name, site in strategy.sites.items():
        metrics = site.head_metrics
        entry = fingerprints.get(name, {})
        if not metrics or any("work" not in metric for metric in metrics) or "q_len" not in entry:
            return None
        q_blocks, k_blocks = blocks_for(entry["q_len"], strategy.block_size), blocks_for(entry["k_len"], strategy.block_size)
        visible = int(causal_block_mask(q_blocks, k_blocks).sum()) if entry["causal"] else q_blocks * k_blocks
        weight = entry.get("head_dim", 1) * visible
        weighted += weight * sum(metric["work"] for metric in metrics)
        total_weight += weight * len(metrics)
    return weighted / total_weight if total_weight else None


@dataclasses.dataclass
class Timer:
    """Wall-clock seconds of named steps, printed as each ends.

    Example:
        >>> timer = Timer(echo=False)
        >>> timer.run("add", lambda: 1 + 1), list(timer.seconds)
        (2, ['add'])
    """

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    echo: bool = True

    def run(self, name: str, function: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = function()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if self.echo:
            print(f"  {name}: {self.seconds[name]:.1f} s", flush=True)
        return result


def write_json(document: dict[str, Any], path: str) -> None:
    """Write ``document`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    Example:
        >>> write_json({"ratio": 1.0}, "/tmp/result.json")   # doctest: +SKIP
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(document, file, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def machine() -> dict[str, Any]:
    """The numbers that make a CPU timing comparable: cores, torch threads, versions and the load average."""
    import platform

    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()]}
