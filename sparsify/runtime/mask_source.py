"""Mask sources: where a site's `RuntimeBlockMask` comes from — static patterns per length, or estimators per input."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Sequence

import torch

from sparsify.block_mask import RuntimeBlockMask, block_token_bounds, blocks_for, pattern_block_masks
from sparsify.estimators import DeviceCopies

if TYPE_CHECKING:
    from sparsify.patterns import Pattern

__all__ = ["AdaptiveMaskSource", "StaticMaskSource"]


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


class AdaptiveMaskSource:
    """The runtime masks of heads with input-adaptive patterns, estimated per call on the device.

    A head's pattern is an adaptive pattern, or a union / intersection of one with static
    patterns (``sliding_window(256) | pooled_coverage(0.9)``). Heads whose adaptive parts belong
    to one family (and share its group settings) are estimated in one vectorised call; static
    parts come from their block masks, kept per length in a small bounded cache. The result is a
    per-input `RuntimeBlockMask` (``batch`` = the call's batch, fixed widths: no host read), in
    which self attention always keeps the blocks holding the queries' own positions.

    Masks travel as block lists (per query block the kept key blocks, `sparsify.estimators`)
    from the estimators to `RuntimeBlockMask.from_block_lists`: a union is a concatenation, and
    nothing of size ``[heads, q_blocks, k_blocks]`` is built (an intersection aside).

    Example:
        >>> from sparsify import patterns
        >>> source = AdaptiveMaskSource([patterns.pooled_coverage(0.9)], block_size=16, causal=True,
        ...                             kv_head_index=torch.tensor([0]), self_attention=True)
        >>> q = torch.randn(2, 1, 64, 8)
        >>> mask = source.mask(q, q)
        >>> mask.batch, mask.per_input
        (2, True)
    """

    PER_LENGTHS_CACHE_SIZE = 16      # entries: a static part's lists or the own blocks, per lengths

    def __init__(self, patterns: Sequence["Pattern"], *, block_size: int, causal: bool, kv_head_index: torch.Tensor,
                 self_attention: bool = True):
        from sparsify.patterns.adaptive import AdaptivePattern

        if len(patterns) != kv_head_index.numel():
            raise ValueError(f"{len(patterns)} patterns but {kv_head_index.numel()} key/value head indices")
        self.patterns = list(patterns)
        self.block_size = block_size
        self.causal = causal
        self.self_attention = self_attention
        self.kv_head_index = kv_head_index.to(torch.int64).cpu()
        #: ``kv_head_index`` as host ints (what backends read instead of the device tensor).
        self.kv_heads = tuple(self.kv_head_index.tolist())
        # Per (lengths, offset, device): static parts' block lists and the own blocks of self attention (bounded).
        self._per_lengths: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._head_index: dict[tuple, torch.Tensor] = {}               # (group key, device) -> its heads there
        self._copies = DeviceCopies()                                  # per-head values on the device, kept
        # Adaptive leaves grouped by family: key -> (class, settings, [(head, leaf)]).
        self.groups: dict[tuple, tuple[type, dict, list[tuple[int, AdaptivePattern]]]] = {}
        for head, pattern in enumerate(self.patterns):
            for leaf in _adaptive_leaves(pattern):
                key = leaf.family_key()
                cls, settings, members = self.groups.setdefault(key, (type(leaf), leaf.group_settings(), []))
                members.append((head, leaf))
        if not self.groups:
            raise ValueError("AdaptiveMaskSource needs at least one input-adaptive pattern")
        # Per-head parameters stay on the CPU: estimators read list widths from them on the host.
        self._parameters = {key: {name: torch.tensor([leaf.head_parameters()[name] for _, leaf in members],
                                                      dtype=torch.float32)
                                  for name in members[0][1].head_parameters()}
                            for key, (_, _, members) in self.groups.items()}
        #: Every head is a bare adaptive pattern: the groups' lists are the heads' lists (no per-head work).
        self.bare = all(len(leaves) == 1 and leaves[0] is pattern
                        for pattern, leaves in ((p, _adaptive_leaves(p)) for p in self.patterns))

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    def mask(self, q: torch.Tensor, k: torch.Tensor, *, attn_mask: torch.Tensor | None = None, q_offset: int = 0,
             scale: float | None = None) -> RuntimeBlockMask:
        """The mask of this call: ``q`` ``[B, H, Sq, D]`` (this source's heads), ``k`` ``[B, Hkv, Sk, D]``."""
        from sparsify.estimators import key_validity

        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        device = q.device
        key_valid = key_validity(attn_mask, batch, k_len)
        group_lists = []
        for key, (cls, settings, members) in self.groups.items():
            group_heads = [head for head, _ in members]
            selected = q if group_heads == list(range(heads)) else q.index_select(1, self._heads_on(key, device))
            lists = cls.estimate(selected, k, parameters=self._parameters[key], settings=settings,
                                 block_size=self.block_size, kv_head_index=self.kv_head_index[group_heads],
                                 scale=scale, causal=self.causal, q_offset=q_offset, key_valid=key_valid,
                                 copies=self._copies)
            group_lists.append((members, lists))                     # lists [B, len(members), Qb, slots]
        if self.bare:
            lists = self._bare_lists(group_lists, heads, device)
        else:
            estimates = {(head, id(leaf)): lists[:, position] for members, lists in group_lists
                         for position, (head, leaf) in enumerate(members)}
            per_head = [self._evaluate(pattern, head, estimates, q_len, k_len, q_offset, device)
                        for head, pattern in enumerate(self.patterns)]
            lists = _stack_lists([row.expand(batch, *row.shape[1:]) for row in per_head], 1)
        if self.self_attention:   # the key blocks holding the first and the last query of each query block
            lists = torch.cat([lists, self._own_blocks(q_len, k_len, q_offset, device).expand(batch, heads, -1, -1)], -1)
        return RuntimeBlockMask.from_block_lists(lists, block_size=self.block_size, q_len=q_len, k_len=k_len,
                                                 causal=self.causal, kv_head_index=self.kv_head_index,
                                                 q_offset=q_offset, per_input=True)

    def _own_blocks(self, q_len: int, k_len: int, q_offset: int, device: torch.device) -> torch.Tensor:
        """``int64 [Qb, 2]``: the key blocks of each query block's first and last query, cached per lengths (few launches)."""
        key = ("own", q_len, k_len, q_offset, str(device))
        own = self._per_lengths.get(key)
        if own is None:
            query_first, query_last, _, _ = block_token_bounds(q_len, k_len, self.block_size, q_offset, device)
            own = torch.cat([query_first, query_last], 1) // self.block_size
            self._remember(key, own)
        return own

    def _remember(self, key: tuple, value: torch.Tensor) -> None:
        """Keep ``value`` in the bounded per-lengths cache (the oldest entry goes first)."""
        if len(self._per_lengths) >= self.PER_LENGTHS_CACHE_SIZE:
            self._per_lengths.popitem(last=False)
        self._per_lengths[key] = value

    def _heads_on(self, key: tuple, device: torch.device) -> torch.Tensor:
        """The query heads of group ``key`` as an index tensor on ``device`` (made once per device)."""
        index = self._head_index.get((key, str(device)))
        if index is None:
            index = torch.tensor([head for head, _ in self.groups[key][2]], device=device)
            self._head_index[(key, str(device))] = index
        return index

    def _bare_lists(self, group_lists, heads, device) -> torch.Tensor:
        """The lists of every head when each is one adaptive pattern: the group's, or the groups' in head order."""
        if len(group_lists) == 1:
            return group_lists[0][1]
        lists = _stack_lists([lists for _, lists in group_lists], 1, concatenate=True)
        order = [head for members, _ in group_lists for head, _ in members]
        position = torch.empty(heads, dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(heads)
        return lists.index_select(1, position.to(device, non_blocking=True))

    def _evaluate(self, pattern, head, estimates, q_len, k_len, q_offset, device) -> torch.Tensor:
        """The block lists ``[B|1, Qb, slots]`` of one head's pattern (a union concatenates its parts' lists)."""
        from sparsify.patterns.composites import Intersection, Union
        from sparsify.estimators import block_lists_to_masks

        if pattern.is_adaptive and not isinstance(pattern, (Union, Intersection)):
            return estimates[(head, id(pattern))]
        if isinstance(pattern, (Union, Intersection)):
            parts = [self._evaluate(part, head, estimates, q_len, k_len, q_offset, device) for part in pattern.parts]
            batch = max(part.shape[0] for part in parts)
            parts = [part.expand(batch, *part.shape[1:]) for part in parts]
            if isinstance(pattern, Union):
                return torch.cat(parts, -1)
            k_blocks = blocks_for(k_len, self.block_size)
            combined = parts[0]
            for part in parts[1:]:   # keep the entries of the first lists that the others name too
                member = block_lists_to_masks(part, k_blocks)
                found = member.gather(-1, combined.clamp(0, k_blocks - 1)) & (combined >= 0) & (combined < k_blocks)
                combined = torch.where(found, combined, -1)
            return combined
        return self._static_lists(pattern, q_len, k_len, q_offset, device).unsqueeze(0)

    def _static_lists(self, pattern, q_len, k_len, q_offset, device) -> torch.Tensor:
        """A static pattern's block lists ``[Qb, widest row]`` (``-1`` past a row's blocks), cached per lengths."""
        key = (repr(pattern.to_dict()), q_len, k_len, q_offset, str(device))
        lists = self._per_lengths.get(key)
        if lists is None:
            mask = pattern_block_masks([pattern], block_size=self.block_size, q_len=q_len, k_len=k_len,
                                       causal=self.causal, q_offset=q_offset)[0]
            k_blocks = mask.shape[-1]
            width = max(1, int(mask.sum(-1).max()))                    # a CPU mask: no device read
            column = torch.arange(k_blocks)
            ordered = torch.where(mask, column, column + k_blocks).sort(-1).values[:, :width]
            lists = torch.where(ordered < k_blocks, ordered, -1).to(device)
            self._remember(key, lists)
        return lists


def _stack_lists(lists: list[torch.Tensor], dim: int, concatenate: bool = False) -> torch.Tensor:
    """Stack (or concatenate) block lists of different widths along ``dim``, padding each with ``-1`` slots."""
    width = max(part.shape[-1] for part in lists)
    padded = [torch.nn.functional.pad(part, (0, width - part.shape[-1]), value=-1) if part.shape[-1] < width
              else part for part in lists]
    return torch.cat(padded, dim) if concatenate else torch.stack(padded, dim)


def _adaptive_leaves(pattern) -> list:
    """The adaptive parts of a pattern (itself, or the parts of a union / intersection, recursively)."""
    from sparsify.patterns import Intersection, Union

    if isinstance(pattern, (Union, Intersection)):
        return [leaf for part in pattern.parts for leaf in _adaptive_leaves(part)]
    return [pattern] if pattern.is_adaptive else []
