"""Input-adaptive patterns: named patterns whose block mask is estimated per input, on the device (`sparsify.estimators`).

They sit in the pattern registry beside the static ones (JSON round trip, validation,
composition with ``|`` / ``&``), and the search scores them like the static ones — on held-out
inputs, with the masks they produce on those inputs. Where a static mask is asked of them
(``block_mask``), they answer with every block: the estimate never keeps more.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from sparsify.errors import PatternError
from sparsify.limits import MAX_GRID_BLOCKS
from sparsify.patterns.base import BlockGrid, Pattern, register_pattern

__all__ = ["AdaptivePattern", "EstimatedVerticalSlash", "PooledCoverage", "estimated_vertical_slash",
           "pooled_coverage", "SCORINGS"]

SCORINGS = ("mean", "query_mean", "antidiagonal")
#: Block counts (sinks, minimum kept blocks) are bounded like every grid in a strategy (`sparsify.limits`).
MAX_BLOCKS_PARAMETER = MAX_GRID_BLOCKS
#: Antidiagonal strides: at most a block of the smallest size.
MAX_STRIDE = 64


def _check_fraction(owner: str, field: str, value, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise PatternError(f"{owner}: {field} must be a fraction in {bound}, got {value!r}")


def _check_count(owner: str, field: str, value, *, low: int = 0, high: int = MAX_BLOCKS_PARAMETER,
                 bound: str = "MAX_GRID_BLOCKS in sparsify.limits") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PatternError(f"{owner}: {field} must be an int in [{low}, {high}] ({bound}), got {value!r}")


@dataclasses.dataclass(frozen=True, repr=False)
class AdaptivePattern(Pattern):
    """Base of patterns estimated per input: subclasses implement `estimate` for a batch of heads.

    ``family`` groups the heads the runtime estimates together (one vectorised call per family and
    site); per-head parameters come from `head_parameters`.
    """

    family: ClassVar[str] = ""
    #: Fields every head of one estimation call shares (the others are stacked per head).
    group_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def is_adaptive(self) -> bool:
        return True

    def family_key(self) -> tuple:
        """Heads whose patterns share this key are estimated in one vectorised call."""
        return (self.family, *(getattr(self, name) for name in self.group_fields))

    def group_settings(self) -> dict:
        return {name: getattr(self, name) for name in self.group_fields}

    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        # The static view of an estimated mask: every block (the estimate keeps a subset of them).
        return torch.ones(grid.q_blocks, grid.k_blocks, dtype=torch.bool)

    def head_parameters(self) -> dict[str, float]:
        """This pattern's numeric parameters, stacked per head by the runtime."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name not in self.group_fields}

    def estimation_work(self, q_len: int, k_len: int, head_dim: int, block_size: int) -> tuple[float, int]:
        """``(multiply_adds, kernel_launches)`` of estimating one head's mask for one input (the cost model prices it)."""
        raise NotImplementedError

    @classmethod
    def estimate(cls, q: torch.Tensor, k: torch.Tensor, *, parameters: dict[str, torch.Tensor], settings: dict,
                 block_size: int, kv_head_index: torch.Tensor, scale: float | None, causal: bool, q_offset: int,
                 key_valid: torch.Tensor | None, copies=None) -> torch.Tensor:
        """Block lists ``int64 [B, H, Qb, slots]`` for the heads of ``q`` (``-1``: no block; see `sparsify.estimators`).

        ``parameters``: CPU tensors ``[H]`` each (the list widths are read from them on the host);
        ``settings``: the non-numeric ones; ``copies``: the caller's `sparsify.estimators.DeviceCopies`
        (their device copies, kept across calls), or ``None``.
        """
        raise NotImplementedError


