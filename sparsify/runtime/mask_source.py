"""Mask sources: where a site's `RuntimeBlockMask` comes from — static patterns per length, or estimators per input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from sparsify.runtime.block_mask import RuntimeBlockMask, blocks_for

if TYPE_CHECKING:
    from sparsify.patterns import Pattern

__all__ = ["StaticMaskSource", "pattern_block_masks"]


def pattern_block_masks(patterns: Sequence["Pattern"], *, block_size: int, q_len: int, k_len: int, causal: bool,
                        q_offset: int = 0) -> torch.Tensor:
    """``bool [len(patterns), q_blocks, k_blocks]`` (CPU): each pattern's kept blocks for a query chunk at ``q_offset``.

    With ``q_offset = 0`` this is ``pattern.block_mask`` itself. Otherwise the pattern is laid
    over the whole query range ``[0, q_offset + q_len)`` and each query block of the chunk keeps
    what the (at most two) pattern rows it overlaps keep — so a decode step or a prefill chunk
    sees the rows of the full-length pattern at its position. When the chunk starts inside a
    block, a query block that straddles two pattern rows keeps their union: never less than the
    full-length call keeps for those queries.

    Example:
        >>> from sparsify import patterns
        >>> pattern_block_masks([patterns.sliding_window(16)], block_size=16, q_len=16, k_len=64,
        ...                     causal=True, q_offset=48).int().tolist()
        [[[0, 0, 1, 1]]]
    """
    q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
    if not patterns:
        return torch.zeros(0, q_blocks, k_blocks, dtype=torch.bool)
    if q_offset == 0:
        return torch.stack([p.block_mask(q_blocks, k_blocks, block_size=block_size, causal=causal, q_len=q_len,
                                         k_len=k_len) for p in patterns])
    total = q_offset + q_len
    rows = torch.stack([p.block_mask(blocks_for(total, block_size), k_blocks, block_size=block_size, causal=causal,
                                     q_len=total, k_len=k_len) for p in patterns])
    first = (q_offset + torch.arange(q_blocks) * block_size) // block_size
    last = (q_offset + torch.clamp((torch.arange(q_blocks) + 1) * block_size, max=q_len) - 1) // block_size
    return rows[:, first] | rows[:, last]


class StaticMaskSource:
    """The runtime masks of heads with static patterns: a function of the lengths and query offset only.

    Built masks are not cached here: the module that owns the site keeps a bounded cache
    (`sparsify.runtime.SparseAttention`).

    Example:
        >>> from sparsify import patterns
        >>> source = StaticMaskSource([patterns.sliding_window(32)], block_size=32, causal=False,
        ...                           kv_head_index=torch.tensor([0]))
        >>> source.mask(q_len=128, k_len=128, device="cpu").kept_counts().tolist()
        [[[2, 3, 3, 2]]]
    """

    def __init__(self, patterns: Sequence["Pattern"], *, block_size: int, causal: bool, kv_head_index: torch.Tensor):
        if len(patterns) != kv_head_index.numel():
            raise ValueError(f"{len(patterns)} patterns but {kv_head_index.numel()} key/value head indices")
        self.patterns = list(patterns)
        self.block_size = block_size
        self.causal = causal
        self.kv_head_index = kv_head_index.to(torch.int64)

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    def mask(self, *, q_len: int, k_len: int, q_offset: int = 0, device: torch.device | str) -> RuntimeBlockMask:
        """The runtime mask for these lengths, built on ``device``."""
        kept = pattern_block_masks(self.patterns, block_size=self.block_size, q_len=q_len, k_len=k_len,
                                   causal=self.causal, q_offset=q_offset)
        return RuntimeBlockMask.from_block_masks(kept.to(device), block_size=self.block_size, q_len=q_len, k_len=k_len,
                                                 causal=self.causal, kv_head_index=self.kv_head_index,
                                                 q_offset=q_offset)
