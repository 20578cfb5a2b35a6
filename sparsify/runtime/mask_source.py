"""Mask sources: where a site's `RuntimeBlockMask` comes from — static patterns per length, or estimators per input."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Sequence

import torch

from sparsify.block_mask import RuntimeBlockMask, block_token_bounds, blocks_for, pattern_block_masks

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
    per-input `RuntimeBlockMask` (``batch`` = the call's batch, fixed width: no host read), in
    which self attention always keeps the blocks holding the queries' own positions.

    Example:
        >>> from sparsify import patterns
        >>> source = AdaptiveMaskSource([patterns.pooled_coverage(0.9)], block_size=16, causal=True,
        ...                             kv_head_index=torch.tensor([0]), self_attention=True)
        >>> q = torch.randn(2, 1, 64, 8)
        >>> mask = source.mask(q, q)
        >>> mask.batch, mask.per_input
        (2, True)
    """

    STATIC_CACHE_SIZE = 8

    def __init__(self, patterns: Sequence["Pattern"], *, block_size: int, causal: bool, kv_head_index: torch.Tensor,
                 self_attention: bool = True):
        from sparsify.patterns.adaptive import AdaptivePattern

        if len(patterns) != kv_head_index.numel():
            raise ValueError(f"{len(patterns)} patterns but {kv_head_index.numel()} key/value head indices")
        self.patterns = list(patterns)
        self.block_size = block_size
        self.causal = causal
        self.self_attention = self_attention
        self.kv_head_index = kv_head_index.to(torch.int64)
        self._static: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        # Adaptive leaves grouped by family: key -> (class, settings, [(head, leaf)]).
        self.groups: dict[tuple, tuple[type, dict, list[tuple[int, AdaptivePattern]]]] = {}
        for head, pattern in enumerate(self.patterns):
            for leaf in _adaptive_leaves(pattern):
                key = leaf.family_key()
                cls, settings, members = self.groups.setdefault(key, (type(leaf), leaf.group_settings(), []))
                members.append((head, leaf))
        if not self.groups:
            raise ValueError("AdaptiveMaskSource needs at least one input-adaptive pattern")
        self._parameters = {key: {name: torch.tensor([leaf.head_parameters()[name] for _, leaf in members],
                                                      dtype=torch.float32)
                                  for name in members[0][1].head_parameters()}
                            for key, (_, _, members) in self.groups.items()}

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    def mask(self, q: torch.Tensor, k: torch.Tensor, *, attn_mask: torch.Tensor | None = None, q_offset: int = 0,
             scale: float | None = None) -> RuntimeBlockMask:
        """The mask of this call: ``q`` ``[B, H, Sq, D]`` (this source's heads), ``k`` ``[B, Hkv, Sk, D]``."""
        from sparsify.runtime.adaptive import key_validity, self_blocks

        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        device = q.device
        key_valid = key_validity(attn_mask, batch, k_len)
        estimates: dict[int, torch.Tensor] = {}                       # id(leaf object in a head) -> [B, Qb, Kb]
        for key, (cls, settings, members) in self.groups.items():
            head_index = torch.tensor([head for head, _ in members], device=device)
            parameters = self._parameters[key]
            if device.type != "cpu":
                parameters = {name: (value.to(device) if name != "probe_blocks" else value)
                              for name, value in parameters.items()}
            estimate = cls.estimate(q.index_select(1, head_index), k, parameters=parameters, settings=settings,
                                    block_size=self.block_size, kv_head_index=self.kv_head_index[
                                        [head for head, _ in members]], scale=scale, causal=self.causal,
                                    q_offset=q_offset, key_valid=key_valid)
            for position, (head, leaf) in enumerate(members):
                estimates[(head, id(leaf))] = estimate[:, position]
        per_head = [self._evaluate(pattern, head, estimates, q_len, k_len, q_offset, device)
                    for head, pattern in enumerate(self.patterns)]
        kept = torch.stack(per_head, 1)                                 # [B, H, Qb, Kb]
        if self.self_attention:
            kept = kept | self_blocks(q_len, k_len, self.block_size, q_offset, device)
        return RuntimeBlockMask.from_block_masks(kept, block_size=self.block_size, q_len=q_len, k_len=k_len,
                                                 causal=self.causal, kv_head_index=self.kv_head_index,
                                                 q_offset=q_offset, width=blocks_for(k_len, self.block_size),
                                                 per_input=True)

    def _evaluate(self, pattern, head, estimates, q_len, k_len, q_offset, device) -> torch.Tensor:
        from sparsify.patterns.composites import Intersection, Union

        if pattern.is_adaptive and not isinstance(pattern, (Union, Intersection)):
            return estimates[(head, id(pattern))]
        if isinstance(pattern, (Union, Intersection)):
            parts = [self._evaluate(part, head, estimates, q_len, k_len, q_offset, device) for part in pattern.parts]
            combined = parts[0]
            for part in parts[1:]:
                combined = (combined | part) if isinstance(pattern, Union) else (combined & part)
            return combined
        return self._static_mask(pattern, q_len, k_len, q_offset, device).unsqueeze(0)

    def _static_mask(self, pattern, q_len, k_len, q_offset, device) -> torch.Tensor:
        key = (repr(pattern.to_dict()), q_len, k_len, q_offset, str(device))
        mask = self._static.get(key)
        if mask is None:
            mask = pattern_block_masks([pattern], block_size=self.block_size, q_len=q_len, k_len=k_len,
                                       causal=self.causal, q_offset=q_offset)[0].to(device)
            if len(self._static) >= self.STATIC_CACHE_SIZE:
                self._static.popitem(last=False)
            self._static[key] = mask
        return mask


def _adaptive_leaves(pattern) -> list:
    """The adaptive parts of a pattern (itself, or the parts of a union / intersection, recursively)."""
    from sparsify.patterns import Intersection, Union

    if isinstance(pattern, (Union, Intersection)):
        return [leaf for part in pattern.parts for leaf in _adaptive_leaves(part)]
    return [pattern] if pattern.is_adaptive else []