@register_pattern("estimated_vertical_slash")
@dataclasses.dataclass(frozen=True, repr=False)
class EstimatedVerticalSlash(AdaptivePattern):
    """MInference's vertical-slash at block granularity, estimated per input from the last query blocks.

    The last ``probe_blocks`` query blocks attend (exactly) to every key; per head the
    ``vertical`` fraction of key blocks and the ``slash`` fraction of block diagonals holding the
    most of their mass are kept, plus the first ``sink_blocks`` key blocks. The block holding a
    query's own position is always kept (self attention).

    Example:
        >>> pattern = estimated_vertical_slash(vertical=0.05, slash=0.1)
        >>> pattern, pattern.is_adaptive
        (estimated_vertical_slash(slash=0.1), True)
        >>> from sparsify.patterns import pattern_from_dict
        >>> pattern_from_dict(pattern.to_dict()) == pattern
        True
    """

    vertical: float = 0.05
    slash: float = 0.05
    probe_blocks: int = 1
    sink_blocks: int = 0
    family: ClassVar[str] = "estimated_vertical_slash"
    _positional: ClassVar[int] = 0

    def __post_init__(self) -> None:
        _check_fraction("estimated_vertical_slash", "vertical", self.vertical)
        _check_fraction("estimated_vertical_slash", "slash", self.slash)
        _check_count("estimated_vertical_slash", "probe_blocks", self.probe_blocks, low=1, high=64)
        _check_count("estimated_vertical_slash", "sink_blocks", self.sink_blocks)

    def estimation_work(self, q_len, k_len, head_dim, block_size):
        probe = min(q_len, self.probe_blocks * block_size)
        # The probe's scores twice (two passes: row totals, then the split), per-key and per-offset pooling, the
        # lines' sort; on the device four kernels and three small copies (`vertical_slash_block_lists`).
        return probe * k_len * (2 * head_dim + 8) + 4 * (q_len + k_len), 7

    @classmethod
    def estimate(cls, q, k, *, parameters, settings, block_size, kv_head_index, scale, causal, q_offset, key_valid,
                 copies=None):
        from sparsify.estimators import vertical_slash_block_lists

        probe_rows = int(max(parameters["probe_blocks"].tolist())) * block_size  # a CPU tensor: no device read
        return vertical_slash_block_lists(q, k, block_size=block_size, kv_head_index=kv_head_index,
                                          vertical=parameters["vertical"], slash=parameters["slash"],
                                          probe_rows=probe_rows, scale=scale, causal=causal, q_offset=q_offset,
                                          key_valid=key_valid, sink_blocks=parameters["sink_blocks"].long(),
                                          copies=copies)


