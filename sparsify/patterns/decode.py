"""Decode patterns: which cached key pages a decode step reads, chosen per step and head from the query (Quest's idea).

A decode pattern is registered in the pattern registry like every other (JSON round trip,
validation with messages naming the field), but it answers a different question than a prefill
pattern: not "which key blocks does each query block keep" but "which pages of a long KV cache
does this one-token query read". `sparsify.runtime.decode` runs it: per page of ``page_size``
keys it keeps the element-wise minimum and maximum of the keys (updated as the cache fills), and
per decode step and key/value head it reads the sink pages, the recent window and the pages with
the largest upper bound of ``q · k`` — ``Σ_d max(q_d · min_d, q_d · max_d)``, the largest over the
query heads of the group.

Where a static block mask is asked of it (``block_mask``), it answers with every block: it never
sparsifies a prefill.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from sparsify.errors import PatternError
from sparsify.limits import MAX_GRID_BLOCKS
from sparsify.patterns.base import BlockGrid, Pattern, register_pattern

__all__ = ["QueryAwareDecode", "query_aware_decode", "MAX_PAGE_SIZE"]

#: Pages of more keys than this would make the bound meaninglessly loose.
MAX_PAGE_SIZE = 1024


def _check_int(field: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PatternError(f"query_aware_decode: {field} must be an int in [{low}, {high}], got {value!r}")


@register_pattern("query_aware_decode")
@dataclasses.dataclass(frozen=True, repr=False)
class QueryAwareDecode(Pattern):
    """Per decode step and key/value head: sink pages, the recent window and the top pages by the query's bound.

    ``budget`` is the fraction of the cache's pages chosen by the bound (at least ``min_pages``),
    on top of ``sink_pages`` first pages and ``window_pages`` last pages (the one holding the new
    token included). With a ``StaticCache`` the page count is the cache's capacity (the selection
    has one size per compiled graph); with a growing cache it is the current length.

    Example:
        >>> pattern = query_aware_decode(0.1, page_size=32)
        >>> pattern.selected_pages(1024)                 # of 1024 pages: 1 sink + 2 window + 103 by the bound
        106
        >>> from sparsify.patterns import pattern_from_dict
        >>> pattern_from_dict(pattern.to_dict()) == pattern
        True
    """

    budget: float = 0.1
    page_size: int = 32
    sink_pages: int = 1
    window_pages: int = 2
    min_pages: int = 4
    _positional: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 <= self.budget <= 1:
            raise PatternError(f"query_aware_decode: budget must be a fraction in [0, 1], got {self.budget!r}")
        _check_int("page_size", self.page_size, 1, MAX_PAGE_SIZE)
        _check_int("sink_pages", self.sink_pages, 0, MAX_GRID_BLOCKS)
        _check_int("window_pages", self.window_pages, 1, MAX_GRID_BLOCKS)
        _check_int("min_pages", self.min_pages, 0, MAX_GRID_BLOCKS)

    @property
    def is_decode(self) -> bool:
        """True: the pattern selects cached pages per decode step (`sparsify.runtime.decode`)."""
        return True

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        # A prefill is not this pattern's business: every block.
        return torch.ones(grid.q_blocks, grid.k_blocks, dtype=torch.bool)

    def selected_pages(self, pages: int) -> int:
        """How many of ``pages`` cached pages a step reads (sinks, window and the bound's choice; at most all)."""
        chosen = max(self.min_pages, math.ceil(self.budget * pages))
        return min(pages, self.sink_pages + self.window_pages + chosen)


def query_aware_decode(budget: float = 0.1, *, page_size: int = 32, sink_pages: int = 1, window_pages: int = 2,
                       min_pages: int = 4) -> QueryAwareDecode:
    """`QueryAwareDecode`: decode steps read the sinks, the recent window and the ``budget`` of pages the query bounds highest.

    Use it with ``sparsify.attach(model, strategy, decode=query_aware_decode(0.1))``.

    Example:
        >>> query_aware_decode(0.05, page_size=16).page_size
        16
    """
    return QueryAwareDecode(budget, page_size, sink_pages, window_pages, min_pages)
