"""Input-adaptive candidates for the search: the parameter grid, and their masks on each held-out batch.

The search scores adaptive candidates like static ones — by the real output error on held-out
batches — but with the masks each candidate produces on *those* inputs (estimated exactly as the
compiled module will, by `sparsify.runtime.mask_source.AdaptiveMaskSource`), and prices them with
the kept blocks they really keep there (mean over batches) plus the estimation itself.
"""

from __future__ import annotations

import torch

from sparsify import patterns as pattern_library
from sparsify.patterns import Pattern
from sparsify.runtime.block_mask import block_geometry, blocks_for
from sparsify.runtime.mask_source import AdaptiveMaskSource
from sparsify.site import AttentionSite

__all__ = ["AdaptiveCandidateMasks", "adaptive_candidates", "MIN_QUERY_BLOCKS"]

#: Below this many query blocks a per-input estimate has too little to choose from to pay.
MIN_QUERY_BLOCKS = 4


def adaptive_candidates(site: AttentionSite, block_size: int) -> list[Pattern]:
    """The input-adaptive patterns every head of ``site`` is scored with (none for short sequences).

    Pooled coverage at several coverages and temperatures (with a sink block), and estimated
    vertical-slash at several budgets; the search keeps a head's adaptive choice only where it
    is cheaper than the best static one at the same error.

    Example:
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=4096, k_len=4096, causal=True)
        >>> len(adaptive_candidates(site, 64)) > 0
        True
    """
    if blocks_for(site.q_len, block_size) < MIN_QUERY_BLOCKS or blocks_for(site.k_len, block_size) < MIN_QUERY_BLOCKS:
        return []
    found: list[Pattern] = []
    # Block means are less spread than their tokens: lower temperatures undo the estimate's sharpness.
    for coverage in (0.9, 0.95, 0.98):
        for temperature in (1.0, 0.5, 0.25):
            found.append(pattern_library.pooled_coverage(coverage, sink_blocks=1, temperature=temperature))
    budgets = sorted({max(1.0 / blocks_for(site.k_len, block_size), fraction) for fraction in (0.02, 0.05, 0.1, 0.2)})
    for fraction in budgets:
        found.append(pattern_library.estimated_vertical_slash(vertical=fraction, slash=fraction, sink_blocks=1))
    return found


class AdaptiveCandidateMasks:
    """The masks of a site's adaptive candidates on one batch: one vectorised estimate per candidate for all heads.

    Example:
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=1, head_dim=8, q_len=256, k_len=256, causal=True)
        >>> candidates = AdaptiveCandidateMasks(site, 32, [pattern_library.pooled_coverage(0.9)])
        >>> q, k = torch.randn(3, 2, 256, 8), torch.randn(3, 1, 256, 8)
        >>> masks, kept = candidates.masks(q, k)
        >>> masks[0].shape, kept.shape
        (torch.Size([1, 3, 8, 8]), torch.Size([1, 3, 2]))
    """

    def __init__(self, site: AttentionSite, block_size: int, candidates: list[Pattern]):
        self.site = site
        self.block_size = block_size
        self.candidates = list(candidates)
        group = site.gqa_group_size
        kv_head_index = torch.arange(site.num_heads) // group
        self.sources = [AdaptiveMaskSource([pattern] * site.num_heads, block_size=block_size, causal=site.causal,
                                           kv_head_index=kv_head_index, self_attention=site.is_self_attention)
                        for pattern in self.candidates]

    def masks(self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(per head: bool [candidates, B, Qb, Kb], work float64 [candidates, B, H])`` for this batch.

        ``work`` is each mask's kept blocks over the blocks dense attention computes at these
        lengths (causal-trimmed), the unit static candidates' work is measured in.
        """
        if not self.candidates:
            return [], torch.zeros(0)
        kept_masks = []
        for source in self.sources:
            mask = source.mask(q, k, attn_mask=attn_mask, scale=scale)
            kept_masks.append(mask.to_block_masks())                     # [B, H, Qb, Kb]
        stacked = torch.stack(kept_masks)                                # [C, B, H, Qb, Kb]
        visible, _ = block_geometry(q.shape[2], k.shape[2], self.block_size, self.site.causal, 0, q.device)
        work = stacked.sum((-2, -1)).to(torch.float64) / max(int(visible.sum()), 1)
        return [stacked[:, :, head] for head in range(q.shape[1])], work
