"""Sparsity patterns: small named, parametrised objects that give a block mask for any length."""

from __future__ import annotations

import abc
import dataclasses
import difflib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from sparsify.errors import PatternError
from sparsify.limits import (
    MAX_EXPONENT,
    MAX_GRID_BLOCKS,
    MAX_LINES,
    MAX_PARTS,
    MAX_PATTERN_DEPTH,
    MAX_TOKENS,
    int_range_problem,
    shown,
)

__all__ = [
    "BlockGrid",
    "TracedBlockGrid",
    "Pattern",
    "DistancePattern",
    "Dense",
    "Skip",
    "SlidingWindow",
    "AttentionSinks",
    "LastTokens",
    "AShape",
    "MultiDiagonal",
    "VerticalStripes",
    "VerticalSlash",
    "Strided",
    "Radial",
    "PowerOfTwo",
    "BlockTopK",
    "Union",
    "Intersection",
    "dense",
    "skip",
    "sliding_window",
    "attention_sinks",
    "last_tokens",
    "a_shape",
    "multi_diagonal",
    "vertical_stripes",
    "vertical_slash",
    "strided",
    "radial",
    "power_of_two",
    "block_top_k",
    "causal_block_mask",
    "register_pattern",
    "known_patterns",
    "AdaptivePattern",
    "EstimatedVerticalSlash",
    "PooledCoverage",
    "estimated_vertical_slash",
    "pooled_coverage",
    "pattern_from_dict",
]

_REGISTRY: dict[str, type[Pattern]] = {}

_PatternClass = TypeVar("_PatternClass", bound="type[Pattern]")


def register_pattern(name: str) -> Callable[[_PatternClass], _PatternClass]:
    """Class decorator that files a `Pattern` subclass under ``name`` (its JSON ``"pattern"`` key).

    Registration happens once, at import time; names must be unique.

    Example:
        >>> @register_pattern("my_diagonal")                      # doctest: +SKIP
        ... @dataclasses.dataclass(frozen=True)
        ... class MyDiagonal(Pattern):
        ...     def _block_mask(self, grid):
        ...         return torch.eye(grid.q_blocks, grid.k_blocks, dtype=torch.bool)
    """

    def decorate(cls: _PatternClass) -> _PatternClass:
        if name in _REGISTRY:
            raise PatternError(
                f"pattern name {name!r} is already registered by {_REGISTRY[name].__qualname__}"
            )
        if not (isinstance(cls, type) and issubclass(cls, Pattern)):
            raise PatternError(f"register_pattern({name!r}) decorates Pattern subclasses only")
        cls.pattern_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def known_patterns() -> list[str]:
    """Names of every registered pattern, sorted.

    Example:
        >>> "sliding_window" in known_patterns()
        True
    """
    return sorted(_REGISTRY)


def causal_block_mask(q_blocks: int, k_blocks: int) -> torch.Tensor:
    """Lower block triangle ``bool [q_blocks, k_blocks]``: key block ``j <= i`` for query ``i``.

    With equal block sizes for queries and keys and top-left alignment, these are exactly the
    blocks that hold at least one (query, key) pair with ``key <= query``.

    Example:
        >>> causal_block_mask(3, 2).int().tolist()
        [[1, 0], [1, 1], [1, 1]]
    """
    return torch.ones(q_blocks, k_blocks, dtype=torch.bool).tril()


class _BlockTokenBounds:
    """Token coordinates of a block grid's blocks, for grids with ``q_len``/``k_len``/``block_size`` and block counts."""

    @property
    def query_first(self) -> torch.Tensor:
        """First token of each query block, ``int64 [q_blocks, 1]``."""
        return (torch.arange(self.q_blocks) * self.block_size).unsqueeze(1)

    @property
    def query_last(self) -> torch.Tensor:
        """Last token of each query block, ``int64 [q_blocks, 1]``."""
        return (self.query_first + self.block_size - 1).clamp(max=self.q_len - 1)

    @property
    def key_first(self) -> torch.Tensor:
        """First token of each key block, ``int64 [1, k_blocks]``."""
        return (torch.arange(self.k_blocks) * self.block_size).unsqueeze(0)

    @property
    def key_last(self) -> torch.Tensor:
        """Last token of each key block, ``int64 [1, k_blocks]``."""
        return (self.key_first + self.block_size - 1).clamp(max=self.k_len - 1)


