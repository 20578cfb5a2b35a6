"""Candidates of the search: per head the patterns to score (static families, profile-read tables, input-adaptive
estimators), their runtime masks, and the profile prefilter.

Input-adaptive candidates are scored like static ones — by the real output error on held-out
batches — but with the masks each candidate produces on *those* inputs (estimated exactly as the
compiled module will, by `sparsify.runtime.mask_source.AdaptiveMaskSource`), and priced with the
kept blocks they really keep there (mean over batches) plus the estimation itself.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sparsify import patterns as pattern_library
from sparsify.errors import PatternError
from sparsify.patterns import Pattern, causal_block_mask
from sparsify.profile import BlockMassProfile
from sparsify.block_mask import RuntimeBlockMask, block_geometry, blocks_for
from sparsify.runtime.mask_source import AdaptiveMaskSource
from sparsify.site import AttentionSite

__all__ = ["AdaptiveCandidateMasks", "MIN_QUERY_BLOCKS", "PROFILE_TABLE_DENSITIES", "PROFILE_TABLE_KINDS", "SiteMasks",
           "adaptive_candidates", "candidate_patterns", "is_skip", "prefilter_candidates", "profile_top_k"]


def _geometric(low: int, high: int, factor: float = 2.0) -> list[int]:
    values, value = [], float(low)
    while value <= high:
        values.append(int(round(value)))
        value *= factor
    return sorted(set(values))


def candidate_patterns(site: AttentionSite, block_size: int, profile: BlockMassProfile | None) -> list[list[Pattern]]:
    """Per head, the candidate patterns to score (dense first, then sparse families).

    Families: sliding window, A-shape (sinks + window), multi-diagonal with periods read off the
    profile's strongest off-diagonal offsets, vertical-slash from the profile's strongest
    columns and diagonals, static block tables read off the profile (`profile_top_k` at
    `PROFILE_TABLE_DENSITIES`), strided, radial, power-of-two,
    and skip.
    """
    length = max(site.q_len, site.k_len)
    shared: list[Pattern] = []
    windows = _geometric(block_size // 2, length, math.sqrt(2))
    for window in windows:
        shared.append(pattern_library.sliding_window(window))
        shared.append(pattern_library.a_shape(block_size, window))
    shared.append(pattern_library.attention_sinks(block_size))
    for stride in _geometric(2 * block_size, length // 2):
        shared.append(pattern_library.strided(stride, block_size) | pattern_library.sliding_window(block_size))
    for window in _geometric(block_size, length // 4):
        shared.append(pattern_library.radial(window, window))
    shared.append(pattern_library.power_of_two(width=block_size // 2))
    shared.append(pattern_library.skip())
    per_head: list[list[Pattern]] = []
    for head in range(site.num_heads):
        candidates = [pattern_library.dense(), *shared]
        if profile is not None:
            mass = profile.normalized()[head]
            candidates += _profile_candidates(mass, block_size, site)
        per_head.append(_unique(candidates))
    return per_head


def _profile_candidates(mass: torch.Tensor, block_size: int, site: AttentionSite) -> list[Pattern]:
    """Candidates read off one head's block attention map."""
    found: list[Pattern] = []
    q_blocks, k_blocks = mass.shape
    # Strongest diagonal offsets (in blocks) beyond the local neighbourhood → multi-diagonal periods.
    offsets = torch.zeros(q_blocks + k_blocks, dtype=torch.float64)
    rows = torch.arange(q_blocks).unsqueeze(1)
    columns = torch.arange(k_blocks).unsqueeze(0)
    distance = (rows - columns).abs()
    offsets.index_add_(0, distance.flatten(), mass.flatten())
    counts = torch.bincount(distance.flatten(), minlength=q_blocks + k_blocks).clamp_min(1)
    per_offset = offsets / counts
    # Periods: the offsets (>= 2 blocks, with at least two periods in the sequence) holding the most mass.
    longest = min(q_blocks, k_blocks) // 2
    if longest >= 2:
        far = offsets[: longest + 1].clone()
        far[:2] = 0
        for offset in far.topk(min(2, int((far > 0).sum()))).indices.tolist():
            if offset >= 2:
                period = offset * block_size
                for width in (0, block_size // 2):
                    found.append(pattern_library.multi_diagonal(period, width))
                    found.append(pattern_library.multi_diagonal(period, width) | pattern_library.attention_sinks(block_size))
    # Vertical-slash: strongest key columns (relative) and diagonals.
    column_mass = mass.sum(0)
    top_columns = column_mass.topk(min(4, k_blocks)).indices.tolist()
    key_length = k_blocks * block_size  # the profile's length, not the captured one
    vertical = sorted({round((c * block_size + block_size / 2) / key_length, 4) for c in top_columns if c > 0})
    vertical = [position for position in vertical if position < 1]
    slash = sorted({int(o) * block_size for o in per_offset.topk(min(4, per_offset.numel())).indices.tolist()})
    if vertical or slash:
        found.append(pattern_library.vertical_slash(vertical, slash, block_size) | pattern_library.attention_sinks(block_size))
    # Static block tables read off the profile at a grid of densities, two ways of spending the blocks.
    for density in PROFILE_TABLE_DENSITIES:
        for kind in PROFILE_TABLE_KINDS:
            found.append(profile_top_k(mass, density, site, kind))
    return found


#: Densities (kept share of the visible blocks) of the static tables read off each head's profile.
PROFILE_TABLE_DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

#: How a profile table spends its blocks: ``row_share`` keeps the same share of every query block's visible keys;
#: ``coverage`` keeps, in every query block, the fewest keys that hold one common share of the row's mass (rows
#: with spread attention get more blocks, peaked rows fewer), the share chosen so the head meets the density.
PROFILE_TABLE_KINDS = ("row_share", "coverage")


def profile_top_k(mass: torch.Tensor, density: float, site: AttentionSite, kind: str = "row_share") -> Pattern:
    """A static block table read off one head's block attention mass, keeping about ``density`` of the visible blocks.

    Every query block of a self-attention site keeps its diagonal block and the first key block
    (the local context and the attention sink: a row without its diagonal block loses its own
    tokens, the largest error a table can make) before the blocks with the most mass. ``kind`` is
    one of `PROFILE_TABLE_KINDS`. The table is relative to the diagonal at self-attention sites
    (so a local band keeps its width at other lengths), to the start at cross-attention sites.

    Example:
        >>> site = AttentionSite("attn", 0, num_heads=1, num_kv_heads=1, head_dim=8, q_len=256, k_len=256, causal=True)
        >>> mass = torch.rand(4, 4).tril()
        >>> table = profile_top_k(mass, 0.5, site, "coverage")
        >>> all(row[0] == 0 and row[-1] == index for index, row in enumerate(table.table))
        True
    """
    if kind not in PROFILE_TABLE_KINDS:
        raise PatternError(f"profile_top_k: unknown kind {kind!r}; known: {', '.join(PROFILE_TABLE_KINDS)}")
    if not 0 < density <= 1:
        raise PatternError(f"profile_top_k: density must lie in (0, 1], got {density!r}")
    mass = mass.detach().to("cpu", torch.float64)
    q_blocks, k_blocks = mass.shape
    visible = causal_block_mask(q_blocks, k_blocks) if site.causal else torch.ones(q_blocks, k_blocks, dtype=torch.bool)
    forced = torch.zeros_like(visible)
    if site.is_self_attention:
        rows = torch.arange(q_blocks)
        diagonal = rows if site.causal else (rows * k_blocks) // q_blocks  # causal grids are top-left aligned
        forced[rows, diagonal.clamp(0, k_blocks - 1)] = True
        forced[:, 0] = True
        forced &= visible
    # Each row's mass as a distribution over its visible keys (a row the profile never saw: uniform).
    row_mass = mass.clamp_min(0).masked_fill(~visible, 0.0)
    totals = row_mass.sum(1, keepdim=True)
    share = torch.where(totals > 0, row_mass / totals.clamp_min(1e-300), visible.double() / visible.sum(1, keepdim=True))
    # Order: forced blocks first, then by mass; invisible blocks last.
    order = torch.sort(torch.where(visible, share + 2.0 * forced, -1.0), dim=1, descending=True, stable=True).indices
    seen = visible.sum(1)
    least = forced.sum(1).clamp_min(1)
    if kind == "row_share":
        count = torch.maximum(least, torch.ceil(density * seen - 1e-9).long()).minimum(seen)
    else:
        covered = share.gather(1, order).cumsum(1)            # mass held by the first n blocks of each row, n = 1..

        def count_for(level: float) -> torch.Tensor:
            return torch.maximum(least, (covered < level - 1e-12).sum(1) + 1).minimum(seen)

        budget = density * float(seen.sum())
        low, high = 0.0, 1.0
        for _ in range(40):  # the largest common coverage whose table keeps at most the budget
            middle = (low + high) / 2
            if float(count_for(middle).sum()) <= budget:
                low = middle
            else:
                high = middle
        count = count_for(low)
    table = [sorted(order[row, :int(count[row])].tolist()) for row in range(q_blocks)]
    return pattern_library.block_top_k(table, q_blocks, k_blocks,
                                       relative_to="diagonal" if site.is_self_attention else "start")


class SiteMasks:
    """Block masks of one site's candidates, built once per (pattern, lengths) and shared by the prefilter, the
    scoring and the costing (heads share most candidates).

    Each candidate has one mask, seen two ways: `of` is its kept blocks as a bool grid (the
    pattern's `block_mask`, what the profile's recall and the scoring's masked attention read),
    and `runtime` is the `RuntimeBlockMask` compressed from that same grid — what
    `Pattern.runtime_mask` builds, the kernels run and the cost model prices
    (`CostModel.head_latency`). It is built only for candidates that get priced (the prefilter
    drops many). `skip` computes nothing: its grid is the row-fallback placeholder, which only
    the prefilter compares; the search prices skipped heads at 0.

    Example:
        >>> masks = SiteMasks(block_size=64, causal=True)
        >>> masks.of(pattern_library.sliding_window(64), 256, 256).shape
        torch.Size([4, 4])
        >>> masks.runtime(pattern_library.sliding_window(64), 256, 256).kept_blocks_per_head()
        [7.0]
    """

    def __init__(self, block_size: int, causal: bool):
        self.block_size = block_size
        self.causal = causal
        self._grids: dict[tuple[str, int, int], torch.Tensor] = {}
        self._masks: dict[tuple[str, int, int], RuntimeBlockMask] = {}  # compressed from _grids

    def of(self, pattern: Pattern, q_len: int, k_len: int) -> torch.Tensor:
        """``bool [q_blocks, k_blocks]``: the candidate's kept blocks at these lengths."""
        key = (repr(pattern.to_dict()), q_len, k_len)
        if key not in self._grids:
            self._grids[key] = pattern.block_mask(blocks_for(q_len, self.block_size), blocks_for(k_len, self.block_size),
                                                  block_size=self.block_size, causal=self.causal,
                                                  q_len=q_len, k_len=k_len)
        return self._grids[key]

    def runtime(self, pattern: Pattern, q_len: int, k_len: int) -> RuntimeBlockMask:
        """The candidate's runtime mask (one head, on CPU) at these lengths: `of`'s grid, compressed."""
        key = (repr(pattern.to_dict()), q_len, k_len)
        if key not in self._masks:
            self._masks[key] = RuntimeBlockMask.from_block_masks(self.of(pattern, q_len, k_len).unsqueeze(0),
                                                                 block_size=self.block_size, q_len=q_len, k_len=k_len,
                                                                 causal=self.causal)
        return self._masks[key]


def prefilter_candidates(candidates: Sequence[Pattern], profile: BlockMassProfile, head: int, masks: SiteMasks,
                         min_recall: float, dominance_margin: float = 0.002) -> list[Pattern]:
    """Drop candidates the profile already rules out, before the (costlier) output-error scoring.

    A candidate goes when it keeps less than ``min_recall`` of the head's attention mass, or
    when another keeps no more blocks and at least ``dominance_margin`` more mass. Dense
    (index 0) and skip always stay: their errors are exact without the profile.
    """
    stacked = torch.stack([masks.of(p, profile.q_len, profile.k_len) for p in candidates])
    recall = profile.recall(stacked.unsqueeze(0).expand(profile.mass.shape[0], *stacked.shape))[head]
    kept = stacked.flatten(1).sum(1)
    keep = []
    for index, pattern in enumerate(candidates):
        if index == 0 or is_skip(pattern):
            keep.append(pattern)
            continue
        if recall[index] < min_recall:
            continue
        dominated = (kept <= kept[index]) & (recall >= recall[index] + dominance_margin)
        if not bool(dominated.any()):
            keep.append(pattern)
    return keep


def _unique(candidates: Sequence[Pattern]) -> list[Pattern]:
    seen: set[str] = set()
    unique = []
    for pattern in candidates:
        key = repr(pattern.to_dict())
        if key not in seen:
            seen.add(key)
            unique.append(pattern)
    return unique


def is_skip(pattern: Pattern) -> bool:
    return bool(getattr(pattern, "is_skip", False))


#: Below this many query blocks a per-input estimate has too little to choose from to pay.
MIN_QUERY_BLOCKS = 4


def adaptive_candidates(site: AttentionSite, block_size: int) -> list[Pattern]:
    """The input-adaptive patterns every head of ``site`` is scored with (none for short sequences).

    Pooled coverage at several coverages (with a sink block) — pooled keys at several
    temperatures, and mean queries against every key — and estimated vertical-slash at several
    budgets; the search keeps a head's adaptive choice only where it is cheaper than the best
    static one at the same error.

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
        # Mean queries against every key: a key block's strong keys count (about 1 / block of dense scoring).
        found.append(pattern_library.pooled_coverage(coverage, sink_blocks=1, scoring="query_mean"))
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
