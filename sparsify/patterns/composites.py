"""Unions and intersections of patterns (``a | b``, ``a & b``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from sparsify.errors import PatternError
from sparsify.limits import MAX_PARTS, MAX_PATTERN_DEPTH
from sparsify.patterns.base import BlockGrid, Pattern, TracedBlockGrid, register_pattern
from sparsify.patterns.loading import _from_dict

__all__ = ["Intersection", "Union"]

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

    @property
    def is_dense(self) -> bool:
        return any(part.is_dense for part in self.parts)

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

    @property
    def is_dense(self) -> bool:
        return all(part.is_dense for part in self.parts)

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