@dataclasses.dataclass(frozen=True)
class BlockGrid(_BlockTokenBounds):
    """The block layout of one attention: how many blocks and which tokens each block covers.

    Query block ``i`` covers tokens ``[i * block_size, min((i + 1) * block_size, q_len))`` and
    key block ``j`` likewise up to ``k_len``; query and key token ``t`` are aligned top-left (as
    ``F.scaled_dot_product_attention(is_causal=True)`` does when ``q_len != k_len``). Without
    explicit lengths the last blocks are taken to be full.

    Example:
        >>> grid = BlockGrid(2, 3, block_size=64, q_len=100, k_len=192)
        >>> grid.query_last.flatten().tolist()
        [63, 99]
    """

    q_blocks: int
    k_blocks: int
    block_size: int = 64
    q_len: int | None = None
    k_len: int | None = None
    causal: bool = False

    def __post_init__(self) -> None:
        for field in ("q_blocks", "k_blocks", "block_size"):
            _check_positive_int("block grid", field, getattr(self, field))
        if not isinstance(self.causal, bool):
            raise PatternError(f"block grid: causal must be a bool, got {self.causal!r}")
        for length_field, blocks_field in (("q_len", "q_blocks"), ("k_len", "k_blocks")):
            length = getattr(self, length_field)
            blocks = getattr(self, blocks_field)
            if length is None:
                object.__setattr__(self, length_field, blocks * self.block_size)
                continue
            _check_positive_int("block grid", length_field, length)
            if -(-length // self.block_size) != blocks:
                raise PatternError(
                    f"block grid: {length_field}={length} needs {-(-length // self.block_size)} "
                    f"blocks of {self.block_size} tokens, not {blocks_field}={blocks}"
                )


#: Default `TracedBlockGrid.max_len`: lengths an any-length export serves unless told otherwise.
DEFAULT_MAX_TRACED_LEN = 1 << 20


@dataclasses.dataclass(frozen=True)
class TracedBlockGrid(_BlockTokenBounds):
    """A `BlockGrid` whose lengths are known only when the graph runs: what `Pattern.traced_block_mask` reads.

    ``q_len`` and ``k_len`` are ints or the symbolic sizes of a traced graph (``torch.SymInt``
    under ``torch.export``, so an exported ONNX graph computes everything below from the input
    shapes). The coordinates are the int64 tensors of `BlockGrid`, built from ops that export to
    ONNX ``Range``, ``Clip`` and comparisons; block counts are ``(n + b - 1) // b`` because the
    exporter lowers floor division of sizes to ONNX's truncating ``Div``, which is exact for
    non-negative operands only. ``max_len`` is the declared maximum of both lengths, for the
    lowerings whose loops run over distance scales (`radial`, `power_of_two`).

    Example:
        >>> grid = TracedBlockGrid(100, 192, block_size=64, max_len=4096)
        >>> grid.q_blocks, grid.query_last.flatten().tolist(), int(grid.key_length())
        (2, [63, 99], 192)
    """

    q_len: Any
    k_len: Any
    block_size: int = 64
    causal: bool = False
    max_len: int = DEFAULT_MAX_TRACED_LEN

    def __post_init__(self) -> None:
        _check_positive_int("traced block grid", "block_size", self.block_size)
        _check_positive_int("traced block grid", "max_len", self.max_len)
        if not isinstance(self.causal, bool):
            raise PatternError(f"traced block grid: causal must be a bool, got {self.causal!r}")
        for field in ("q_len", "k_len"):
            length = getattr(self, field)
            if isinstance(length, torch.SymInt):
                continue
            _check_positive_int("traced block grid", field, length)
            if length > self.max_len:
                raise PatternError(f"traced block grid: {field}={length} exceeds max_len={self.max_len}")

    @property
    def q_blocks(self) -> Any:
        """Query blocks (an int, or a symbolic size while tracing)."""
        return (self.q_len + self.block_size - 1) // self.block_size

    @property
    def k_blocks(self) -> Any:
        """Key blocks (an int, or a symbolic size while tracing)."""
        return (self.k_len + self.block_size - 1) // self.block_size

    def key_length(self) -> torch.Tensor:
        """``k_len`` as a 0-dim int64 tensor (for arithmetic the exporter should keep in the graph)."""
        return torch.full((), self.k_len, dtype=torch.int64)


@dataclasses.dataclass(frozen=True)
class Pattern(abc.ABC):
    """Base of every sparsity pattern: a frozen, JSON round-trippable recipe for a block mask.

    Subclasses are frozen dataclasses whose fields are the pattern's parameters (plain JSON
    values; lists are kept as tuples, so patterns stay hashable), are registered with
    `register_pattern`, validate themselves in ``__post_init__`` and implement only
    `_block_mask`; the base class adds the causal triangle and guarantees that every query block
    keeps at least one key block. `DistancePattern` is the base of patterns that depend on
    ``i - j`` only.

    Example:
        >>> pattern = sliding_window(64) | attention_sinks(4)
        >>> pattern.block_mask(4, 4, block_size=64, causal=True).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
        >>> pattern_from_dict(pattern.to_dict()) == pattern
        True
    """

    pattern_name: ClassVar[str] = ""
    # How many leading parameters `str` shows without their names; later ones show as
    # ``name=value`` and are left out while they equal their default.
    _positional: ClassVar[int] = 1

    @property
    def is_skip(self) -> bool:
        """True for `skip`: the head's output is dropped (the rewrite writes zeros for it)."""
        return False

    @property
    def is_adaptive(self) -> bool:
        """True when the mask is estimated per input (`sparsify.adaptive_patterns`), or a part of it is."""
        return False

    @abc.abstractmethod
    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        """Kept blocks ``bool [q_blocks, k_blocks]`` before the causal triangle and row fallback."""

    def block_mask(
        self,
        q_blocks: int,
        k_blocks: int,
        *,
        block_size: int = 64,
        causal: bool = False,
        q_len: int | None = None,
        k_len: int | None = None,
    ) -> torch.Tensor:
        """Kept blocks ``bool [q_blocks, k_blocks]`` on CPU; every row keeps at least one block.

        A block is kept when the pattern keeps any (query, key) token pair inside it. ``causal``
        drops the blocks above the diagonal (key block ``j > i``). A query row left empty keeps
        key block ``min(i, k_blocks - 1)``. ``q_len``/``k_len`` give the true token counts when
        the last block is partial (default: full blocks).

        Example:
            >>> sliding_window(64).block_mask(3, 3, block_size=64).int().tolist()
            [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
        """
        grid = BlockGrid(q_blocks, k_blocks, block_size, q_len, k_len, causal)
        mask = self._block_mask(grid)
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or tuple(mask.shape) != (q_blocks, k_blocks)
        ):
            got = (
                f"{mask.dtype} {tuple(mask.shape)}"
                if isinstance(mask, torch.Tensor)
                else type(mask).__name__
            )
            raise PatternError(
                f"pattern {self}: _block_mask must return bool [{q_blocks}, {k_blocks}], got {got}"
            )
        # A fresh tensor either way: the fallback below writes into it.
        mask = mask.cpu() & causal_block_mask(q_blocks, k_blocks) if causal else mask.cpu().clone()
        empty_rows = (~mask.any(dim=1)).nonzero().flatten()
        if empty_rows.numel():
            mask[empty_rows, empty_rows.clamp(max=k_blocks - 1)] = True
        return mask

    def density(
        self,
        q_blocks: int,
        k_blocks: int,
        *,
        block_size: int = 64,
        causal: bool = False,
        q_len: int | None = None,
        k_len: int | None = None,
    ) -> float:
        """Kept blocks over the blocks dense attention computes (the lower triangle at causal).

        `skip` computes nothing and has density 0.0 (its block mask is only a placeholder).

        Example:
            >>> dense().density(4, 4, causal=True)
            1.0
            >>> attention_sinks(64).density(4, 4)
            0.25
        """
        kept = self.block_mask(
            q_blocks, k_blocks, block_size=block_size, causal=causal, q_len=q_len, k_len=k_len
        )
        if self.is_skip:
            return 0.0
        total = int(causal_block_mask(q_blocks, k_blocks).sum()) if causal else q_blocks * k_blocks
        return int(kept.sum()) / total

    # --- lowering: the block mask as tensor ops of a length known only when the graph runs ---------

    def traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        """`block_mask` for a `TracedBlockGrid`: kept blocks ``bool [q_blocks, k_blocks]`` as tensor ops of the lengths.

        What an any-length ONNX export puts in the graph (``sparsify.export_onnx``): the same
        blocks as `block_mask` at every length — causal triangle and row fallback included —
        computed from the run-time sequence length. Families declare `_traced_block_mask`;
        patterns that cannot (see `fixed_length_reason`) raise `PatternError`.

        Example:
            >>> grid = TracedBlockGrid(192, 192, block_size=64, causal=True)
            >>> torch.equal(sliding_window(64).traced_block_mask(grid),
            ...             sliding_window(64).block_mask(3, 3, block_size=64, causal=True))
            True
        """
        reason = self.fixed_length_reason()
        if reason is not None:
            raise PatternError(f"pattern {self} has no any-length lowering: {reason}")
        mask = self._traced_block_mask(grid)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise PatternError(f"pattern {self}: _traced_block_mask must return bool [q_blocks, k_blocks], got {got}")
        query = torch.arange(grid.q_blocks).unsqueeze(1)
        key = torch.arange(grid.k_blocks).unsqueeze(0)
        if grid.causal:
            mask = mask & (key <= query)
        # As `block_mask`: a row left empty keeps key block min(i, k_blocks - 1).
        empty = ~mask.any(dim=1, keepdim=True)
        return mask | (empty & (key == query.clamp(max=grid.k_blocks - 1)))

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        """Kept blocks before the causal triangle and row fallback, as tensor ops of ``grid``'s coordinates.

        The contract of `_block_mask`, for lengths that may be symbolic: no Python branch or loop
        on the lengths, no ``int()``/``.item()``/``.tolist()`` of a tensor. Families whose
        `_block_mask` is such an expression already return it; loops over distance scales run
        to ``grid.max_len``. The base class has none (`fixed_length_reason` says so).
        """
        raise PatternError(f"pattern {self}: {self.fixed_length_reason()}")

    def fixed_length_reason(self) -> str | None:
        """Why an exported graph must fix this pattern's sequence length; ``None`` when it serves any length.

        ``None`` exactly when the family declares `_traced_block_mask`.

        Example:
            >>> sliding_window(512).fixed_length_reason() is None
            True
        """
        if type(self)._traced_block_mask is Pattern._traced_block_mask:
            return (f"{type(self).__qualname__} declares no _traced_block_mask (its kept blocks as tensor ops of "
                    f"the run-time length)")
        return None

    def traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        """At most how many key blocks one query block keeps at ``grid``'s lengths (an int or symbolic size).

        The slot count of an any-length export's block tables. It must be known without the
        data (a data-dependent count makes every later shape data-dependent, which the exporter
        cannot cut into chunks), so families bound it from their parameters and the grid's
        (possibly symbolic) lengths in `_traced_row_bound`; the result is at least 1 and at most
        ``k_blocks``. A family that declares none gets ``k_blocks``: correct, but every row then
        computes every key block.

        Example:
            >>> grid = TracedBlockGrid(4096, 4096, block_size=64)
            >>> (sliding_window(160) | attention_sinks(64)).traced_row_bound(grid)
            8
        """
        return torch.sym_min(torch.sym_max(self._traced_row_bound(grid), 1), grid.k_blocks)

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        """An upper bound on the key blocks one query block keeps (uncapped); the base has ``k_blocks``."""
        return grid.k_blocks

    # --- JSON -----------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        """Parameters as plain JSON values (tuples become lists), in field order."""
        return {
            field.name: _json_value(getattr(self, field.name)) for field in dataclasses.fields(self)
        }

    @classmethod
    def _from_params(cls, params: Mapping[str, Any], location: str) -> Pattern:
        """Build from parameters already checked for unknown and missing names."""
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """``{"pattern": name, **params}`` with plain JSON values; `pattern_from_dict` inverts it.

        Example:
            >>> sliding_window(512).to_dict()
            {'pattern': 'sliding_window', 'window': 512}
        """
        return {"pattern": self.pattern_name, **self._params()}

    # --- composition and display ----------------------------------------------------------------

    def __or__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        return Union(_flatten(Union, (self, other)))

    def __and__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        return Intersection(_flatten(Intersection, (self, other)))

    def __str__(self) -> str:
        fields = dataclasses.fields(self)
        shown = []
        for index, (field, value) in enumerate(zip(fields, self._params().values())):
            if index < self._positional:
                shown.append(repr(value))
            elif field.default is dataclasses.MISSING or _json_value(field.default) != value:
                shown.append(f"{field.name}={value!r}")
        return f"{self.pattern_name}({', '.join(shown)})"

    def __repr__(self) -> str:
        return str(self)


