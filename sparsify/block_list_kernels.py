"""Triton kernel that turns block lists into a runtime mask's index form (`RuntimeBlockMask.from_block_lists`).

One program per (batch, head, query block) row sorts its slots, classifies them (full or partial
block) and ranks the distinct blocks of each kind with one prefix scan, in one launch instead of
the few dozen small torch ops (two sorts among them) of the torch path in `sparsify.block_mask`.
Rows of up to `MAX_LIST_SLOTS` slots. The interpreter (``TRITON_INTERPRET=1``) runs it on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_LIST_SLOTS", "compress_block_lists"]

#: Slots of a block-list row the kernel sorts in one program's registers.
MAX_LIST_SLOTS = 256


@triton.jit
def _first_last_and_counts(left_first, left_first_full, left_first_partial, left_last, left_full, left_partial,
                           right_first, right_first_full, right_first_partial, right_last, right_full, right_partial):
    """Scan step over a sorted row: counts of distinct full / partial blocks (a block on both sides of the seam once)."""
    seam = left_last == right_first
    return (left_first, left_first_full, left_first_partial, right_last,
            left_full + right_full - (seam & (right_first_full != 0)).to(tl.int32),
            left_partial + right_partial - (seam & (right_first_partial != 0)).to(tl.int32))


@triton.jit
def _compress_kernel(BLOCKS, FULL_COUNTS, FULL_INDICES, COUNTS, INDICES,
                     q_blocks, k_blocks, q_len, k_len, q_offset, slots, full_width, partial_width,
                     CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLOTS_PAD: tl.constexpr,
                     FULL_PAD: tl.constexpr, PARTIAL_PAD: tl.constexpr):
    row = tl.program_id(0)
    query_block = row % q_blocks
    slot = tl.arange(0, SLOTS_PAD)
    in_row = slot < slots
    blocks = tl.load(BLOCKS + row.to(tl.int64) * slots + slot, mask=in_row, other=-1).to(tl.int32)
    kept = in_row & (blocks >= 0) & (blocks < k_blocks)
    if CAUSAL:
        query_last = tl.minimum(query_block * BLOCK_SIZE + BLOCK_SIZE - 1, q_len - 1) + q_offset
        kept = kept & (blocks * BLOCK_SIZE <= query_last)
    # Sorted, the kept blocks come first in ascending order and repeats sit side by side; what is not kept sorts last.
    blocks = tl.sort(tl.where(kept, blocks, 2147483647))
    kept = blocks < 2147483647
    full = kept & (blocks * BLOCK_SIZE + BLOCK_SIZE <= k_len)             # inside k_len
    if CAUSAL:
        full = full & (blocks * BLOCK_SIZE + BLOCK_SIZE - 1 <= query_block * BLOCK_SIZE + q_offset)
    partial = kept & (full == 0)
    full_flag, partial_flag = full.to(tl.int32), partial.to(tl.int32)
    # Inclusive counts of distinct full / partial blocks up to each sorted slot: one scan, no pairwise comparison.
    _, _, _, _, full_seen, partial_seen = tl.associative_scan(
        (blocks, full_flag, partial_flag, blocks, full_flag, partial_flag), 0, _first_last_and_counts)
    full_count = tl.minimum(tl.max(full_seen, 0), full_width)
    partial_count = tl.minimum(tl.max(partial_seen, 0), partial_width)
    full_out = FULL_INDICES + row.to(tl.int64) * full_width
    partial_out = INDICES + row.to(tl.int64) * partial_width
    # A repeat lands on its first copy's rank with the same value: the stores agree.
    tl.store(full_out + full_seen - 1, blocks, mask=full & (full_seen <= full_width))
    tl.store(partial_out + partial_seen - 1, blocks, mask=partial & (partial_seen <= partial_width))
    # Slots past a row's count repeat its last (largest) index, 0 for an empty row.
    full_last = tl.where(full_count > 0, tl.max(tl.where(full, blocks, -1), 0), 0)
    partial_last = tl.where(partial_count > 0, tl.max(tl.where(partial, blocks, -1), 0), 0)
    full_slot = tl.arange(0, FULL_PAD)
    partial_slot = tl.arange(0, PARTIAL_PAD)
    tl.store(full_out + full_slot, tl.zeros([FULL_PAD], dtype=tl.int32) + full_last,
             mask=(full_slot >= full_count) & (full_slot < full_width))
    tl.store(partial_out + partial_slot, tl.zeros([PARTIAL_PAD], dtype=tl.int32) + partial_last,
             mask=(partial_slot >= partial_count) & (partial_slot < partial_width))
    tl.store(FULL_COUNTS + row, full_count)
    tl.store(COUNTS + row, partial_count)


def compress_block_lists(blocks: torch.Tensor, *, block_size: int, q_len: int, k_len: int, causal: bool,
                         q_offset: int, full_width: int, partial_width: int) -> tuple[torch.Tensor, ...]:
    """``(full_counts, full_indices, counts, indices)`` (int32) of block lists ``[B, H, Qb, slots]``, in one launch.

    What `RuntimeBlockMask.from_block_lists` computes with a chain of torch ops (classification,
    repeats dropped, ascending order, padding slots repeating the last index): one program per
    row sorts its ``slots`` entries and counts the distinct ones by a scan (before: a pairwise
    comparison, whose work grew with the square of the slots). Rows of up to `MAX_LIST_SLOTS` slots.

    Example:
        >>> lists = torch.tensor([[[[0, -1], [1, 0]]]], device="cuda")                       # doctest: +SKIP
        >>> compress_block_lists(lists, block_size=16, q_len=32, k_len=20, causal=False, q_offset=0,
        ...                      full_width=2, partial_width=1)[0].tolist()                   # doctest: +SKIP
        [[[1, 1]]]
    """
    batch, heads, q_blocks, slots = blocks.shape
    rows = batch * heads * q_blocks
    device = blocks.device
    full_counts = torch.empty(batch, heads, q_blocks, device=device, dtype=torch.int32)
    counts = torch.empty_like(full_counts)
    full_indices = torch.empty(batch, heads, q_blocks, full_width, device=device, dtype=torch.int32)
    indices = torch.empty(batch, heads, q_blocks, partial_width, device=device, dtype=torch.int32)
    slots_pad = max(16, triton.next_power_of_2(slots))
    if rows:
        _compress_kernel[(rows,)](blocks.contiguous(), full_counts, full_indices, counts, indices, q_blocks,
                                  -(-k_len // block_size), q_len, k_len, q_offset, slots, full_width, partial_width,
                                  CAUSAL=bool(causal), BLOCK_SIZE=block_size, SLOTS_PAD=slots_pad,
                                  FULL_PAD=max(16, triton.next_power_of_2(full_width)),
                                  PARTIAL_PAD=max(16, triton.next_power_of_2(partial_width)),
                                  num_warps=4)
    return full_counts, full_indices, counts, indices
