"""`BlockTables`: per-head lists of kept key blocks, the one format every backend consumes."""

from __future__ import annotations

import dataclasses

import torch


def blocks_for(length: int, block_size: int) -> int:
    """Blocks covering ``length`` tokens (the last one may be partial).

    Example:
        >>> blocks_for(130, 64)
        3
    """
    return -(-length // block_size)


@dataclasses.dataclass
class BlockTables:
    """Which key blocks each query block of each head attends to.

    The format is the compressed-row layout FlexAttention and our kernels use:

    * ``kv_indices`` — ``int32 [heads, q_blocks, max_kept]``: kept key-block indices per query
      block, ascending; slots past ``kv_counts`` repeat the last kept index and are ignored.
    * ``kv_counts`` — ``int32 [heads, q_blocks]``: how many slots of each row are real (>= 1).
    * ``kv_head_index`` — ``int64 [heads]``: the key/value head each query head reads (GQA,
      or a subset of a site's heads).

    Heads here are the *sparse* query heads of one site, in the order the backend receives
    them; ``q_len``/``k_len`` are token counts and ``block_size`` the block edge in tokens. The
    last block of a sequence may be partial. ``causal`` means that inside kept blocks a key
    after the query (top-left aligned, as ``F.scaled_dot_product_attention``) is masked.

    Example:
        >>> masks = torch.tril(torch.ones(4, 4, dtype=torch.bool)).expand(2, 4, 4)
        >>> tables = BlockTables.from_block_masks(masks, block_size=64, q_len=256, k_len=256,
        ...                                       causal=True, kv_head_index=torch.tensor([0, 0]))
        >>> tables.kv_counts.tolist()
        [[1, 2, 3, 4], [1, 2, 3, 4]]
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    kv_head_index: torch.Tensor
    block_size: int
    q_len: int
    k_len: int
    causal: bool

    @property
    def num_heads(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def q_blocks(self) -> int:
        return self.kv_indices.shape[1]

    @property
    def k_blocks(self) -> int:
        return blocks_for(self.k_len, self.block_size)

    @property
    def max_kept(self) -> int:
        return self.kv_indices.shape[2]

    @classmethod
    def from_block_masks(
        cls,
        masks: torch.Tensor,
        *,
        block_size: int,
        q_len: int,
        k_len: int,
        causal: bool,
        kv_head_index: torch.Tensor,
    ) -> "BlockTables":
        """Build tables from boolean block masks ``[heads, q_blocks, k_blocks]``."""
        if masks.dtype != torch.bool or masks.dim() != 3:
            raise ValueError(f"block masks must be bool [heads, q_blocks, k_blocks], got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        heads, q_blocks, k_blocks = masks.shape
        if q_blocks != blocks_for(q_len, block_size) or k_blocks != blocks_for(k_len, block_size):
            raise ValueError(
                f"block masks of shape {tuple(masks.shape)} do not cover q_len={q_len}, "
                f"k_len={k_len} at block_size={block_size}"
            )
        counts = masks.sum(-1)
        if bool((counts == 0).any()):
            head, row = (counts == 0).nonzero()[0].tolist()
            raise ValueError(f"block mask of head {head} keeps no key block for query block {row}")
        max_kept = int(counts.max())
        # Stable sort puts kept blocks first, in ascending order.
        order = torch.sort((~masks).to(torch.int8), dim=-1, stable=True).indices[..., :max_kept]
        slot = torch.arange(max_kept).expand(heads, q_blocks, max_kept)
        last = order.gather(-1, (counts - 1).unsqueeze(-1))
        indices = torch.where(slot < counts.unsqueeze(-1), order, last)
        return cls(
            kv_indices=indices.to(torch.int32).contiguous(),
            kv_counts=counts.to(torch.int32).contiguous(),
            kv_head_index=kv_head_index.to(torch.int64).contiguous(),
            block_size=block_size,
            q_len=q_len,
            k_len=k_len,
            causal=causal,
        )

    def to_block_masks(self) -> torch.Tensor:
        """The boolean ``[heads, q_blocks, k_blocks]`` masks these tables encode."""
        heads, q_blocks, max_kept = self.kv_indices.shape
        device = self.kv_indices.device
        valid = torch.arange(max_kept, device=device) < self.kv_counts.unsqueeze(-1)
        # Padding slots scatter into an extra column that is dropped afterwards.
        target = torch.where(valid, self.kv_indices.long(), self.k_blocks)
        masks = torch.zeros(heads, q_blocks, self.k_blocks + 1, dtype=torch.bool, device=device)
        masks.scatter_(-1, target, True)
        masks = masks[..., : self.k_blocks]
        return masks

    def element_mask(self) -> torch.Tensor:
        """Dense ``bool [heads, q_len, k_len]`` mask (block mask, causal); tests and small sizes only."""
        block = self.to_block_masks()
        mask = block.repeat_interleave(self.block_size, 1).repeat_interleave(self.block_size, 2)
        mask = mask[:, : self.q_len, : self.k_len]
        if self.causal:
            mask = mask & torch.ones(self.q_len, self.k_len, dtype=torch.bool, device=mask.device).tril()
        return mask

    def to(self, device: torch.device | str) -> "BlockTables":
        """A copy on ``device``."""
        return dataclasses.replace(
            self,
            kv_indices=self.kv_indices.to(device),
            kv_counts=self.kv_counts.to(device),
            kv_head_index=self.kv_head_index.to(device),
        )

    def density(self) -> float:
        """Kept blocks over all ``q_blocks * k_blocks`` blocks (causal blocks not discounted)."""
        return float(self.kv_counts.sum()) / (self.num_heads * self.q_blocks * self.k_blocks)