def _flatten(kind: type[Pattern], parts: tuple[Pattern, ...]) -> tuple[Pattern, ...]:
    """Splice the parts of nested unions (or intersections) into one flat tuple."""
    flat: list[Pattern] = []
    for part in parts:
        flat.extend(part.parts if type(part) is kind else (part,))  # type: ignore[attr-defined]
    return tuple(flat)


def _json_value(value: Any) -> Any:
    """Tuples (how patterns store lists, to stay hashable) as JSON lists, recursively."""
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(owner: str, field: str, value: Any) -> None:
    """A run-time size (block counts, lengths): any positive int."""
    if not _is_int(value) or value < 1:
        raise PatternError(f"{owner}: {field} must be a positive int, got {shown(value)}")


def _check_tokens(owner: str, field: str, value: Any, low: int = 1) -> None:
    """A pattern parameter counted in tokens: an int in ``[low, MAX_TOKENS]``."""
    _check_bounded(owner, field, value, low, MAX_TOKENS, "MAX_TOKENS")


def _check_bounded(owner: str, field: str, value: Any, low: int, high: int, bound: str) -> None:
    problem = int_range_problem(value, low, high, bound)
    if problem is not None:
        raise PatternError(f"{owner}: {field} {problem}")


def _check_count(owner: str, field: str, values: Any, high: int, bound: str) -> None:
    if isinstance(values, (list, tuple)) and len(values) > high:
        raise PatternError(
            f"{owner}: {field} holds {len(values)} entries; at most {high} ({bound} in sparsify.limits)"
        )


def _int_tuple(owner: str, field: str, values: Any, low: int = -MAX_TOKENS) -> tuple[int, ...]:
    """``values`` (a list or tuple of ints in ``[low, MAX_TOKENS]``) sorted and deduplicated."""
    if not isinstance(values, (list, tuple)) or not all(_is_int(value) for value in values):
        raise PatternError(f"{owner}: {field} must be a list of ints, got {shown(values)}")
    for value in values:
        _check_bounded(owner, f"{field} entry", value, low, MAX_TOKENS, "MAX_TOKENS")
    return tuple(sorted(set(values)))


def _relative_positions(owner: str, field: str, values: Any) -> tuple[float, ...]:
    """Relative key positions in ``[0, 1)`` as sorted, deduplicated floats."""
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(value, (int, float)) and not isinstance(value, bool) for value in values
    ):
        raise PatternError(
            f"{owner}: {field} must be a list of relative positions in [0, 1), got {shown(values)}"
        )
    _check_count(owner, field, values, MAX_LINES, "MAX_LINES")
    for value in values:
        if not 0.0 <= value < 1.0:
            raise PatternError(
                f"{owner}: {field} must lie in [0, 1) (fractions of the key length), "
                f"got {value!r}"
            )
    return tuple(sorted({float(value) for value in values}))


def _floor_div(numerator: torch.Tensor, denominator: int) -> torch.Tensor:
    return torch.div(numerator, denominator, rounding_mode="floor")


