"""`Strategy`: the versioned JSON document naming each site's per-head sparsity patterns."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sparsify.errors import PatternError, StrategyError
from sparsify.io import write_text_atomically
from sparsify.limits import (
    MAX_BLOCK_SIZE,
    MAX_GRID_BLOCKS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_JSON_DEPTH,
    MAX_STEPS,
    MAX_TOKENS,
    MIN_BLOCK_SIZE,
    int_range_problem,
    shown,
)
from sparsify.patterns import Pattern, dense, pattern_from_dict
from sparsify.site import AttentionSite
from sparsify.block_mask import block_geometry, blocks_for

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "SiteStrategy",
    "Strategy",
    "site_fingerprint",
]

FORMAT_VERSION = 2
"""Version written by `Strategy.save`.

Version 2 (issue 18) dropped per-site ``fusion_groups`` (computed, saved and read by nothing: all
sparse heads of a site run in one launch) and records the model-level budget in the metadata
(``output_budget``: metric, budget, sensitivities, promised vs measured error).
"""

SUPPORTED_FORMAT_VERSIONS = (1, 2)
"""Versions `Strategy.load` understands (a version-1 file's ``fusion_groups`` are checked for shape and dropped)."""

_TOP_LEVEL_KEYS = ("format_version", "block_size", "fingerprint", "sites", "metadata")
_SITE_KEYS = ("heads", "head_metrics", "dense_steps")
_VERSION_1_SITE_KEYS = ("fusion_groups",)  # read (and dropped) from version-1 files only
# Fingerprint entries may carry more keys (carried as they are); these are checked.
_FINGERPRINT_TYPES: dict[str, type] = {
    "name": str,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "causal": bool,
    "kind": str,
}
_OPTIONAL_FINGERPRINT_TYPES: dict[str, type] = {"q_len": int, "k_len": int}
# Upper bound (and the sparsify.limits name) of each integer of a fingerprint entry.
_FINGERPRINT_BOUNDS: dict[str, tuple[int, str]] = {
    "num_heads": (MAX_HEADS, "MAX_HEADS"),
    "num_kv_heads": (MAX_HEADS, "MAX_HEADS"),
    "head_dim": (MAX_HEAD_DIM, "MAX_HEAD_DIM"),
    "q_len": (MAX_TOKENS, "MAX_TOKENS"),
    "k_len": (MAX_TOKENS, "MAX_TOKENS"),
}
# Measured numbers the reports read: (lowest, highest) allowed; other keys are free JSON.
_HEAD_METRIC_RANGES: dict[str, tuple[float, float]] = {
    "recall": (0.0, 1.0),
    "work": (0.0, 1.0),
    "error": (0.0, math.inf),
    "estimated_seconds": (0.0, math.inf),
    "dense_seconds": (0.0, math.inf),
}
_COMPARED_FINGERPRINT_KEYS = ("num_kv_heads", "head_dim", "causal", "kind")
_MAX_LISTED_NAMES = 10


def site_fingerprint(site: AttentionSite) -> dict[str, Any]:
    """``site.fingerprint()`` plus the ``q_len``/``k_len`` seen at capture (used for densities).

    Example:
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=8,
        ...                      q_len=128, k_len=128)
        >>> site_fingerprint(site)["q_len"]
        128
    """
    return {**site.fingerprint(), "q_len": site.q_len, "k_len": site.k_len}


@dataclasses.dataclass(frozen=True)
class SiteStrategy:
    """The patterns chosen for one attention site, one per query head.

    Attributes:
        name: the site's name (`AttentionSite.name`).
        heads: one `Pattern` per query head.
        head_metrics: per head, optional measured numbers (recall, error, cost...) as a JSON
            object; carried, not interpreted. ``None`` when nothing was measured.
        dense_steps: leading steps (e.g. diffusion timesteps) that run dense.

    Example:
        >>> from sparsify.patterns import dense, sliding_window
        >>> site = SiteStrategy("attn", [dense(), sliding_window(64), sliding_window(64)])
        >>> site.sparse_heads
        [1, 2]
    """

    name: str
    heads: list[Pattern]
    head_metrics: list[dict[str, Any]] | None = None
    dense_steps: int = 0

    def __post_init__(self) -> None:
        where = f"sites[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name:
            raise StrategyError(f"site name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.heads, (list, tuple)) or not self.heads:
            raise StrategyError(f"{where}.heads: must be a non-empty list of patterns")
        for index, pattern in enumerate(self.heads):
            if not isinstance(pattern, Pattern):
                raise StrategyError(
                    f"{where}.heads[{index}]: expected a Pattern, got {type(pattern).__name__}"
                )
        # A tuple: heads change through `Strategy.with_heads`.
        object.__setattr__(self, "heads", tuple(self.heads))
        num_heads = len(self.heads)

        if self.head_metrics is not None:
            if not isinstance(self.head_metrics, (list, tuple)):
                raise StrategyError(f"{where}.head_metrics: must be a list or null")
            if len(self.head_metrics) != num_heads:
                raise StrategyError(
                    f"{where}.head_metrics: has {len(self.head_metrics)} entries for "
                    f"{num_heads} heads"
                )
            for index, metrics in enumerate(self.head_metrics):
                if not isinstance(metrics, dict):
                    raise StrategyError(
                        f"{where}.head_metrics[{index}]: must be a JSON object, "
                        f"got {type(metrics).__name__}"
                    )
                _check_json_value(metrics, f"{where}.head_metrics[{index}]")
                for key, (low, high) in _HEAD_METRIC_RANGES.items():
                    if key in metrics:
                        _check_number(metrics[key], low, high, f"{where}.head_metrics[{index}].{key}")
            object.__setattr__(self, "head_metrics", [dict(m) for m in self.head_metrics])

        problem = int_range_problem(self.dense_steps, 0, MAX_STEPS, "MAX_STEPS")
        if problem is not None:
            raise StrategyError(f"{where}.dense_steps: {problem}")

    @property
    def num_heads(self) -> int:
        """Query heads of the site."""
        return len(self.heads)

    def is_dense(self, head: int) -> bool:
        """Whether ``head`` runs dense attention.

        Example:
            >>> from sparsify.patterns import dense, sliding_window
            >>> SiteStrategy("attn", [dense(), sliding_window(64)]).is_dense(1)
            False
        """
        return self.heads[head].is_dense

    @property
    def dense_heads(self) -> list[int]:
        """Indices of the heads that run dense."""
        return [head for head in range(self.num_heads) if self.is_dense(head)]

    @property
    def sparse_heads(self) -> list[int]:
        """Indices of the heads that run a sparse pattern."""
        return [head for head in range(self.num_heads) if not self.is_dense(head)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the site's name is its key in the document, so not repeated).

        Example:
            >>> SiteStrategy("attn", [dense()]).to_dict()["heads"]
            [{'pattern': 'dense'}]
        """
        return {
            "heads": [pattern.to_dict() for pattern in self.heads],
            "head_metrics": (
                None if self.head_metrics is None else [dict(m) for m in self.head_metrics]
            ),
            "dense_steps": self.dense_steps,
        }

    def __repr__(self) -> str:
        return (
            f"SiteStrategy({self.name!r}, {self.num_heads} heads: "
            f"{len(self.sparse_heads)} sparse, {len(self.dense_heads)} dense)"
        )


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Per-site, per-head sparsity patterns of one model: the search's output, the rewrite's input.

    Saved as plain, versioned JSON (``format_version``, ``block_size``, ``fingerprint``,
    ``sites``, ``metadata``); `load` validates everything and names the file and the JSON
    location of each problem. Patterns are parametric, so a strategy applies to any length.

    Attributes:
        block_size: block edge in tokens (a power of two >= 16).
        sites: `SiteStrategy` per site name, in the model's site order.
        fingerprint: per site, in the same order, `site_fingerprint` (the shapes the strategy was
            made for; ``q_len``/``k_len`` optional).
        metadata: free JSON (sparsify version, notes...).

    Example:
        >>> from sparsify.patterns import sliding_window
        >>> site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=2, head_dim=64,
        ...                      q_len=1024, k_len=1024, causal=True)
        >>> strategy = Strategy.uniform([site], sliding_window(128))
        >>> Strategy.from_dict(strategy.to_dict()) == strategy
        True
        >>> strategy.summary()["sparse_heads"]
        4
    """

    block_size: int
    sites: dict[str, SiteStrategy]
    fingerprint: list[dict[str, Any]]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_block_size(self.block_size, "block_size")
        if not isinstance(self.sites, Mapping) or not self.sites:
            raise StrategyError("sites: a strategy must cover at least one site")
        for name, site in self.sites.items():
            if not isinstance(site, SiteStrategy):
                raise StrategyError(
                    f"sites[{name!r}]: expected a SiteStrategy, got {type(site).__name__}"
                )
            if site.name != name:
                raise StrategyError(f"sites[{name!r}]: holds the strategy of site {site.name!r}")
        object.__setattr__(self, "sites", dict(self.sites))

        if not isinstance(self.fingerprint, (list, tuple)):
            raise StrategyError("fingerprint: must be a list with one object per site")
        for index, entry in enumerate(self.fingerprint):
            _check_fingerprint_entry(entry, f"fingerprint[{index}]")
        fingerprint_names = [entry["name"] for entry in self.fingerprint]
        if fingerprint_names != list(self.sites):
            raise StrategyError(
                f"fingerprint: names {_short_list(fingerprint_names)} do not match the sites "
                f"{_short_list(list(self.sites))} (same names, same order expected)"
            )
        for index, entry in enumerate(self.fingerprint):
            site = self.sites[entry["name"]]
            if entry["num_heads"] != site.num_heads:
                raise StrategyError(
                    f"sites[{site.name!r}].heads: has {site.num_heads} patterns but "
                    f"fingerprint[{index}] says the site has {entry['num_heads']} heads"
                )
            _check_recorded_grid(entry, self.block_size, f"fingerprint[{index}]")
        object.__setattr__(self, "fingerprint", [dict(entry) for entry in self.fingerprint])

        if not isinstance(self.metadata, dict):
            raise StrategyError(
                f"metadata: must be a JSON object, got {type(self.metadata).__name__}"
            )
        _check_json_value(self.metadata, "metadata")
        _check_known_metadata(self.metadata, list(self.sites))

    # --- constructors ---------------------------------------------------------------------------

    @classmethod
    def uniform(
        cls,
        sites: Sequence[AttentionSite],
        pattern: Pattern,
        block_size: int = 64,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Strategy:
        """The same ``pattern`` on every head of every site.

        Example:
            >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64,
            ...                      q_len=256, k_len=256)
            >>> from sparsify.patterns import sliding_window
            >>> Strategy.uniform([site], sliding_window(64)).sites["attn"].sparse_heads
            [0, 1]
        """
        if not isinstance(pattern, Pattern):
            raise StrategyError(f"uniform: expected a Pattern, got {type(pattern).__name__}")
        sites = list(sites)
        for index, site in enumerate(sites):
            if not isinstance(site, AttentionSite):
                raise StrategyError(
                    f"sites[{index}]: expected an AttentionSite, got {type(site).__name__}"
                )
        names = [site.name for site in sites]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise StrategyError(f"sites: duplicate site names {duplicates}")
        return cls(
            block_size=block_size,
            sites={
                site.name: SiteStrategy(site.name, [pattern] * site.num_heads) for site in sites
            },
            fingerprint=[site_fingerprint(site) for site in sites],
            metadata=dict(metadata or {}),
        )

    @classmethod
    def dense(
        cls,
        sites: Sequence[AttentionSite],
        block_size: int = 64,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Strategy:
        """Every head of every site dense (the compiled model equals the original).

        Example:
            >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64,
            ...                      q_len=256, k_len=256)
            >>> Strategy.dense([site]).sites["attn"].dense_heads
            [0, 1]
        """
        return cls.uniform(sites, dense(), block_size, metadata=metadata)

    # --- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document as plain values, keys in a fixed order (sites in model order)."""
        return {
            "format_version": FORMAT_VERSION,
            "block_size": self.block_size,
            "fingerprint": [dict(entry) for entry in self.fingerprint],
            "sites": {name: site.to_dict() for name, site in self.sites.items()},
            "metadata": json.loads(json.dumps(self.metadata)),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> Strategy:
        """Validate and rebuild a strategy; errors name ``source`` and the JSON location.

        Example:
            >>> Strategy.from_dict({"format_version": 3}, source="s.json")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            sparsify.errors.StrategyError: s.json: format_version 3 is not understood ...
        """

        def fail(message: str) -> StrategyError:
            return StrategyError(f"{source}: {message}")

        if not isinstance(data, dict):
            raise fail(f"a strategy must be a JSON object, got {_json_type(data)}")
        unknown = [key for key in data if key not in _TOP_LEVEL_KEYS]
        if unknown:
            raise fail(f"unknown key(s) {_quoted(unknown)}; expected: {', '.join(_TOP_LEVEL_KEYS)}")
        # format_version first: a newer document may differ in everything else.
        if "format_version" not in data:
            raise fail(f"missing key 'format_version'; expected: {', '.join(_TOP_LEVEL_KEYS)}")
        version = data["format_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise fail(f"format_version: must be an int, got {_json_type(version)}")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise fail(
                f"format_version {version} is not understood by this sparsify; understood "
                f"versions: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}"
            )
        required = ("block_size", "fingerprint", "sites")
        missing = [key for key in required if key not in data]
        if missing:
            raise fail(
                f"missing key {_quoted(missing)}; expected: {', '.join(_TOP_LEVEL_KEYS)}"
            )
        _expect_type(data["block_size"], int, "block_size", fail)
        _expect_type(data["fingerprint"], list, "fingerprint", fail)
        _expect_type(data["sites"], dict, "sites", fail)
        metadata = data.get("metadata", {})
        _expect_type(metadata, dict, "metadata", fail)

        sites: dict[str, SiteStrategy] = {}
        for name, site_data in data["sites"].items():
            sites[name] = _site_from_dict(name, site_data, fail, version)
        try:
            return cls(
                block_size=data["block_size"],
                sites=sites,
                fingerprint=data["fingerprint"],
                metadata=metadata,
            )
        except StrategyError as error:
            raise fail(str(error)) from error

    def with_heads(self, site_name: str, heads: Sequence[Pattern], **changes: Any) -> "Strategy":
        """A copy with new per-head patterns for one site.

        ``changes`` may set other `SiteStrategy` fields (``head_metrics``, ``dense_steps``).

        Example:
            >>> from sparsify.patterns import dense, sliding_window
            >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64,
            ...                      q_len=1024, k_len=1024)
            >>> mixed = Strategy.dense([site]).with_heads("attn", [dense(), sliding_window(128)])
            >>> mixed.sites["attn"].sparse_heads
            [1]
        """
        if site_name not in self.sites:
            known = ", ".join(self.sites)
            raise StrategyError(f"strategy has no site {site_name!r}; its sites: {known}")
        old = self.sites[site_name]
        if len(heads) != old.num_heads:
            raise StrategyError(f"sites[{site_name!r}]: {old.num_heads} heads, got {len(heads)} patterns")
        fields = {"head_metrics": old.head_metrics, "dense_steps": old.dense_steps, **changes}
        sites = dict(self.sites)
        sites[site_name] = SiteStrategy(site_name, list(heads), **fields)
        return dataclasses.replace(self, sites=sites)

    def shard_heads(self, rank: int, world_size: int) -> "Strategy":
        """The strategy of one rank's contiguous shard of heads (tensor or Ulysses sequence parallel).

        Rank ``rank`` of ``world_size`` holds query heads ``[rank * H / W, (rank + 1) * H / W)``
        of every site and the key/value heads they read: ``Hkv / W`` of them when the
        key/value heads split evenly, or one (replicated over ``W / Hkv`` ranks, as tensor
        parallel frameworks do when there are fewer key/value heads than ranks). Patterns
        and metrics are those of the shard's heads; the fingerprint describes the
        shard, so the result applies to a model whose attention modules hold those heads.
        Refuses (listing every site) when the heads or key/value heads do not split.

        Example:
            >>> from sparsify.patterns import dense, sliding_window
            >>> site = AttentionSite("attn", 0, num_heads=4, num_kv_heads=2, head_dim=64,
            ...                      q_len=1024, k_len=1024)
            >>> full = Strategy.dense([site]).with_heads("attn", [dense(), dense(), sliding_window(128),
            ...                                                   sliding_window(256)])
            >>> shard = full.shard_heads(rank=1, world_size=2)
            >>> [str(p) for p in shard.sites["attn"].heads], shard.fingerprint[0]["num_kv_heads"]
            (['sliding_window(128)', 'sliding_window(256)'], 1)
        """
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise StrategyError(f"shard_heads: {name} must be an int, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise StrategyError(f"shard_heads: need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                                f"world_size={world_size}")
        problems = []
        for entry in self.fingerprint:
            heads, kv_heads = entry["num_heads"], entry["num_kv_heads"]
            if heads % world_size:
                problems.append(f"site {entry['name']!r}: {heads} heads do not split into {world_size} equal shards")
            elif kv_heads % world_size and world_size % kv_heads:
                problems.append(f"site {entry['name']!r}: {kv_heads} key/value heads neither split into {world_size} "
                                f"equal shards nor replicate evenly over {world_size} ranks")
        if problems:
            raise StrategyError(f"cannot shard the heads over {world_size} ranks:\n"
                                + "\n".join(f"  - {problem}" for problem in problems))
        sites = {}
        fingerprint = []
        for entry in self.fingerprint:
            site = self.sites[entry["name"]]
            per_shard = entry["num_heads"] // world_size
            start, stop = rank * per_shard, (rank + 1) * per_shard
            sites[site.name] = SiteStrategy(
                site.name, list(site.heads[start:stop]),
                head_metrics=None if site.head_metrics is None else site.head_metrics[start:stop],
                dense_steps=site.dense_steps)
            fingerprint.append({**entry, "num_heads": per_shard,
                                "num_kv_heads": max(1, entry["num_kv_heads"] // world_size)})
        shards = [*self.metadata.get("head_shards", []), {"rank": rank, "world_size": world_size}]
        return dataclasses.replace(self, sites=sites, fingerprint=fingerprint,
                                   metadata={**self.metadata, "head_shards": shards})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the strategy as indented JSON (stable key order, so diffs stay small).

        The write is atomic (`sparsify.io`): if it fails midway (full disk, file-size limit),
        the file that was at ``path`` before is left intact. Under ``torch.distributed`` the
        caller decides which rank writes (``if sparsify.distributed.is_main_process(): ...``).

        Example:
            >>> strategy.save("strategy.json")                     # doctest: +SKIP
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        write_text_atomically(path, text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Strategy:
        """Read and validate a strategy file written by `save`; never executes anything.

        Example:
            >>> strategy = Strategy.load("strategy.json")          # doctest: +SKIP
        """
        source = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise StrategyError(f"{source}: cannot read strategy file: {error}") from error
        try:
            data = json.loads(
                text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicate_keys
            )
        except (json.JSONDecodeError, ValueError) as error:
            raise StrategyError(f"{source}: not valid JSON: {error}") from error
        except RecursionError:
            raise StrategyError(
                f"{source}: JSON nested too deeply to read (a strategy nests at most "
                f"{MAX_JSON_DEPTH} levels of free JSON; MAX_JSON_DEPTH in sparsify.limits)"
            ) from None
        return cls.from_dict(data, source=source)

    # --- checks against a model -----------------------------------------------------------------

    def validate_for(self, sites: Sequence[AttentionSite], *, source: str = "strategy") -> None:
        """Raise `StrategyError` listing every mismatch between this strategy and the model's sites.

        Checks site names both ways (with close-name suggestions), head counts, and the
        fingerprint's key/value heads, head size, causality and self/cross kind.

        Example:
            >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64,
            ...                      q_len=256, k_len=256)
            >>> Strategy.dense([site]).validate_for([site])
        """
        model = {site.name: site for site in sites}
        model_names = list(model)
        strategy_names = list(self.sites)
        only_strategy = [name for name in strategy_names if name not in model]
        only_model = [name for name in model_names if name not in self.sites]
        problems: list[str] = []
        if len(only_strategy) == len(strategy_names):
            problems.append(
                f"the strategy covers none of the model's {len(model_names)} sites "
                f"(strategy sites: {_short_list(strategy_names)}; model sites: "
                f"{_short_list(model_names)})"
            )
        elif only_strategy or only_model:
            if only_strategy:
                problems.append(
                    f"strategy sites not in the model: {_short_list(only_strategy)}"
                    + _suggestions(only_strategy, only_model)
                )
            if only_model:
                problems.append(f"model sites not in the strategy: {_short_list(only_model)}")
        fingerprints = {entry["name"]: entry for entry in self.fingerprint}
        for name in strategy_names:
            site = model.get(name)
            if site is None:
                continue
            if self.sites[name].num_heads != site.num_heads:
                problems.append(
                    f"site {name!r}: strategy has {self.sites[name].num_heads} heads, the model "
                    f"has {site.num_heads}"
                )
            expected = site.fingerprint()
            recorded = fingerprints[name]
            for key in _COMPARED_FINGERPRINT_KEYS:
                if recorded.get(key) != expected.get(key):
                    problems.append(
                        f"site {name!r}: {key} is {expected.get(key)!r} in the model but "
                        f"{recorded.get(key)!r} in the strategy"
                    )
        if problems:
            listed = "\n".join(f"  - {problem}" for problem in problems)
            raise StrategyError(
                f"{source} does not match the model ({len(problems)} problem"
                f"{'s' if len(problems) > 1 else ''}):\n{listed}"
            )

    # --- reporting ------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Counts, the mean density at the recorded lengths (``None`` when not recorded), and the search's results.

        ``estimated_speedup``, ``end_to_end_error``, ``target_reached`` and ``output_error`` (the
        model-level budget: metric, budget, promised and measured error on held-out batches) are
        ``None`` when the strategy does not record them; ``sites_over_budget`` lists the sites a global target
        pushed past ``max_error`` (only with ``target_overrides_max_error``).

        ``mean_density`` is all heads' kept blocks over the blocks dense attention computes
        (lower triangle at causal sites), at each site's recorded ``q_len``/``k_len``; an
        input-adaptive head counts with the mean work its masks kept on the held-out inputs
        (``adaptive_density`` gives their mean and spread over those inputs).

        Example:
            >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64,
            ...                      q_len=256, k_len=256)
            >>> Strategy.dense([site]).summary()["mean_density"]
            1.0
        """
        heads = sum(site.num_heads for site in self.sites.values())
        dense_heads = sum(len(site.dense_heads) for site in self.sites.values())
        return {
            "num_sites": len(self.sites),
            "num_heads": heads,
            "dense_heads": dense_heads,
            "sparse_heads": heads - dense_heads,
            "block_size": self.block_size,
            "mean_density": self._mean_density(),
            "estimated_speedup": self.metadata.get("estimated_attention_speedup"),
            "end_to_end_error": self.metadata.get("end_to_end_error"),
            # With a global target: whether it was reached, and the sites it pushed past max_error.
            "target_reached": (self.metadata.get("target") or {}).get("reached"),
            "sites_over_budget": list((self.metadata.get("target") or {}).get("sites_over_budget", [])),
            "output_error": self._output_error(),
            **self._adaptive_summary(),
        }

    def _output_error(self) -> dict[str, Any] | None:
        """The model-level budget's metric, budget, and promised vs measured error on held-out data (or ``None``)."""
        record = self.metadata.get("output_budget")
        if not isinstance(record, dict):
            return None
        return {key: record.get(key) for key in ("metric", "budget", "promised", "measured")}

    def _adaptive_summary(self) -> dict[str, Any]:
        """How many heads are input-adaptive, and the mean / spread (over held-out inputs) of their realised density."""
        works, spreads = [], []
        for site in self.sites.values():
            for head, pattern in enumerate(site.heads):
                if getattr(pattern, "is_adaptive", False):
                    metric = site.head_metrics[head] if site.head_metrics else {}
                    if "work" in metric:
                        works.append(float(metric["work"]))
                        spreads.append(float(metric.get("work_spread", 0.0)))
        if not works:
            return {"adaptive_heads": 0, "adaptive_density": None}
        return {"adaptive_heads": len(works), "adaptive_density": {
            "mean": round(sum(works) / len(works), 4), "spread": round(sum(spreads) / len(spreads), 4),
            "min": round(min(works), 4), "max": round(max(works), 4)}}

    def _mean_density(self) -> float | None:
        kept = 0
        computed = 0
        for entry in self.fingerprint:
            if "q_len" not in entry or "k_len" not in entry:
                return None
            q_len, k_len, causal = entry["q_len"], entry["k_len"], entry["causal"]
            dense_blocks = int(block_geometry(q_len, k_len, self.block_size, causal)[0].sum())
            site = self.sites[entry["name"]]
            work_per_block = entry.get("head_dim", 1)  # each head's blocks weighted by its work
            computed_blocks: dict[Pattern, int] = {}  # heads share patterns: each distinct one is counted once
            for head, pattern in enumerate(site.heads):
                if getattr(pattern, "is_adaptive", False):
                    # Estimated per input: what its masks kept on the held-out inputs (every block if not recorded).
                    metric = site.head_metrics[head] if site.head_metrics else {}
                    kept += float(metric.get("work", 1.0)) * dense_blocks * work_per_block
                elif not getattr(pattern, "is_skip", False):
                    if pattern not in computed_blocks:  # the blocks its runtime mask keeps (what the kernels run)
                        computed_blocks[pattern] = int(pattern.runtime_mask(
                            q_len, k_len, block_size=self.block_size, causal=causal).kept_counts().sum())
                    kept += computed_blocks[pattern] * work_per_block
                computed += dense_blocks * work_per_block
        return kept / computed

    def __repr__(self) -> str:
        summary = self.summary()
        return (
            f"Strategy({summary['num_sites']} sites, {summary['num_heads']} heads: "
            f"{summary['sparse_heads']} sparse, {summary['dense_heads']} dense, "
            f"block_size={self.block_size})"
        )


# --- helpers ------------------------------------------------------------------------------------


def _site_from_dict(name: str, data: Any, fail: Any, version: int = FORMAT_VERSION) -> SiteStrategy:
    where = f"sites[{name!r}]"
    if not name:
        raise fail("sites: site names must be non-empty strings")
    if not isinstance(data, dict):
        raise fail(f"{where}: must be a JSON object, got {_json_type(data)}")
    known = _SITE_KEYS + (_VERSION_1_SITE_KEYS if version == 1 else ())
    unknown = [key for key in data if key not in known]
    if unknown:
        raise fail(f"{where}: unknown key(s) {_quoted(unknown)}; expected: {', '.join(_SITE_KEYS)}")
    if "heads" not in data:
        raise fail(f"{where}: missing key 'heads'; expected: {', '.join(_SITE_KEYS)}")
    _expect_type(data["heads"], list, f"{where}.heads", fail)
    heads = []
    for index, head in enumerate(data["heads"]):
        try:
            heads.append(pattern_from_dict(head))
        except PatternError as error:
            raise fail(f"{where}.heads[{index}]: {error}") from error
    head_metrics = data.get("head_metrics")
    if head_metrics is not None:
        _expect_type(head_metrics, list, f"{where}.head_metrics", fail)
    if "fusion_groups" in data:  # version 1 only (`_VERSION_1_SITE_KEYS`): checked for shape, then dropped
        _expect_type(data["fusion_groups"], list, f"{where}.fusion_groups", fail)
    dense_steps = data.get("dense_steps", 0)
    _expect_type(dense_steps, int, f"{where}.dense_steps", fail)
    try:
        return SiteStrategy(
            name=name,
            heads=heads,
            head_metrics=head_metrics,
            dense_steps=dense_steps,
        )
    except StrategyError as error:
        raise fail(str(error)) from error


def _check_block_size(value: Any, location: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE
        or value & (value - 1)
    ):
        raise StrategyError(
            f"{location}: must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] (16, 32, 64, 128, ...; "
            f"MIN_BLOCK_SIZE/MAX_BLOCK_SIZE in sparsify.limits), got {shown(value)}"
        )


def _check_recorded_grid(entry: dict[str, Any], block_size: int, location: str) -> None:
    """The recorded lengths at ``block_size`` must make a grid reports can draw and count."""
    if "q_len" not in entry or "k_len" not in entry:
        return
    q_blocks, k_blocks = blocks_for(entry["q_len"], block_size), blocks_for(entry["k_len"], block_size)
    if q_blocks * k_blocks > MAX_GRID_BLOCKS:
        raise StrategyError(
            f"{location}: q_len x k_len = {entry['q_len']} x {entry['k_len']} tokens is {q_blocks} x {k_blocks} = "
            f"{q_blocks * k_blocks} blocks of {block_size}; at most {MAX_GRID_BLOCKS} (MAX_GRID_BLOCKS in "
            f"sparsify.limits): record shorter lengths or use a larger block_size"
        )


def _check_number(value: Any, low: float, high: float, location: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bound = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g} and finite"
        raise StrategyError(f"{location}: must be a number {bound}, got {shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise StrategyError(f"{location}: must be finite, got {value!r}")


def _check_known_metadata(metadata: dict[str, Any], site_names: Sequence[str]) -> None:
    """The metadata entries sparsify itself reads (reports, the step counter) have bounds too."""
    if metadata.get("end_to_end_error") is not None:
        _check_number(metadata["end_to_end_error"], 0.0, math.inf, "metadata.end_to_end_error")
    if metadata.get("estimated_attention_speedup") is not None:
        _check_number(metadata["estimated_attention_speedup"], 0.0, math.inf, "metadata.estimated_attention_speedup")
        if metadata["estimated_attention_speedup"] == 0:
            raise StrategyError("metadata.estimated_attention_speedup: must be > 0, got 0")
    site_errors = metadata.get("site_errors")
    if site_errors is not None:
        if not isinstance(site_errors, dict):
            raise StrategyError(f"metadata.site_errors: must be a JSON object of site name -> error, "
                                f"got {_json_type(site_errors)}")
        for name, value in site_errors.items():
            _check_number(value, 0.0, math.inf, f"metadata.site_errors[{name!r}]")
    steps = metadata.get("steps_per_generation")
    if steps is not None:
        problem = int_range_problem(steps, 1, MAX_STEPS, "MAX_STEPS")
        if problem is not None:
            raise StrategyError(f"metadata.steps_per_generation: {problem}")
    target = metadata.get("target")
    if target is not None:
        if not isinstance(target, dict):
            raise StrategyError(f"metadata.target: must be a JSON object, got {_json_type(target)}")
        if not isinstance(target.get("reached", True), bool):
            raise StrategyError(f"metadata.target.reached: must be true or false, got {_json_type(target['reached'])}")
        over = target.get("sites_over_budget", [])
        if not isinstance(over, list) or not all(isinstance(name, str) for name in over):
            raise StrategyError("metadata.target.sites_over_budget: must be a list of site names")
        for key in ("value", "achieved"):
            if target.get(key) is not None:
                _check_number(target[key], 0.0, math.inf, f"metadata.target.{key}")


def _check_fingerprint_entry(entry: Any, location: str) -> None:
    if not isinstance(entry, dict):
        raise StrategyError(f"{location}: must be a JSON object, got {_json_type(entry)}")
    missing = [key for key in _FINGERPRINT_TYPES if key not in entry]
    if missing:
        raise StrategyError(
            f"{location}: missing key {_quoted(missing)}; expected: {', '.join(_FINGERPRINT_TYPES)}"
        )
    for key, expected in {**_FINGERPRINT_TYPES, **_OPTIONAL_FINGERPRINT_TYPES}.items():
        if key not in entry:
            continue
        value = entry[key]
        if expected is int:
            high, bound = _FINGERPRINT_BOUNDS[key]
            problem = int_range_problem(value, 1, high, bound)
            if problem is not None:
                raise StrategyError(f"{location}.{key}: {problem}")
        if not isinstance(value, expected):
            raise StrategyError(
                f"{location}.{key}: must be {_json_type_name(expected)}, got {_json_type(value)}"
            )
    if entry["kind"] not in ("self", "cross"):
        raise StrategyError(f"{location}.kind: must be 'self' or 'cross', got {entry['kind']!r}")
    if entry["num_kv_heads"] > entry["num_heads"] or entry["num_heads"] % entry["num_kv_heads"]:
        raise StrategyError(
            f"{location}: num_heads={entry['num_heads']} is not a multiple of num_kv_heads={entry['num_kv_heads']}"
        )
    _check_json_value(entry, location)


def _check_json_value(value: Any, location: str, depth: int = 0) -> None:
    """Raise unless ``value`` is made of JSON objects (string keys), arrays and finite scalars,
    nested at most ``MAX_JSON_DEPTH`` deep."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StrategyError(f"{location}: {value!r} is not a JSON number")
        return
    if isinstance(value, (list, tuple, dict)) and depth >= MAX_JSON_DEPTH:
        raise StrategyError(
            f"{location}: nested more than {MAX_JSON_DEPTH} levels deep (MAX_JSON_DEPTH in sparsify.limits)"
        )
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_value(item, f"{location}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StrategyError(f"{location}: key {key!r} is not a string")
            _check_json_value(item, f"{location}[{key!r}]", depth + 1)
        return
    raise StrategyError(f"{location}: {type(value).__name__} is not a JSON value")


def _expect_type(value: Any, expected: type, location: str, fail: Any) -> None:
    if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
        raise fail(f"{location}: must be {_json_type_name(expected)}, got {_json_type(value)}")


def _json_type_name(kind: type) -> str:
    return {
        int: "an integer",
        str: "a string",
        bool: "true or false",
        list: "a JSON array",
        dict: "a JSON object",
    }.get(kind, kind.__name__)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    if isinstance(value, (int, float)):
        return f"{value!r} (number)"
    if isinstance(value, str):
        return f"{value!r} (string)"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _short_list(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_MAX_LISTED_NAMES])
    more = len(names) - _MAX_LISTED_NAMES
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _suggestions(unknown: Sequence[str], candidates: Sequence[str]) -> str:
    """``" (did you mean: 'a' -> 'b'?)"``, pairing each unknown name with at most one close
    candidate and each candidate with at most one name, closest pairs first."""
    scored = []
    for name in unknown:
        for candidate in candidates:
            ratio = difflib.SequenceMatcher(None, name, candidate).ratio()
            if ratio >= 0.6:
                scored.append((-ratio, name, candidate))
    paired: dict[str, str] = {}
    for _, name, candidate in sorted(scored):
        if name not in paired and candidate not in paired.values():
            paired[name] = candidate
    hints = [f"{name!r} -> {paired[name]!r}" for name in unknown if name in paired]
    shown = ", ".join(hints[:_MAX_LISTED_NAMES])
    return f" (did you mean: {shown}?)" if hints else ""
