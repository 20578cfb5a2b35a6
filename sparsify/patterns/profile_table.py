"""`block_top_k`: static key blocks chosen per query block from a block-mass profile, resampled to other lengths."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from sparsify.errors import PatternError
from sparsify.limits import MAX_GRID_BLOCKS
from sparsify.patterns.base import (
    BlockGrid,
    Pattern,
    _check_bounded,
    _check_positive_int,
    _check_tokens,
    _int_tuple,
    causal_block_mask,
    register_pattern,
)

__all__ = ["BlockTopK", "block_top_k"]

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