def _distance_bounds(grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block pair, the range ``[lo, hi]`` of distances ``d = q - k`` it holds, ``[q, k]``.

    Over a block pair the distances fill every integer of ``[query_first - key_last,
    query_last - key_first]``; at causal sites only ``d >= 0`` counts, so ``lo`` is raised to 0
    (the pair holds no causal token pair where then ``lo > hi``).
    """
    lo = (grid.query_first - grid.key_last).expand(grid.q_blocks, grid.k_blocks)
    hi = (grid.query_last - grid.key_first).expand(grid.q_blocks, grid.k_blocks)
    return (lo.clamp(min=0) if grid.causal else lo), hi


def _key_ranges_block_mask(
    grid: BlockGrid | TracedBlockGrid, starts: list[int] | torch.Tensor, ends: list[int] | torch.Tensor
) -> torch.Tensor:
    """Blocks holding a kept pair when every query keeps the keys ``[starts[n], ends[n]]``.

    At causal sites a key block counts only up to the query block's last token. ``starts`` and
    ``ends`` are lists of ints or int64 tensors ``[n]``.
    """
    if len(starts) == 0:
        return torch.zeros(grid.q_blocks, grid.k_blocks, dtype=torch.bool)
    first = grid.key_first.expand(grid.q_blocks, grid.k_blocks)
    last = grid.key_last.expand(grid.q_blocks, grid.k_blocks)
    if grid.causal:
        last = torch.minimum(last, grid.query_last)
    lo = torch.maximum(first.unsqueeze(-1), torch.as_tensor(starts))
    hi = torch.minimum(last.unsqueeze(-1), torch.as_tensor(ends))
    return (lo <= hi).any(dim=-1)


def _stripe_ranges(
    positions: tuple[float, ...], width: int, k_len: int
) -> tuple[list[int], list[int]]:
    """Key ranges ``[floor(p * k_len), floor(p * k_len) + width - 1]`` of relative positions."""
    starts = [math.floor(position * k_len) for position in positions]
    return starts, [start + width - 1 for start in starts]


def _traced_stripe_ranges(
    positions: tuple[float, ...], width: int, grid: TracedBlockGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_stripe_ranges` as int64 tensors of the traced key length.

    The product is taken in float64, as Python's ``position * k_len`` is, so both floor alike.
    """
    starts = torch.floor(
        torch.tensor(positions, dtype=torch.float64) * grid.key_length().to(torch.float64)
    ).to(torch.int64)
    return starts, starts + (width - 1)


def _span_blocks(tokens: int, block: int) -> int:
    """The most blocks a run of ``tokens`` consecutive keys can touch (it may start mid-block)."""
    return (tokens + block - 2) // block + 1 if tokens > 0 else 0


def _reaches(distance: int, grid: TracedBlockGrid) -> Any:
    """1 when a query-key distance of ``distance`` fits the grid's lengths, else 0 (symbolic-safe: no branch)."""
    return torch.sym_min(torch.sym_max(grid.q_len + grid.k_len - distance, 0), 1)


# --- the pattern families ---------------------------------------------------------------------


@register_pattern("dense")
@dataclasses.dataclass(frozen=True, repr=False)
class Dense(Pattern):
    """Every block (only the lower triangle at causal sites).

    Example:
        >>> dense().block_mask(2, 2, causal=True).int().tolist()
        [[1, 0], [1, 1]]
    """

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        return torch.ones(grid.q_blocks, grid.k_blocks, dtype=torch.bool)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return self._block_mask(grid)  # already tensor ops of the grid's coordinates


@register_pattern("sliding_window")
@dataclasses.dataclass(frozen=True, repr=False)
class SlidingWindow(Pattern):
    """Each query token keeps the keys within ``window`` tokens: ``|q - k| <= window``.

    At causal sites only ``k <= q`` counts. A block is kept when any token pair in it is.

    Example:
        >>> SlidingWindow(window=16).block_mask(3, 3, block_size=16).int().tolist()
        [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    """

    window: int

    def __post_init__(self) -> None:
        _check_tokens("sliding_window", "window", self.window)

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        # The differences q - k over a block pair fill the integer range
        # [query_first - key_last, query_last - key_first]; keep the block when that range meets
        # [-window, window] (or [0, window] at causal).
        lowest_allowed = 0 if grid.causal else -self.window
        return (grid.query_first - grid.key_last <= self.window) & (
            grid.query_last - grid.key_first >= lowest_allowed
        )

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return self._block_mask(grid)  # already tensor ops of the grid's coordinates

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        # A query block's keys lie within [first - window, last + window] ([.., last] at causal).
        return _span_blocks(grid.block_size + self.window * (1 if grid.causal else 2), grid.block_size)


@register_pattern("attention_sinks")
@dataclasses.dataclass(frozen=True, repr=False)
class AttentionSinks(Pattern):
    """Every query keeps the first ``num_tokens`` keys (the blocks covering ``[0, num_tokens)``).

    Example:
        >>> attention_sinks(4).block_mask(2, 3, block_size=16).int().tolist()
        [[1, 0, 0], [1, 0, 0]]
    """

    num_tokens: int

    def __post_init__(self) -> None:
        _check_tokens("attention_sinks", "num_tokens", self.num_tokens)

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        return (grid.key_first < self.num_tokens).expand(grid.q_blocks, grid.k_blocks)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return self._block_mask(grid)  # already tensor ops of the grid's coordinates

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        return (self.num_tokens + grid.block_size - 1) // grid.block_size


@register_pattern("skip")
@dataclasses.dataclass(frozen=True, repr=False)
class Skip(Pattern):
    """The head is dropped: its output is zeros and none of its blocks is computed.

    Token level it keeps no pair. Since block masks never have empty rows, `block_mask` gives
    the fallback placeholder (one block per row, key block ``min(i, k_blocks - 1)``) so that
    shape code keeps working; `is_skip` tells the rewrite to zero the head instead, and
    `density` is 0.0. The search picks it only where it proves the head harmless. A skipped head
    does not combine with other patterns.

    Example:
        >>> skip().is_skip, skip().density(4, 4)
        (True, 0.0)
        >>> skip().block_mask(2, 2).int().tolist()
        [[1, 0], [0, 1]]
    """

    @property
    def is_skip(self) -> bool:
        return True

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        return torch.zeros(grid.q_blocks, grid.k_blocks, dtype=torch.bool)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return self._block_mask(grid)  # already tensor ops of the grid's coordinates

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        return 1


@register_pattern("last_tokens")
@dataclasses.dataclass(frozen=True, repr=False)
class LastTokens(Pattern):
    """Every query keeps the last ``num_tokens`` keys: ``j >= k_len - num_tokens``.

    Relative to the end of the key sequence, so it follows the length (at causal sites a query
    sees them only once it reaches them, ``j <= i``).

    Example:
        >>> last_tokens(4).block_mask(2, 3, block_size=16).int().tolist()
        [[0, 0, 1], [0, 0, 1]]
    """

    num_tokens: int

    def __post_init__(self) -> None:
        _check_tokens("last_tokens", "num_tokens", self.num_tokens)

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        return _key_ranges_block_mask(grid, [grid.k_len - self.num_tokens], [grid.k_len - 1])

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        end = grid.key_length().reshape(1)
        return _key_ranges_block_mask(grid, end - self.num_tokens, end - 1)

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        return _span_blocks(self.num_tokens, grid.block_size)


@register_pattern("a_shape")
@dataclasses.dataclass(frozen=True, repr=False)
class AShape(Pattern):
    """Attention sinks plus a sliding window (the "A" shape of StreamingLLM / MInference).

    Keeps ``j < sink_tokens or |i - j| <= window`` — the same blocks as
    ``attention_sinks(sink_tokens) | sliding_window(window)``, saved under its own name.

    Example:
        >>> a_shape(4, 16).block_mask(4, 4, block_size=16, causal=True).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
        >>> a_shape(4, 512).to_dict()
        {'pattern': 'a_shape', 'sink_tokens': 4, 'window': 512}
    """

    sink_tokens: int
    window: int
    _positional: ClassVar[int] = 2

    def __post_init__(self) -> None:
        _check_tokens("a_shape", "sink_tokens", self.sink_tokens)
        _check_tokens("a_shape", "window", self.window)

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        sinks = AttentionSinks(self.sink_tokens)._block_mask(grid)
        return sinks | SlidingWindow(self.window)._block_mask(grid)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return self._block_mask(grid)  # already tensor ops of the grid's coordinates

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        return (AttentionSinks(self.sink_tokens)._traced_row_bound(grid)
                + SlidingWindow(self.window)._traced_row_bound(grid))


@dataclasses.dataclass(frozen=True, repr=False)
class DistancePattern(Pattern):
    """Base of patterns that keep a token pair by its distance ``d = i - j`` alone.

    Subclasses implement `keeps_distance_range`. Over one block pair the distances fill a
    contiguous integer range, so "some kept distance in the range" is exactly the "any token
    pair" pooling; at causal sites the range is cut to ``d >= 0`` first. Cost: one vectorised
    test per block pair.

    Example:
        >>> d = torch.tensor([0, 5, 9])
        >>> strided(8, width=2).keeps_distance_range(d, d).tolist()
        [True, False, True]
    """

    @abc.abstractmethod
    def keeps_distance_range(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``bool`` (broadcast of ``lo``, ``hi``): some kept distance lies in ``[lo, hi]``.

        Only entries with ``lo <= hi`` are read; others may hold anything.
        """

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        lo, hi = _distance_bounds(grid)
        return (lo <= hi) & self.keeps_distance_range(lo, hi)


def _symmetric_range(
    keeps_abs_range: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> torch.Tensor:
    """`keeps_distance_range` of a pattern that keeps ``d`` iff it keeps ``-d``.

    Splits ``[lo, hi]`` into its part at ``d >= 0`` and the mirror of its part at ``d < 0``, and
    asks ``keeps_abs_range(a, b)`` (``0 <= a``; read only where ``a <= b``) about each.
    """
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    up_lo, up_hi = lo.clamp(min=0), hi.clamp(min=0)
    down_lo, down_hi = (-hi).clamp(min=1), (-lo).clamp(min=0)
    up = (up_lo <= hi) & keeps_abs_range(up_lo, up_hi)
    down = (down_lo <= -lo) & keeps_abs_range(down_lo, down_hi)
    return up | down


@register_pattern("multi_diagonal")
@dataclasses.dataclass(frozen=True, repr=False)
class MultiDiagonal(DistancePattern):
    """Diagonal bands every ``period`` tokens (dilated attention; video: period = frame size).

    Keeps ``(i, j)`` when ``|d - m * period| <= width`` for ``d = i - j`` and some integer
    ``m`` — any ``m``, or ``|m| <= count`` when ``count`` is given. ``m = 0`` is the local
    window; ``m = ±1`` the same spot one frame back / ahead.

    Example:
        >>> multi_diagonal(32, width=0, count=1).block_mask(4, 4, block_size=16).int().tolist()
        [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
        >>> multi_diagonal(1024, width=64)
        multi_diagonal(1024, width=64)
    """

    period: int
    width: int = 0
    count: int | None = None

    def __post_init__(self) -> None:
        _check_tokens("multi_diagonal", "period", self.period)
        _check_tokens("multi_diagonal", "width", self.width, low=0)
        if self.count is not None:
            _check_tokens("multi_diagonal", "count", self.count, low=0)

    def keeps_distance_range(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        # Band m meets [lo, hi] iff m * period - width <= hi and m * period + width >= lo.
        lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
        first = -_floor_div(self.width - lo, self.period)  # ceil((lo - width) / period)
        last = _floor_div(hi + self.width, self.period)
        if self.count is not None:
            first, last = first.clamp(min=-self.count), last.clamp(max=self.count)
        return first <= last

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return self._block_mask(grid)  # already tensor ops of the grid's coordinates

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        # Each band covers [first - m * period - width, last - m * period + width]; bands that
        # meet the grid have |m * period| < q_len + k_len.
        bs, sides = grid.block_size, 1 if grid.causal else 2
        if self.count is None:
            return ((grid.q_len + grid.k_len) // self.period * 2 + 1) * _span_blocks(bs + 2 * self.width, bs)
        # Nearby bands share blocks: never more than the blocks of their whole envelope.
        envelope = _span_blocks(bs + sides * (self.count * self.period + self.width), bs)
        return min((2 * self.count + 1) * _span_blocks(bs + 2 * self.width, bs), envelope)


@register_pattern("strided")
@dataclasses.dataclass(frozen=True, repr=False)
class Strided(DistancePattern):
    """The Sparse Transformer's strided pattern: keys ``j`` with ``(i - j) mod stride < width``.

    ``mod`` is the non-negative remainder (Python's ``%``), so ``width`` consecutive keys are
    kept ending at ``i``, ``i - stride``, ``i - 2 * stride``, ... (and ahead of ``i`` when not
    causal). ``width == stride`` is dense.

    Example:
        >>> strided(32).block_mask(4, 4, block_size=16, causal=True).int().tolist()
        [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]]
    """

    stride: int
    width: int = 1

    def __post_init__(self) -> None:
        _check_tokens("strided", "stride", self.stride)
        _check_tokens("strided", "width", self.width)
        if self.width > self.stride:
            raise PatternError(
                f"strided: width must be at most stride={self.stride}, got {self.width}"
            )

    def keeps_distance_range(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        # Kept distances are [m * stride, m * stride + width - 1] for every integer m.
        lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
        first = -_floor_div(self.width - 1 - lo, self.stride)  # ceil((lo - width + 1) / stride)
        return first <= _floor_div(hi, self.stride)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return self._block_mask(grid)  # already tensor ops of the grid's coordinates

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        # Kept distances [m * stride, m * stride + width - 1], |m * stride| < q_len + k_len.
        bands = (grid.q_len + grid.k_len) // self.stride * 2 + 1
        return bands * _span_blocks(grid.block_size + self.width - 1, grid.block_size)


@register_pattern("radial")
@dataclasses.dataclass(frozen=True, repr=False)
class Radial(DistancePattern):
    """Radial attention: dense near the diagonal, ever sparser with distance.

    With ``a = |i - j|``: keep when ``a <= window``; otherwise keep when ``a`` is a multiple of
    ``2 ** e``, ``e = max(0, floor(log2(a / decay_tokens)))``. So every key is kept up to
    ``max(window, 2 * decay_tokens - 1)``, every 2nd key for ``a`` in
    ``[2 * decay_tokens, 4 * decay_tokens)``, every 4th in the next octave, and so on (the
    density halves each time the distance doubles). ``radial(w)`` takes ``decay_tokens = w``.
    Whole blocks drop out only where the stride ``2 ** e`` exceeds the block size, i.e. beyond
    about ``2 * decay_tokens * block_size`` tokens.

    Example:
        >>> kept = radial(2).block_mask(1, 20, block_size=1)[0]   # keys of query 0, token level
        >>> kept.nonzero().flatten().tolist()
        [0, 1, 2, 3, 4, 6, 8, 12, 16]
        >>> radial(256, decay_tokens=1024)
        radial(256, decay_tokens=1024)
    """

    window: int
    decay_tokens: int

    def __post_init__(self) -> None:
        _check_tokens("radial", "window", self.window)
        _check_tokens("radial", "decay_tokens", self.decay_tokens)

    def keeps_distance_range(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return _symmetric_range(self._keeps_abs_range, lo, hi)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        # Octaves past the farthest distance keep nothing, so looping up to the declared maximum
        # length gives the blocks of looping up to the actual one.
        lo, hi = _distance_bounds(grid)
        keeps = functools.partial(self._keeps_abs_range, farthest=grid.max_len)
        return (lo <= hi) & _symmetric_range(keeps, lo, hi)

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        bs, decay, sides = grid.block_size, self.decay_tokens, 1 if grid.causal else 2
        near = max(self.window, 2 * decay - 1)
        bound = _span_blocks(bs + sides * near, bs)
        exponent = 1
        # Octave e keeps `decay` multiples of 2**e per query; a query block's keys at one multiple
        # are bs consecutive keys (at most 2 blocks). Octaves beyond the lengths count 0.
        while decay << exponent <= grid.max_len:
            reach = _span_blocks((decay << exponent) + bs - 1, bs)
            bound = bound + sides * min(reach, 2 * decay) * _reaches(decay << exponent, grid)
            exponent += 1
        return bound

    def _keeps_abs_range(
        self, lo: torch.Tensor, hi: torch.Tensor, farthest: int | None = None
    ) -> torch.Tensor:
        decay = self.decay_tokens
        keep = lo <= max(self.window, 2 * decay - 1)
        if farthest is None:
            farthest = int(hi.max()) if hi.numel() else 0
        exponent = 1
        # Octave e covers a in [decay * 2**e, decay * 2**(e + 1)) and keeps multiples of 2**e.
        while decay << exponent <= farthest:
            step = 1 << exponent
            start = lo.clamp(min=decay << exponent)
            stop = hi.clamp(max=(decay << (exponent + 1)) - 1)
            first_multiple = -_floor_div(-start, step) * step
            keep = keep | ((start <= stop) & (first_multiple <= stop))
            exponent += 1
        return keep


@register_pattern("power_of_two")
@dataclasses.dataclass(frozen=True, repr=False)
class PowerOfTwo(DistancePattern):
    """Keys at distances 0 and ``±2**k``: keeps ``|d - s| <= width`` for ``d = i - j``.

    ``s`` runs over ``0`` and ``±2**k`` for ``k = 0 .. max_exponent`` (every ``k`` when
    ``max_exponent`` is None); ``width`` widens each line to ``2 * width + 1`` tokens.

    Example:
        >>> kept = power_of_two(3).block_mask(1, 12, block_size=1)[0]   # keys of query 0
        >>> kept.nonzero().flatten().tolist()
        [0, 1, 2, 4, 8]
        >>> power_of_two(width=2)
        power_of_two(width=2)
    """

    max_exponent: int | None = None
    width: int = 0
    _positional: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.max_exponent is not None:
            _check_bounded("power_of_two", "max_exponent", self.max_exponent, 0, MAX_EXPONENT, "MAX_EXPONENT")
        _check_tokens("power_of_two", "width", self.width, low=0)

    def keeps_distance_range(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
        farthest = max(int(lo.abs().max()), int(hi.abs().max())) if lo.numel() else 0
        return self._keeps_lines(lo, hi, farthest)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        # Lines past the farthest distance meet no block pair: looping up to the declared
        # maximum length gives the blocks of looping up to the actual one.
        lo, hi = _distance_bounds(grid)
        return (lo <= hi) & self._keeps_lines(lo, hi, grid.max_len)

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        bs, top = grid.block_size, (grid.max_len + self.width).bit_length()
        if self.max_exponent is not None:
            top = min(top, self.max_exponent)
        line = _span_blocks(bs + 2 * self.width, bs)
        sides = 1 if grid.causal else 2
        bound = line
        for exponent in range(top + 1):     # lines +-2**e that fit the grid's lengths
            bound = bound + sides * line * _reaches((1 << exponent) - self.width, grid)
        # Nearby lines share blocks: never more than the blocks of their whole envelope.
        return torch.sym_min(bound, _span_blocks(bs + sides * ((1 << top) + self.width), bs))

    def _keeps_lines(self, lo: torch.Tensor, hi: torch.Tensor, farthest: int) -> torch.Tensor:
        """Some line ``|d - s| <= width`` meets ``[lo, hi]``, for lines out to distance ``farthest``."""
        top = (farthest + self.width).bit_length()  # 2**top - width > farthest
        if self.max_exponent is not None:
            top = min(top, self.max_exponent)
        keep = (lo <= self.width) & (hi >= -self.width)
        for exponent in range(top + 1):
            for line in (1 << exponent, -(1 << exponent)):
                keep = keep | ((lo <= line + self.width) & (hi >= line - self.width))
        return keep


@register_pattern("vertical_stripes")
@dataclasses.dataclass(frozen=True, repr=False)
class VerticalStripes(Pattern):
    """Key columns at fixed relative positions, for every query (they follow the length).

    Position ``p`` in ``[0, 1)`` keeps keys ``c <= j < c + width`` with
    ``c = floor(p * k_len)`` (float64 product), cut at ``k_len``. `attention_sinks` keeps the
    absolute first keys, `last_tokens` the absolute last ones.

    Example:
        >>> vertical_stripes([0.5], width=8).block_mask(2, 4, block_size=16).int().tolist()
        [[0, 0, 1, 0], [0, 0, 1, 0]]
    """

    positions: tuple[float, ...]
    width: int = 1

    def __post_init__(self) -> None:
        positions = _relative_positions("vertical_stripes", "positions", self.positions)
        if not positions:
            raise PatternError("vertical_stripes: positions must hold at least one position")
        object.__setattr__(self, "positions", positions)
        _check_tokens("vertical_stripes", "width", self.width)

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        return _key_ranges_block_mask(grid, *_stripe_ranges(self.positions, self.width, grid.k_len))

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        return _key_ranges_block_mask(grid, *_traced_stripe_ranges(self.positions, self.width, grid))

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        return len(self.positions) * _span_blocks(self.width, grid.block_size)


@register_pattern("vertical_slash")
@dataclasses.dataclass(frozen=True, repr=False)
class VerticalSlash(Pattern):
    """Vertical lines plus slash lines (MInference's vertical-slash, with static positions).

    Keeps ``(i, j)`` when ``c <= j < c + width`` for a vertical line, ``c = floor(p * k_len)``
    with ``p`` in ``vertical`` (relative key positions in ``[0, 1)``), or when
    ``o <= i - j < o + width`` for a slash offset ``o`` in ``slash`` (tokens; 0 is the main
    diagonal, negative offsets lie above it).

    Example:
        >>> pattern = vertical_slash(vertical=[0.0], slash=[0, 32], width=4)
        >>> pattern.block_mask(4, 4, block_size=16, causal=True).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
        >>> vertical_slash([0.5], [3]).block_mask(4, 4, block_size=1).int().tolist()
        [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 1, 0]]
    """

    vertical: tuple[float, ...] = ()
    slash: tuple[int, ...] = ()
    width: int = 1
    _positional: ClassVar[int] = 2

    def __post_init__(self) -> None:
        vertical = _relative_positions("vertical_slash", "vertical", self.vertical)
        _check_count("vertical_slash", "slash", self.slash, MAX_LINES, "MAX_LINES")
        slash = _int_tuple("vertical_slash", "slash", self.slash)
        if not vertical and not slash:
            raise PatternError("vertical_slash: vertical and slash are both empty")
        object.__setattr__(self, "vertical", vertical)
        object.__setattr__(self, "slash", slash)
        _check_tokens("vertical_slash", "width", self.width)

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        vertical = _key_ranges_block_mask(grid, *_stripe_ranges(self.vertical, self.width, grid.k_len))
        return self._with_slashes(grid, vertical)

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        vertical = _key_ranges_block_mask(grid, *_traced_stripe_ranges(self.vertical, self.width, grid))
        return self._with_slashes(grid, vertical)

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        bs = grid.block_size
        return (len(self.vertical) * _span_blocks(self.width, bs)
                + len(self.slash) * _span_blocks(bs + self.width - 1, bs))

    def _with_slashes(self, grid: BlockGrid | TracedBlockGrid, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` (the vertical lines' blocks) with the slash lines' blocks added."""
        if self.slash:
            lo, hi = _distance_bounds(grid)
            offsets = torch.tensor(self.slash)
            meets = (lo.unsqueeze(-1) <= offsets + self.width - 1) & (hi.unsqueeze(-1) >= offsets)
            mask = mask | ((lo <= hi) & meets.any(dim=-1))
        return mask


_RELATIVE_TO = ("start", "diagonal")


@register_pattern("block_top_k")
@dataclasses.dataclass(frozen=True, repr=False)
class BlockTopK(Pattern):
    """Static key blocks chosen per query block from a profile, moved to other lengths.

    ``table[r]`` lists the key blocks kept by query block ``r`` of the source grid
    (``source_q_blocks x source_k_blocks``, usually the calibration length). Defined on blocks,
    not tokens (``q_len``/``k_len`` are not used). A target block ``(I, J)`` of another grid is
    kept when any source block it maps onto is kept:

    - ``relative_to="start"``: by relative position from the start. Target row ``I`` covers
      ``[I / q_blocks, (I + 1) / q_blocks)`` of the rows, the source rows overlapping that
      interval are its source rows; columns likewise. Same grid: the table itself.
    - ``relative_to="diagonal"``: rows as above; for each source row ``r`` of target row
      ``I``, key blocks within ``near_blocks`` of the diagonal keep their offset
      (``|I - J| <= near_blocks`` maps to source block ``(r, r - (I - J))``), and the far keys
      map proportionally: ``[0, I - near_blocks)`` onto ``[0, r - near_blocks)`` (overlap, as
      above) and ``(I + near_blocks, k_blocks)`` onto ``(r + near_blocks, source_k_blocks)``.
      A local band stays as many blocks wide at any length, and columns anchored at the start
      (sinks) stay at the start.

    Build it from profiled scores with `BlockTopK.from_block_scores`.

    Example:
        >>> pattern = block_top_k([[0], [0, 1]], source_q_blocks=2, source_k_blocks=2)
        >>> pattern.block_mask(4, 4, causal=True).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
        >>> block_top_k.from_block_scores(torch.tensor([[9., 1.], [5., 7.]]), k=1)
        block_top_k(<2x2 table, 2 blocks>, relative_to='start')
    """

    table: tuple[tuple[int, ...], ...]
    source_q_blocks: int
    source_k_blocks: int
    relative_to: str = "start"
    near_blocks: int = 4

    def __post_init__(self) -> None:
        for field in ("source_q_blocks", "source_k_blocks"):
            _check_bounded("block_top_k", field, getattr(self, field), 1, MAX_GRID_BLOCKS, "MAX_GRID_BLOCKS")
        if self.source_q_blocks * self.source_k_blocks > MAX_GRID_BLOCKS:
            raise PatternError(
                f"block_top_k: the source grid source_q_blocks x source_k_blocks = {self.source_q_blocks} x "
                f"{self.source_k_blocks} = {self.source_q_blocks * self.source_k_blocks} blocks; at most "
                f"{MAX_GRID_BLOCKS} (MAX_GRID_BLOCKS in sparsify.limits)"
            )
        if not isinstance(self.table, (list, tuple)):
            raise PatternError(
                f"block_top_k: table must be a list of lists of key block indices, got "
                f"{type(self.table).__name__}"
            )
        if len(self.table) != self.source_q_blocks:
            raise PatternError(
                f"block_top_k: table has {len(self.table)} rows, source_q_blocks is "
                f"{self.source_q_blocks}"
            )
        rows = []
        for index, row in enumerate(self.table):
            row = _int_tuple("block_top_k", f"table[{index}]", row)
            if row and not (0 <= row[0] and row[-1] < self.source_k_blocks):
                raise PatternError(
                    f"block_top_k: table[{index}] holds key blocks outside "
                    f"[0, {self.source_k_blocks}): {list(row)}"
                )
            rows.append(row)
        object.__setattr__(self, "table", tuple(rows))
        if self.relative_to not in _RELATIVE_TO:
            raise PatternError(
                f"block_top_k: relative_to must be one of {', '.join(_RELATIVE_TO)}, "
                f"got {self.relative_to!r}"
            )
        _check_tokens("block_top_k", "near_blocks", self.near_blocks, low=0)

    @classmethod
    def from_block_scores(
        cls,
        scores: torch.Tensor,
        *,
        k: int | None = None,
        density: float | None = None,
        causal: bool = False,
        relative_to: str = "start",
        near_blocks: int = 4,
    ) -> BlockTopK:
        """Keep, per query block, the ``k`` best-scoring key blocks (or a ``density`` share).

        ``scores`` is ``[q_blocks, k_blocks]`` (e.g. the profiled attention mass of one head).
        ``density`` keeps ``ceil(density * n)`` blocks of the ``n`` a row can see (at least
        one). ``causal`` only considers key blocks ``j <= i``. Ties go to the lower index.

        Example:
            >>> scores = torch.tensor([[1., 0., 0.], [3., 1., 2.]])
            >>> BlockTopK.from_block_scores(scores, k=2, causal=True).table
            ((0,), (0, 1))
        """
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or 0 in scores.shape:
            got = (
                tuple(scores.shape)
                if isinstance(scores, torch.Tensor)
                else type(scores).__name__
            )
            raise PatternError(
                f"block_top_k: scores must be a [q_blocks, k_blocks] tensor, got {got}"
            )
        if (k is None) == (density is None):
            raise PatternError("block_top_k: give exactly one of k and density")
        if k is not None:
            _check_positive_int("block_top_k", "k", k)
        elif (
            isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not 0 < density <= 1
        ):
            raise PatternError(f"block_top_k: density must lie in (0, 1], got {density!r}")
        scores = scores.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(scores).all()):
            raise PatternError("block_top_k: scores must be finite (no NaN or inf)")
        q_blocks, k_blocks = scores.shape
        visible = (
            causal_block_mask(q_blocks, k_blocks).sum(dim=1)
            if causal
            else torch.full((q_blocks,), k_blocks)
        )
        if causal:
            scores = scores.masked_fill(~causal_block_mask(q_blocks, k_blocks), -math.inf)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        table = []
        for row, seen in enumerate(visible.tolist()):
            if k is not None:
                count = min(k, seen)
            else:
                count = max(1, min(seen, math.ceil(density * seen - 1e-9)))
            table.append(sorted(order[row, :count].tolist()))
        return cls(table, q_blocks, k_blocks, relative_to, near_blocks)

    def _source_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.source_q_blocks, self.source_k_blocks, dtype=torch.bool)
        for row, columns in enumerate(self.table):
            mask[row, list(columns)] = True
        return mask

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        source = self._source_mask()
        sq, sk = self.source_q_blocks, self.source_k_blocks
        row_lo, row_hi = _overlapping(grid.q_blocks, sq)
        row_lo, row_hi = row_lo.unsqueeze(1), row_hi.unsqueeze(1)
        if self.relative_to == "start":
            col_lo, col_hi = _overlapping(grid.k_blocks, sk)
            return _any_in_rectangles(source, row_lo, row_hi, col_lo, col_hi)
        return self._diagonal_block_mask(source, row_lo, row_hi, grid.k_blocks)

    def fixed_length_reason(self) -> str | None:
        return (
            f"block_top_k keeps a table of key blocks profiled at a {self.source_q_blocks}x"
            f"{self.source_k_blocks}-block grid; its blocks at another length are that table "
            "resampled, not a function of the block grid, so an export builds them per declared length"
        )

    def _diagonal_block_mask(
        self, source: torch.Tensor, row_lo: torch.Tensor, row_hi: torch.Tensor, k_blocks: int
    ) -> torch.Tensor:
        """`relative_to="diagonal"`: one pass per source row a target row overlaps."""
        sq, sk, near = self.source_q_blocks, self.source_k_blocks, self.near_blocks
        prefix = torch.zeros(sq, sk + 1, dtype=torch.int64)
        prefix[:, 1:] = source.long().cumsum(1)
        query = torch.arange(row_lo.shape[0]).unsqueeze(1)
        key = torch.arange(k_blocks).unsqueeze(0)
        offset = query - key
        kept = torch.zeros(row_lo.shape[0], k_blocks, dtype=torch.bool)
        for step in range(int((row_hi - row_lo).max()) + 1):
            row = (row_lo + step).clamp(max=sq - 1)
            # Far left: target keys [0, query - near) onto source keys [0, row - near).
            left_target, left_source = (query - near).clamp(min=1), row - near
            left_lo = key * left_source // left_target
            left_hi = ((key + 1) * left_source - 1) // left_target
            # Far right: target keys (query + near, k_blocks) onto source keys (row + near, sk).
            right_target = (k_blocks - query - near - 1).clamp(min=1)
            right_source = sk - row - near - 1
            right_key = key - query - near - 1
            right_lo = row + near + 1 + right_key * right_source // right_target
            right_hi = row + near + 1 + ((right_key + 1) * right_source - 1) // right_target
            lo = torch.where(
                offset > near, left_lo, torch.where(offset < -near, right_lo, row - offset)
            )
            hi = torch.where(
                offset > near, left_hi, torch.where(offset < -near, right_hi, row - offset)
            )
            reachable = torch.where(
                offset > near, left_source > 0, (offset >= -near) | (right_source > 0)
            )
            lo, hi = lo.clamp(min=0), hi.clamp(max=sk - 1)
            found = prefix[row, (hi + 1).clamp(0, sk)] - prefix[row, lo.clamp(0, sk)] > 0
            kept |= (row_lo + step <= row_hi) & reachable & (lo <= hi) & found
        return kept

    def __str__(self) -> str:
        kept = sum(len(row) for row in self.table)
        shown = [f"<{self.source_q_blocks}x{self.source_k_blocks} table, {kept} blocks>"]
        shown.append(f"relative_to={self.relative_to!r}")
        if self.relative_to == "diagonal":
            shown.append(f"near_blocks={self.near_blocks}")
        return f"block_top_k({', '.join(shown)})"


def _overlapping(target: int, source: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target index ``t``, the source indices ``[lo, hi]`` that meet
    ``[t, t + 1) * source / target`` (relative positions)."""
    index = torch.arange(target)
    return index * source // target, ((index + 1) * source - 1) // target


def _any_in_rectangles(
    mask: torch.Tensor,
    row_lo: torch.Tensor,
    row_hi: torch.Tensor,
    col_lo: torch.Tensor,
    col_hi: torch.Tensor,
) -> torch.Tensor:
    """Whether ``mask[row_lo..row_hi, col_lo..col_hi]`` (inclusive, clipped) holds a True.

    Bounds broadcast together; one summed-area table, so O(1) per rectangle.
    """
    rows, columns = mask.shape
    sums = torch.zeros(rows + 1, columns + 1, dtype=torch.int64)
    sums[1:, 1:] = mask.long().cumsum(0).cumsum(1)
    r0, r1 = row_lo.clamp(0, rows), (row_hi + 1).clamp(0, rows)
    c0, c1 = col_lo.clamp(0, columns), (col_hi + 1).clamp(0, columns)
    r0, r1, c0, c1 = torch.broadcast_tensors(r0, r1, c0, c1)
    total = sums[r1, c1] - sums[r0, c1] - sums[r1, c0] + sums[r0, c0]
    return (r0 < r1) & (c0 < c1) & (total > 0)


@dataclasses.dataclass(frozen=True, repr=False)
class _Composite(Pattern):
    """Shared JSON, validation and display of `Union` and `Intersection`."""

    parts: tuple[Pattern, ...]
    _operator: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if isinstance(self.parts, list):
            object.__setattr__(self, "parts", tuple(self.parts))
        if not isinstance(self.parts, tuple) or len(self.parts) < 2:
            raise PatternError(
                f"{self.pattern_name}: parts must hold at least two patterns, got {self.parts!r}"
            )
        for index, part in enumerate(self.parts):
            if not isinstance(part, Pattern):
                raise PatternError(
                    f"{self.pattern_name}: parts[{index}] must be a Pattern, got {part!r}"
                )
            if part.is_skip:
                raise PatternError(
                    f"{self.pattern_name}: parts[{index}] is skip(); a dropped head does not "
                    "combine with other patterns"
                )
        if len(self.parts) > MAX_PARTS:
            raise PatternError(
                f"{self.pattern_name}: {len(self.parts)} parts; at most {MAX_PARTS} "
                f"(MAX_PARTS in sparsify.limits)"
            )
        depth = self.nesting_depth
        if depth > MAX_PATTERN_DEPTH:
            raise PatternError(
                f"{self.pattern_name}: unions and intersections nested {depth} deep; at most "
                f"{MAX_PATTERN_DEPTH} (MAX_PATTERN_DEPTH in sparsify.limits)"
            )

    @property
    def nesting_depth(self) -> int:
        """1 for a union or intersection of plain patterns, one more per level of nesting."""
        return 1 + max(
            (part.nesting_depth for part in self.parts if isinstance(part, _Composite)), default=0
        )

    @property
    def is_adaptive(self) -> bool:
        return any(part.is_adaptive for part in self.parts)

    def _params(self) -> dict[str, Any]:
        return {"parts": [part.to_dict() for part in self.parts]}

    def fixed_length_reason(self) -> str | None:
        for part in self.parts:
            reason = part.fixed_length_reason()
            if reason is not None:
                return f"its part {part}: {reason}"
        return None

    @classmethod
    def _from_params(cls, params: Mapping[str, Any], location: str, depth: int = 0) -> Pattern:
        parts = params["parts"]
        if not isinstance(parts, list):
            raise PatternError(
                f"{location}: pattern {cls.pattern_name!r}: parts must be a list of patterns, "
                f"got {type(parts).__name__}"
            )
        if len(parts) > MAX_PARTS:
            raise PatternError(
                f"{location}: pattern {cls.pattern_name!r}: {len(parts)} parts; at most "
                f"{MAX_PARTS} (MAX_PARTS in sparsify.limits)"
            )
        return cls(
            tuple(
                _from_dict(part, f"{location}.parts[{i}]", depth + 1) for i, part in enumerate(parts)
            )
        )

    def __str__(self) -> str:
        shown = [f"({part})" if isinstance(part, _Composite) else str(part) for part in self.parts]
        return f" {self._operator} ".join(shown)


@register_pattern("union")
@dataclasses.dataclass(frozen=True, repr=False)
class Union(_Composite):
    """Blocks kept by any part (``a | b``).

    Example:
        >>> str(sliding_window(512) | attention_sinks(4))
        'sliding_window(512) | attention_sinks(4)'
    """

    _operator: ClassVar[str] = "|"

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        mask = self.parts[0]._block_mask(grid)
        for part in self.parts[1:]:
            mask = mask | part._block_mask(grid)
        return mask

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        mask = self.parts[0]._traced_block_mask(grid)
        for part in self.parts[1:]:
            mask = mask | part._traced_block_mask(grid)
        return mask

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        bound = self.parts[0]._traced_row_bound(grid)
        for part in self.parts[1:]:
            bound = bound + part._traced_row_bound(grid)
        return bound


@register_pattern("intersection")
@dataclasses.dataclass(frozen=True, repr=False)
class Intersection(_Composite):
    """Blocks kept by every part (``a & b``); taken on block masks, not token by token.

    Example:
        >>> (dense() & attention_sinks(4)).block_mask(2, 2, block_size=16).int().tolist()
        [[1, 0], [1, 0]]
    """

    _operator: ClassVar[str] = "&"

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        mask = self.parts[0]._block_mask(grid)
        for part in self.parts[1:]:
            mask = mask & part._block_mask(grid)
        return mask

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        mask = self.parts[0]._traced_block_mask(grid)
        for part in self.parts[1:]:
            mask = mask & part._traced_block_mask(grid)
        return mask

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        bound = self.parts[0]._traced_row_bound(grid)
        for part in self.parts[1:]:
            bound = torch.sym_min(bound, part._traced_row_bound(grid))
        return bound


# --- factories ----------------------------------------------------------------------------------


def dense() -> Dense:
    """Dense attention: every block (the causal triangle at causal sites).

    Example:
        >>> dense()
        dense()
    """
    return Dense()


def sliding_window(window: int) -> SlidingWindow:
    """Keys within ``window`` tokens of the query (``|q - k| <= window``; ``k <= q`` at causal).

    Example:
        >>> sliding_window(512)
        sliding_window(512)
    """
    return SlidingWindow(window)


def attention_sinks(num_tokens: int) -> AttentionSinks:
    """The first ``num_tokens`` keys, for every query.

    Example:
        >>> attention_sinks(4)
        attention_sinks(4)
    """
    return AttentionSinks(num_tokens)


def skip() -> Skip:
    """The head is dropped (zeros); see `Skip` — chosen only where the search proves it harmless.

    Example:
        >>> skip()
        skip()
    """
    return Skip()


def last_tokens(num_tokens: int) -> LastTokens:
    """The last ``num_tokens`` keys, for every query (``j >= k_len - num_tokens``).

    Example:
        >>> last_tokens(16)
        last_tokens(16)
    """
    return LastTokens(num_tokens)


def a_shape(sink_tokens: int, window: int) -> AShape:
    """Sinks plus window: ``j < sink_tokens or |i - j| <= window``.

    Example:
        >>> a_shape(4, 512)
        a_shape(4, 512)
    """
    return AShape(sink_tokens, window)


def multi_diagonal(period: int, width: int = 0, count: int | None = None) -> MultiDiagonal:
    """Bands ``|i - j - m * period| <= width`` for every integer ``m`` (or ``|m| <= count``).

    Example:
        >>> multi_diagonal(1560, width=64, count=2)   # 1560 tokens per video frame
        multi_diagonal(1560, width=64, count=2)
    """
    return MultiDiagonal(period, width, count)


def strided(stride: int, width: int = 1) -> Strided:
    """Keys with ``(i - j) mod stride < width`` (Sparse Transformer, strided).

    Example:
        >>> strided(128, width=4)
        strided(128, width=4)
    """
    return Strided(stride, width)


def radial(window: int, decay_tokens: int | None = None) -> Radial:
    """Dense within ``window``; beyond, every ``2**floor(log2(|i - j| / decay_tokens))``-th key.

    ``decay_tokens`` defaults to ``window``.

    Example:
        >>> radial(256)
        radial(256, decay_tokens=256)
    """
    return Radial(window, window if decay_tokens is None else decay_tokens)


def power_of_two(max_exponent: int | None = None, width: int = 0) -> PowerOfTwo:
    """Keys at distance 0 and ``±2**k`` (``k <= max_exponent``), each ``±width`` tokens wide.

    Example:
        >>> power_of_two(10)
        power_of_two(max_exponent=10)
    """
    return PowerOfTwo(max_exponent, width)


def vertical_stripes(positions: Sequence[float], width: int = 1) -> VerticalStripes:
    """Key columns at relative positions ``positions`` (in ``[0, 1)``), ``width`` keys each.

    Example:
        >>> vertical_stripes([0.5, 0.25], width=64)
        vertical_stripes([0.25, 0.5], width=64)
    """
    return VerticalStripes(tuple(positions), width)


def vertical_slash(
    vertical: Sequence[float] = (), slash: Sequence[int] = (), width: int = 1
) -> VerticalSlash:
    """Vertical lines at relative key positions plus slash lines ``i - j = offset``.

    Example:
        >>> vertical_slash([0.0], [0, 1024], width=64)
        vertical_slash([0.0], [0, 1024], width=64)
    """
    return VerticalSlash(tuple(vertical), tuple(slash), width)


def block_top_k(
    table: Sequence[Sequence[int]],
    source_q_blocks: int,
    source_k_blocks: int,
    relative_to: str = "start",
    near_blocks: int = 4,
) -> BlockTopK:
    """Static key blocks per query block (``table``), chosen at a source grid; see `BlockTopK`.

    ``block_top_k.from_block_scores(scores, k=... | density=...)`` picks them from a profile.

    Example:
        >>> block_top_k([[0], [1]], 2, 2)
        block_top_k(<2x2 table, 2 blocks>, relative_to='start')
    """
    if not isinstance(table, (list, tuple)):
        return BlockTopK(table, source_q_blocks, source_k_blocks, relative_to, near_blocks)
    rows = tuple(tuple(row) if isinstance(row, (list, tuple)) else row for row in table)
    return BlockTopK(rows, source_q_blocks, source_k_blocks, relative_to, near_blocks)


block_top_k.from_block_scores = BlockTopK.from_block_scores  # type: ignore[attr-defined]


# --- loading --------------------------------------------------------------------------------------


def pattern_from_dict(data: Mapping[str, Any]) -> Pattern:
    """Rebuild a pattern from `Pattern.to_dict` output, checking name and parameters.

    Raises `PatternError` naming the pattern and listing the known names or the expected
    parameters; every number is checked against its bound in `sparsify.limits`.

    Example:
        >>> pattern_from_dict({"pattern": "sliding_window", "window": 512})
        sliding_window(512)
    """
    return _from_dict(data, "")


def _from_dict(data: Any, location: str, depth: int = 0) -> Pattern:
    where = f"{location}: " if location else ""
    if depth > MAX_PATTERN_DEPTH:
        raise PatternError(
            f"{where}patterns nested more than {MAX_PATTERN_DEPTH} deep "
            f"(MAX_PATTERN_DEPTH in sparsify.limits)"
        )
    if not isinstance(data, Mapping):
        raise PatternError(
            f"{where}a pattern must be a JSON object like {{\"pattern\": \"dense\"}}, "
            f"got {type(data).__name__}"
        )
    if "pattern" not in data:
        raise PatternError(
            f"{where}pattern object has no 'pattern' key; known patterns: "
            f"{', '.join(known_patterns())}"
        )
    name = data["pattern"]
    if not isinstance(name, str) or name not in _REGISTRY:
        close = (
            difflib.get_close_matches(name, known_patterns(), n=1) if isinstance(name, str) else []
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PatternError(
            f"{where}unknown pattern {name!r}{hint}; known: {', '.join(known_patterns())}"
        )
    cls = _REGISTRY[name]
    params = {key: value for key, value in data.items() if key != "pattern"}
    expected = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(expected))
    missing = [key for key in expected if key not in params]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown parameter(s) {', '.join(map(repr, unknown))}")
        if missing:
            problems.append(f"missing parameter(s) {', '.join(map(repr, missing))}")
        raise PatternError(
            f"{where}pattern {name!r}: {'; '.join(problems)}; expected: "
            f"{', '.join(expected) if expected else '(no parameters)'}"
        )
    try:
        if issubclass(cls, _Composite):
            return cls._from_params(params, location or name, depth)
        return cls._from_params(params, location or name)
    except PatternError as error:
        if location and not str(error).startswith(location):
            raise PatternError(f"{where}{error}") from error
        raise


# Input-adaptive families register themselves in the same registry (and are reachable from here).
from sparsify.adaptive_patterns import (  # noqa: E402
    AdaptivePattern,
    EstimatedVerticalSlash,
    PooledCoverage,
    estimated_vertical_slash,
    pooled_coverage,
)