@register_pattern("pooled_coverage")
@dataclasses.dataclass(frozen=True, repr=False)
class PooledCoverage(AdaptivePattern):
    """Per query block, the fewest key blocks whose estimated softmax mass reaches ``coverage``.

    Block mass is estimated per input from block-pooled queries and keys (``scoring="mean"``,
    FlexPrefill / SpargeAttn's idea: about ``1 / block²`` of dense attention), from each block's
    mean query against every key (``scoring="query_mean"``: about ``1 / block`` of it; a key
    block's few strong keys are not averaged away — on SmolLM2 at 2048 tokens it leaves 0.032 of
    the attention mass outside the kept blocks at density 0.5 where ``"mean"`` leaves 0.045 and
    exact selection 0.023) or from strided antidiagonal sums (``scoring="antidiagonal"``,
    XAttention's: ``1 / stride`` of it). The count
    stays between ``min_blocks`` and ``max_fraction`` of the key blocks; the first
    ``sink_blocks`` key blocks and the block holding the query's own position are always kept.
    ``temperature`` scales the pooled scores before their softmax: a block mean is far less spread
    than its tokens, so the pooled estimate is sharper than the real attention; below 1 it
    flattens (the search measures which value a head needs).

    Example:
        >>> pooled_coverage(0.9)
        pooled_coverage(0.9)
        >>> pooled_coverage(0.95, scoring="antidiagonal", stride=16).to_dict()["scoring"]
        'antidiagonal'
    """

    coverage: float = 0.9
    min_blocks: int = 1
    max_fraction: float = 1.0
    sink_blocks: int = 0
    scoring: str = "mean"
    stride: int = 8
    temperature: float = 1.0
    family: ClassVar[str] = "pooled_coverage"
    group_fields: ClassVar[tuple[str, ...]] = ("scoring", "stride")
    _positional: ClassVar[int] = 1

    def __post_init__(self) -> None:
        _check_fraction("pooled_coverage", "coverage", self.coverage)
        _check_count("pooled_coverage", "min_blocks", self.min_blocks, low=1)
        _check_fraction("pooled_coverage", "max_fraction", self.max_fraction)
        _check_count("pooled_coverage", "sink_blocks", self.sink_blocks)
        if self.scoring not in SCORINGS:
            raise PatternError(f"pooled_coverage: scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        _check_count("pooled_coverage", "stride", self.stride, low=1, high=MAX_STRIDE)
        if self.stride & (self.stride - 1):
            raise PatternError(f"pooled_coverage: stride must be a power of two, got {self.stride}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
                0.01 <= self.temperature <= 10):
            raise PatternError(f"pooled_coverage: temperature must be a number in [0.01, 10], got {self.temperature!r}")

    def estimation_work(self, q_len, k_len, head_dim, block_size):
        q_blocks, k_blocks = -(-q_len // block_size), -(-k_len // block_size)
        pooling = (q_len + k_len) * head_dim
        if self.scoring == "antidiagonal":
            scores = q_len * k_len * head_dim / min(self.stride, block_size)
        elif self.scoring == "query_mean":   # the mean queries' scores against every key, their softmax and block sums
            scores = q_blocks * k_len * (head_dim + 4)
        else:
            scores = q_blocks * k_blocks * head_dim
        # Block means, pooled scores, then per row a softmax and the blocks picked best first; on the device (Triton
        # path) two block-mean launches, a head gather, a matmul, a log and the coverage kernel; query-mean scoring
        # one block-mean launch, a scaling, the logits kernel and the coverage kernel.
        return pooling + scores + 8 * q_blocks * k_blocks, 6

    @classmethod
    def estimate(cls, q, k, *, parameters, settings, block_size, kv_head_index, scale, causal, q_offset, key_valid,
                 copies=None):
        from sparsify.estimators import (_on, antidiagonal_block_mass, coverage_block_lists,
                                         pooled_coverage_block_lists, sink_block_lists)
        from sparsify.block_mask import blocks_for

        scale = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        temperature = _on(parameters["temperature"].to(torch.float32), q.device, copies).view(1, -1, 1, 1)
        common = dict(block_size=block_size, kv_head_index=kv_head_index, scale=scale, causal=causal,
                      q_offset=q_offset, key_valid=key_valid, temperature=temperature)
        k_blocks = blocks_for(k.shape[2], block_size)
        max_blocks = torch.ceil(parameters["max_fraction"] * k_blocks).clamp(min=1).long()
        bounds = dict(coverage=parameters["coverage"], min_blocks=parameters["min_blocks"].long(), max_blocks=max_blocks)
        sinks = parameters["sink_blocks"].long()
        if settings["scoring"] in ("mean", "query_mean"):
            return pooled_coverage_block_lists(q, k, copies=copies, sink_blocks=sinks, scoring=settings["scoring"],
                                               **common, **bounds)
        mass = antidiagonal_block_mass(q, k, stride=min(settings["stride"], block_size), **common)
        lists = coverage_block_lists(mass, **bounds)
        return torch.cat([lists, sink_block_lists(sinks, lists, k_blocks, copies)], -1)


def estimated_vertical_slash(vertical: float = 0.05, slash: float = 0.05, probe_blocks: int = 1,
                             sink_blocks: int = 0) -> EstimatedVerticalSlash:
    """`EstimatedVerticalSlash`: keep the ``vertical`` / ``slash`` fractions estimated from the last query blocks.

    Example:
        >>> estimated_vertical_slash(0.1, 0.05).vertical
        0.1
    """
    return EstimatedVerticalSlash(vertical, slash, probe_blocks, sink_blocks)


def pooled_coverage(coverage: float = 0.9, *, min_blocks: int = 1, max_fraction: float = 1.0, sink_blocks: int = 0,
                    scoring: str = "mean", stride: int = 8, temperature: float = 1.0) -> PooledCoverage:
    """`PooledCoverage`: the fewest key blocks reaching ``coverage`` of the estimated mass, per query block.

    Example:
        >>> pooled_coverage(0.95, min_blocks=2).min_blocks
        2
    """
    return PooledCoverage(coverage, min_blocks, max_fraction, sink_blocks, scoring, stride, temperature)
