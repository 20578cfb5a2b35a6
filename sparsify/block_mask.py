"""`RuntimeBlockMask`: the one description of kept key blocks that every backend and the ONNX lowering consume."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Sequence

import torch

#: Whether Triton is installed (asked once: importlib's finder is a graph break inside torch.compile).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

__all__ = ["pattern_block_masks", "RuntimeBlockMask", "block_geometry", "block_token_bounds", "blocks_for", "causal_boundary_blocks",
           "causal_element_mask"]


def blocks_for(length: Any, block_size: int) -> Any:
    """Blocks covering ``length`` tokens (the last one may be partial); ``length`` may be a symbolic size.

    Written ``(length + block_size - 1) // block_size``: exact for non-negative lengths, and it
    lowers to ONNX's truncating ``Div`` correctly when the length is symbolic.

    Example:
        >>> blocks_for(130, 64)
        3
    """
    return (length + block_size - 1) // block_size


def block_token_bounds(q_len: Any, k_len: Any, block_size: int, q_offset: int = 0,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """``(query_first, query_last, key_first, key_last)``: the first and last token of every block, int64.

    The one definition of which tokens a block covers. Query block ``i`` covers the tokens
    ``[i * block_size, min((i + 1) * block_size, q_len))`` at absolute positions ``q_offset +``
    those (``[q_blocks, 1]`` each); key block ``j`` likewise up to ``k_len`` (``[1, k_blocks]``).
    The lengths may be symbolic sizes (any-length export): only ``arange``, arithmetic and
    ``clamp`` of them.

    Example:
        >>> query_first, query_last, key_first, key_last = block_token_bounds(100, 64, 64, q_offset=4)
        >>> query_first.flatten().tolist(), query_last.flatten().tolist(), key_last.flatten().tolist()
        ([4, 68], [67, 103], [63])
    """
    query_first = torch.arange(blocks_for(q_len, block_size), device=device).unsqueeze(1) * block_size
    query_last = (query_first + block_size - 1).clamp(max=q_len - 1)
    key_first = torch.arange(blocks_for(k_len, block_size), device=device).unsqueeze(0) * block_size
    key_last = (key_first + block_size - 1).clamp(max=k_len - 1)
    if q_offset:
        query_first, query_last = query_first + q_offset, query_last + q_offset
    return query_first, query_last, key_first, key_last


def causal_element_mask(q_len: int, k_len: int, q_offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``bool [q_len, k_len]``: query ``i`` (at absolute position ``q_offset + i``) sees keys ``<= q_offset + i``.

    ``q_offset = 0`` is the top-left alignment of ``F.scaled_dot_product_attention(is_causal=True)``;
    ``q_offset = k_len - q_len`` the bottom-right alignment of a query chunk at the end of a
    longer key sequence (decode, chunked prefill).

    Example:
        >>> causal_element_mask(2, 3, q_offset=1).int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    queries = torch.arange(q_len, device=device).unsqueeze(1) + q_offset
    return torch.arange(k_len, device=device).unsqueeze(0) <= queries


@dataclasses.dataclass(frozen=True, eq=False)
class RuntimeBlockMask:
    """Kept key blocks of every query block of a set of heads, split into *full* and *partial* blocks.

    The layout is FlexAttention's ``BlockMask``: compressed rows with a leading
    ``[batch, heads]`` (``batch`` is 1 when the mask is the same for every batch element, or the
    batch size for masks estimated per input).

    * ``full_kv_num_blocks`` ``int32 [B, H, q_blocks]`` and ``full_kv_indices``
      ``int32 [B, H, q_blocks, full_width]``: kept key blocks that need no element mask — whole
      blocks inside ``k_len`` and, at causal sites, entirely visible to every query of the block.
    * ``kv_num_blocks`` / ``kv_indices`` (``partial_width`` slots): kept blocks that need one —
      the partial last key block, blocks crossing the causal diagonal. (A user ``attn_mask`` is a
      per-call input on top: a backend given one applies it to every block.)
    * Indices of a row ascend; slots past the row's count repeat its last index (0 for empty
      rows) and are never read as data.
    * ``kv_head_index`` ``int64 [H]``: the key/value head each query head reads (GQA, or a
      subset of a site's heads).
    * ``q_offset``: query ``i`` sits at absolute position ``q_offset + i``; ``causal`` hides keys
      after that position. 0 is SDPA's top-left alignment, ``k_len - q_len`` bottom-right.
    * ``per_input``: built for one call from its inputs (input-adaptive patterns); backends then
      take a path with no host work per call (fixed widths, no device-to-host reads).
    * ``kv_heads``: ``kv_head_index`` as host ints (set when it was known on the host), so that a
      backend's host work never reads it back from the device.

    Block classification happens here, once, on the mask's device; no backend re-derives it.
    Build one with `from_block_masks` (from boolean kept-block masks, e.g. a pattern's) or
    `from_block_lists` (from lists of kept key blocks per query block, e.g. an estimator's).

    Example:
        >>> kept = torch.ones(1, 3, 3, dtype=torch.bool)
        >>> mask = RuntimeBlockMask.from_block_masks(kept, block_size=64, q_len=160, k_len=160, causal=True)
        >>> mask.full_kv_num_blocks.tolist(), mask.kv_num_blocks.tolist()
        ([[[0, 1, 2]]], [[[1, 1, 1]]])
        >>> print(mask.to_string())
        RuntimeBlockMask(heads=1, q_len=160, k_len=160, block_size=64, causal, density 1.000: 3 full, 3 partial)
        head 0
          ░
          █░
          ██░
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    kv_head_index: torch.Tensor
    block_size: int
    q_len: int
    k_len: int
    causal: bool
    q_offset: int = 0
    per_input: bool = False
    kv_heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {self.q_offset}")
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            counts = getattr(self, name)
            if counts.dim() != 3 or counts.shape[-1] != blocks_for(self.q_len, self.block_size):
                raise ValueError(f"{name} must be [batch, heads, {blocks_for(self.q_len, self.block_size)} q_blocks], "
                                 f"got {tuple(counts.shape)}")
        for name, counts_name in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks")):
            indices, counts = getattr(self, name), getattr(self, counts_name)
            if indices.dim() != 4 or tuple(indices.shape[:3]) != tuple(counts.shape):
                raise ValueError(f"{name} must be [batch, heads, q_blocks, width] matching {counts_name} "
                                 f"{tuple(counts.shape)}, got {tuple(indices.shape)}")
        if tuple(self.kv_head_index.shape) != (self.num_heads,):
            raise ValueError(f"kv_head_index must be [{self.num_heads} heads], got {tuple(self.kv_head_index.shape)}")

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_block_masks(
        cls,
        kept: torch.Tensor,
        *,
        block_size: int,
        q_len: int,
        k_len: int,
        causal: bool,
        kv_head_index: torch.Tensor | None = None,
        q_offset: int = 0,
        width: int | None = None,
        per_input: bool = False,
    ) -> "RuntimeBlockMask":
        """Classify and compress boolean kept-block masks ``[H, q_blocks, k_blocks]`` or ``[B, H, q_blocks, k_blocks]``.

        Blocks a causal mask hides entirely are dropped; the rest are split into full and
        partial blocks. Runs on ``kept``'s device. ``width`` fixes the slot count of both index
        tensors (``None``: the widest row, which costs one device-to-host read; give it for masks
        built per call, e.g. input-adaptive ones, so that nothing waits for the device).
        ``kv_head_index`` defaults to one key/value head per query head. ``per_input`` marks a
        mask built for one call (see the class docstring).

        Example:
            >>> kept = torch.tensor([[[True, False], [True, True]]])
            >>> mask = RuntimeBlockMask.from_block_masks(kept, block_size=16, q_len=32, k_len=20, causal=False)
            >>> mask.full_kv_num_blocks.tolist(), mask.kv_num_blocks.tolist()
            ([[[1, 1]]], [[[0, 1]]])
        """
        if kept.dtype != torch.bool or kept.dim() not in (3, 4):
            raise ValueError(f"kept-block masks must be bool [heads, q_blocks, k_blocks] or [batch, heads, q_blocks, "
                             f"k_blocks], got {kept.dtype} {tuple(kept.shape)}")
        if kept.dim() == 3:
            kept = kept.unsqueeze(0)
        q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
        if tuple(kept.shape[2:]) != (q_blocks, k_blocks):
            raise ValueError(f"kept-block masks of shape {tuple(kept.shape)} do not cover q_len={q_len}, k_len={k_len} "
                             f"at block_size={block_size} ({q_blocks} x {k_blocks} blocks)")
        device = kept.device
        visible, full = block_geometry(q_len, k_len, block_size, causal, q_offset, device)
        kept = kept & visible
        full_kept = kept & full
        partial_kept = kept & ~full
        if width is None and kept.numel() == 0:               # no heads (a site whose sparse heads are all adaptive)
            full_width = partial_width = 1
        elif width is None:
            widths = torch.stack([full_kept.sum(-1).amax(), partial_kept.sum(-1).amax()]).tolist()
            full_width, partial_width = (max(1, int(w)) for w in widths)
        else:
            full_width = partial_width = max(1, min(int(width), k_blocks))
        full_counts, full_indices = _compress(full_kept, full_width)
        counts, indices = _compress(partial_kept, partial_width)
        return cls._assemble(counts, indices, full_counts, full_indices, kv_head_index, kept.shape[1], block_size,
                             q_len, k_len, causal, q_offset, per_input)

    @classmethod
    def _assemble(cls, counts, indices, full_counts, full_indices, kv_head_index: torch.Tensor | None, heads: int,
                  block_size: int, q_len: int, k_len: int, causal: bool, q_offset: int,
                  per_input: bool) -> "RuntimeBlockMask":
        """The mask of compressed index tensors; ``kv_head_index`` defaults to one key/value head per query head."""
        if kv_head_index is None:
            kv_head_index = torch.arange(heads)
        host = tuple(kv_head_index.tolist()) if kv_head_index.device.type == "cpu" else None
        # The head map goes to the device without waiting for it (no stream sync: masks are built per call too).
        kv_head_index = kv_head_index.to(device=counts.device, dtype=torch.int64, non_blocking=True)
        return cls(counts, indices, full_counts, full_indices, kv_head_index, block_size, q_len, k_len, bool(causal),
                   int(q_offset), bool(per_input), host)

    @classmethod
    def from_block_lists(
        cls,
        blocks: torch.Tensor,
        *,
        block_size: int,
        q_len: int,
        k_len: int,
        causal: bool,
        kv_head_index: torch.Tensor | None = None,
        q_offset: int = 0,
        per_input: bool = False,
    ) -> "RuntimeBlockMask":
        """Classify and compress lists of kept key blocks ``int [B, H, q_blocks, slots]`` (no ``[q_blocks, k_blocks]`` tensor).

        Each row lists the key blocks its query block keeps, in any order, repeats allowed;
        entries outside ``[0, k_blocks)`` (e.g. ``-1``) stand for nothing. Hidden blocks are
        dropped and the rest split into full and partial blocks as `from_block_masks` does, with
        one sort of ``slots`` entries per row. The widths come from the shape alone (full:
        ``slots``; partial: at most 3 causal blocks, 1 otherwise), so nothing waits for the
        device: the form for masks estimated per call. The same blocks as `from_block_masks` of
        the scattered lists.

        Example:
            >>> lists = torch.tensor([[[[0, -1], [1, 0]]]])
            >>> mask = RuntimeBlockMask.from_block_lists(lists, block_size=16, q_len=32, k_len=20, causal=False)
            >>> mask.full_kv_num_blocks.tolist(), mask.kv_num_blocks.tolist(), mask.kv_indices.tolist()
            ([[[1, 1]]], [[[0, 1]]], [[[[0], [1]]]])
        """
        if blocks.dim() != 4 or blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
            raise ValueError(f"kept-block lists must be integer [batch, heads, q_blocks, slots], got {blocks.dtype} "
                             f"{tuple(blocks.shape)}")
        q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
        if blocks.shape[2] != q_blocks:
            raise ValueError(f"kept-block lists of shape {tuple(blocks.shape)} do not cover q_len={q_len} at "
                             f"block_size={block_size} ({q_blocks} query blocks)")
        device = blocks.device
        if blocks.shape[-1] == 0:
            blocks = torch.full((*blocks.shape[:3], 1), -1, dtype=blocks.dtype, device=device)
        slots = blocks.shape[-1]
        full_width = max(1, min(slots, k_blocks))
        # Partial blocks of a row: the last key block when it is cut, and at most two crossing the causal boundary.
        partial_width = max(1, min(slots, k_blocks, 3 if causal else 1))
        if _fused_compress_serves(blocks):      # the same, in one Triton launch (sparsify.block_list_kernels)
            from sparsify.block_list_kernels import compress_block_lists

            full_counts, full_indices, counts, indices = compress_block_lists(
                blocks, block_size=block_size, q_len=q_len, k_len=k_len, causal=causal, q_offset=q_offset,
                full_width=full_width, partial_width=partial_width)
        else:
            blocks = blocks.long()
            # Each listed block's class, read off the one causal classification (`block_geometry`).
            visible, full = block_geometry(q_len, k_len, block_size, causal, q_offset, device)
            listed = blocks.clamp(0, k_blocks - 1)
            grid = (*blocks.shape[:2], q_blocks, k_blocks)
            kept = (blocks >= 0) & (blocks < k_blocks) & visible.expand(grid).gather(-1, listed)
            full = full.expand(grid).gather(-1, listed)
            full_counts, full_indices = _compress_lists(blocks, kept & full, k_blocks, full_width)
            counts, indices = _compress_lists(blocks, kept & ~full, k_blocks, partial_width)
        return cls._assemble(counts, indices, full_counts, full_indices, kv_head_index, blocks.shape[1], block_size,
                             q_len, k_len, causal, q_offset, per_input)

    @classmethod
    def dense(cls, heads: int, *, block_size: int, q_len: int, k_len: int, causal: bool, q_offset: int = 0,
              kv_head_index: torch.Tensor | None = None, device: torch.device | str = "cpu") -> "RuntimeBlockMask":
        """Every block kept (what dense attention computes, causal blocks above the diagonal aside).

        Example:
            >>> RuntimeBlockMask.dense(2, block_size=32, q_len=64, k_len=64, causal=False).density()
            1.0
        """
        kept = torch.ones(1, heads, blocks_for(q_len, block_size), blocks_for(k_len, block_size), dtype=torch.bool,
                          device=device)
        return cls.from_block_masks(kept, block_size=block_size, q_len=q_len, k_len=k_len, causal=causal,
                                    kv_head_index=kv_head_index, q_offset=q_offset)

    # --- shape ----------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        """1 when the mask is shared by every batch element, else the batch size."""
        return self.kv_num_blocks.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def k_blocks(self) -> int:
        return blocks_for(self.k_len, self.block_size)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def full_width(self) -> int:
        return self.full_kv_indices.shape[-1]

    @property
    def partial_width(self) -> int:
        return self.kv_indices.shape[-1]

    # --- views ----------------------------------------------------------------------------------

    def kept_counts(self) -> torch.Tensor:
        """``int32 [B, H, q_blocks]``: full plus partial kept blocks of every row."""
        return self.full_kv_num_blocks + self.kv_num_blocks

    def to_block_masks(self) -> torch.Tensor:
        """``bool [B, H, q_blocks, k_blocks]``: every kept block (full or partial)."""
        return self.full_block_masks() | self.partial_block_masks()

    def full_block_masks(self) -> torch.Tensor:
        """``bool [B, H, q_blocks, k_blocks]``: the kept blocks that need no element mask."""
        return _expand(self.full_kv_num_blocks, self.full_kv_indices, self.k_blocks)

    def partial_block_masks(self) -> torch.Tensor:
        """``bool [B, H, q_blocks, k_blocks]``: the kept blocks that need an element mask."""
        return _expand(self.kv_num_blocks, self.kv_indices, self.k_blocks)

    def boundary_block_masks(self) -> torch.Tensor:
        """``bool [B, H, q_blocks, k_blocks]``: the kept partial blocks that cross the causal boundary.

        The other partial blocks hold keys past ``k_len`` (the last key block); see
        `causal_boundary_blocks`. All False at non-causal sites.
        """
        partial = self.partial_block_masks()
        if not self.causal:
            return torch.zeros_like(partial)
        return partial & causal_boundary_blocks(self.q_len, self.k_len, self.block_size, self.q_offset, self.device)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [B, H, q_blocks], indices [B, H, q_blocks, full_width + partial_width])``: all kept blocks ascending.

        For kernels that take one list and mask every block (e.g. when an ``attn_mask`` is given).
        """
        return _compress(self.to_block_masks(), self.full_width + self.partial_width)

    def element_mask(self) -> torch.Tensor:
        """``bool [B, H, q_len, k_len]``: which (query, key) pairs attention may use. Tests and small sizes only.

        Example:
            >>> mask = RuntimeBlockMask.dense(1, block_size=2, q_len=3, k_len=3, causal=True)
            >>> mask.element_mask()[0, 0].int().tolist()
            [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
        """
        bs = self.block_size
        blocks = self.to_block_masks()
        element = blocks.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, : self.q_len, : self.k_len]
        if self.causal:
            element = element & causal_element_mask(self.q_len, self.k_len, self.q_offset, self.device)
        return element

    def density(self) -> float:
        """Kept blocks over the blocks dense attention computes (the causal-visible ones at causal sites).

        The one meaning of density everywhere (patterns, strategy summary, report): kept work
        over the work of a dense call with the same causality. `block_fraction` divides by every
        block instead.

        Example:
            >>> RuntimeBlockMask.dense(1, block_size=16, q_len=64, k_len=64, causal=True).density()
            1.0
        """
        visible, _ = block_geometry(self.q_len, self.k_len, self.block_size, self.causal, self.q_offset, "cpu")
        total = self.batch * self.num_heads * int(visible.sum())
        return float(self.kept_counts().sum()) / max(total, 1)

    def block_fraction(self) -> float:
        """Kept blocks over all ``heads * q_blocks * k_blocks`` blocks (averaged over the batch), causal or not.

        Example:
            >>> RuntimeBlockMask.dense(1, block_size=16, q_len=64, k_len=64, causal=True).block_fraction()
            0.625
        """
        total = self.batch * self.num_heads * self.q_blocks * self.k_blocks
        return float(self.kept_counts().sum()) / max(total, 1)

    def kept_blocks_per_head(self) -> list[float]:
        """Kept blocks of each head, averaged over the batch (what the cost model prices)."""
        return (self.kept_counts().sum(-1).double().mean(0)).tolist()

    def to(self, device: torch.device | str) -> "RuntimeBlockMask":
        """A copy on ``device`` (the same object when it is there already)."""
        device = torch.device(device)
        if self.device == device or (device.index is None and self.device.type == device.type):
            return self
        tensors = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        return dataclasses.replace(self, **tensors)

    def select_heads(self, heads: torch.Tensor | list[int]) -> "RuntimeBlockMask":
        """The mask of a subset of its heads (in the given order).

        Example:
            >>> mask = RuntimeBlockMask.dense(4, block_size=16, q_len=32, k_len=32, causal=False)
            >>> mask.select_heads([1, 3]).num_heads
            2
        """
        index = torch.as_tensor(heads, dtype=torch.long, device=self.device)
        tensors = {name: getattr(self, name).index_select(1, index) for name in _TENSOR_FIELDS if name != "kv_head_index"}
        host = None
        if self.kv_heads is not None and not isinstance(heads, torch.Tensor):
            host = tuple(self.kv_heads[h] for h in heads)
        return dataclasses.replace(self, **tensors, kv_head_index=self.kv_head_index.index_select(0, index),
                                   kv_heads=host)

    def batch_element(self, index: int) -> "RuntimeBlockMask":
        """The mask of one batch element, recompressed to its own widest row (a host read: for CPU paths)."""
        if self.batch == 1:
            return dataclasses.replace(self, per_input=False)
        return RuntimeBlockMask.from_block_masks(
            self.to_block_masks()[index:index + 1], block_size=self.block_size, q_len=self.q_len, k_len=self.k_len,
            causal=self.causal, kv_head_index=self.kv_head_index.cpu() if self.kv_heads is not None else
            self.kv_head_index, q_offset=self.q_offset).to(self.device)

    # --- display --------------------------------------------------------------------------------

    def to_string(self, *, max_heads: int = 4, max_blocks: int = 64) -> str:
        """A text picture per head: ``█`` full block, ``░`` partial block, blank skipped (batch element 0).

        Large grids are cut at ``max_blocks`` rows and columns, and at ``max_heads`` heads.
        """
        header = (f"RuntimeBlockMask(heads={self.num_heads}{f', batch={self.batch}' if self.batch > 1 else ''}, "
                  f"q_len={self.q_len}, k_len={self.k_len}, block_size={self.block_size}"
                  f"{', causal' if self.causal else ''}{f', q_offset={self.q_offset}' if self.q_offset else ''}, "
                  f"density {self.density():.3f}: {int(self.full_kv_num_blocks.sum())} full, "
                  f"{int(self.kv_num_blocks.sum())} partial)")
        lines = [header]
        full = self.full_block_masks()[0].cpu()
        partial = self.partial_block_masks()[0].cpu()
        for head in range(min(self.num_heads, max_heads)):
            lines.append(f"head {head}")
            for row in range(min(self.q_blocks, max_blocks)):
                cells = ["█" if full[head, row, col] else "░" if partial[head, row, col] else " "
                         for col in range(min(self.k_blocks, max_blocks))]
                lines.append(("  " + "".join(cells)).rstrip() + (" …" if self.k_blocks > max_blocks else ""))
            if self.q_blocks > max_blocks:
                lines.append(f"  … {self.q_blocks - max_blocks} more rows")
        if self.num_heads > max_heads:
            lines.append(f"… {self.num_heads - max_heads} more heads")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_string().splitlines()[0]


_TENSOR_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "kv_head_index")


def block_geometry(q_len: Any, k_len: Any, block_size: int, causal: bool, q_offset: int = 0,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(visible, full)``, both ``bool [q_blocks, k_blocks]``: blocks holding some visible pair / only visible pairs.

    The one causal classification of blocks (bottom-right aligned by ``q_offset``): a block is
    visible when its first key is at or before the last query of the query block (absolute
    positions), and full when it lies inside ``k_len`` and, at causal sites, its last key is at
    or before the first query of the query block. Patterns, runtime masks, the search and the
    ONNX lowering all read it; the lengths may be symbolic sizes (any-length export).

    Example:
        >>> visible, full = block_geometry(4, 4, 2, True, 0, "cpu")
        >>> visible.int().tolist(), full.int().tolist()
        ([[1, 0], [1, 1]], [[0, 0], [1, 0]])
    """
    query_first, query_last, key_first, key_last = block_token_bounds(q_len, k_len, block_size, q_offset, device)
    complete = key_last - key_first == block_size - 1            # the block lies inside k_len
    if not causal:
        shape = (query_first.shape[0], key_first.shape[1])
        return torch.ones(shape, dtype=torch.bool, device=device), complete.expand(shape)
    visible = key_first <= query_last
    full = complete & (key_last <= query_first)
    return visible, full


def causal_boundary_blocks(q_len: Any, k_len: Any, block_size: int, q_offset: int = 0,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """``bool [q_blocks, k_blocks]``: the causal blocks that are visible but not entirely (they cross the boundary).

    With `block_geometry`'s ``(visible, full)``, the partial blocks of a causal mask are these
    plus the partial last key block; at query offset 0 with equal block sizes they are the
    diagonal blocks ``(i, i)``.

    Example:
        >>> causal_boundary_blocks(4, 4, 2).int().tolist()
        [[1, 0], [0, 1]]
    """
    query_first, query_last, key_first, key_last = block_token_bounds(q_len, k_len, block_size, q_offset, device)
    return (key_first <= query_last) & (key_last > query_first)


def _compress(kept: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts int32 [...], indices int32 [..., width])`` of the kept columns of ``kept [..., k_blocks]``, ascending.

    Rows keeping more than ``width`` blocks are cut to their first ``width``.
    """
    k_blocks = kept.shape[-1]
    column = torch.arange(k_blocks, device=kept.device)
    # Kept columns sort first (key = column), the others after (key = k_blocks + column).
    order = torch.where(kept, column, column + k_blocks)
    order = order.topk(min(width, k_blocks), dim=-1, largest=False, sorted=True).values
    counts = kept.sum(-1).clamp(max=width)
    slot = torch.arange(order.shape[-1], device=kept.device)
    last = order.gather(-1, (counts - 1).clamp(min=0).unsqueeze(-1))
    indices = torch.where(slot < counts.unsqueeze(-1), order, torch.where(counts.unsqueeze(-1) > 0, last, 0))
    if indices.shape[-1] < width:                                # k_blocks < width: pad the slots
        indices = torch.cat([indices, indices[..., -1:].expand(*indices.shape[:-1], width - indices.shape[-1])], -1)
    return counts.to(torch.int32).contiguous(), indices.to(torch.int32).contiguous()


def _fused_compress_serves(blocks: torch.Tensor) -> bool:
    """Whether `from_block_lists` compresses ``blocks`` with the Triton kernel (CUDA, Triton installed, few slots)."""
    if blocks.device.type != "cuda" or not _TRITON_INSTALLED:
        return False
    from sparsify.block_list_kernels import MAX_LIST_SLOTS

    return blocks.shape[-1] <= MAX_LIST_SLOTS


def _compress_lists(blocks: torch.Tensor, kept: torch.Tensor, k_blocks: int, width: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """`_compress` of block lists: ``(counts, indices)`` of the distinct ``blocks [..., slots]`` where ``kept``, ascending."""
    ordered = torch.where(kept, blocks, k_blocks).sort(-1).values          # kept ascending, then the k_blocks filler
    distinct = ordered < k_blocks
    distinct[..., 1:] &= ordered[..., 1:] != ordered[..., :-1]
    ordered = torch.where(distinct, ordered, k_blocks).sort(-1).values[..., :width]
    counts = distinct.sum(-1).clamp(max=width)
    slot = torch.arange(width, device=blocks.device)
    last = ordered.gather(-1, (counts - 1).clamp(min=0).unsqueeze(-1))
    indices = torch.where(slot < counts.unsqueeze(-1), ordered, torch.where(counts.unsqueeze(-1) > 0, last, 0))
    return counts.to(torch.int32).contiguous(), indices.to(torch.int32).contiguous()


def _expand(counts: torch.Tensor, indices: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """The boolean ``[..., k_blocks]`` masks of compressed rows."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    target = torch.where(valid, indices.long(), k_blocks)        # padding scatters into a dropped column
    masks = torch.zeros(*indices.shape[:-1], k_blocks + 1, dtype=torch.bool, device=indices.device)
    masks.scatter_(-1, target, True)
    return masks[..., :k_blocks]


def pattern_block_masks(patterns: Sequence[Any], *, block_size: int, q_len: int, k_len: int, causal: bool,
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
    query_first, query_last, _, _ = block_token_bounds(q_len, k_len, block_size, q_offset)
    return rows[:, query_first.flatten() // block_size] | rows[:, query_last.flatten() // block_size]
