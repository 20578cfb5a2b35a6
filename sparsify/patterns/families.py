"""The static pattern families (dense, skip, windows, sinks, diagonals, stripes, ...) and their factories."""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from sparsify.errors import PatternError
from sparsify.limits import MAX_EXPONENT, MAX_LINES
from sparsify.patterns.base import (
    BlockGrid,
    Pattern,
    TracedBlockGrid,
    _check_bounded,
    _check_count,
    _check_tokens,
    _int_tuple,
    _relative_positions,
    register_pattern,
)

__all__ = [
    "AShape",
    "AttentionSinks",
    "Dense",
    "DistancePattern",
    "LastTokens",
    "MultiDiagonal",
    "PowerOfTwo",
    "Radial",
    "Skip",
    "SlidingWindow",
    "Strided",
    "VerticalSlash",
    "VerticalStripes",
    "a_shape",
    "attention_sinks",
    "dense",
    "last_tokens",
    "multi_diagonal",
    "power_of_two",
    "radial",
    "skip",
    "sliding_window",
    "strided",
    "vertical_slash",
    "vertical_stripes",
]

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

    @property
    def is_dense(self) -> bool:
        return True

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


