"""Sparsity patterns: small named, parametrised objects that give a block mask for any length.

The package, by part: `base` (the registry, block grids, `Pattern`), `families` (the static
families and their factories), `profile_table` (`block_top_k`, chosen from a block-mass
profile), `composites` (``|`` and ``&``), `adaptive` (patterns estimated per input), `decode` (the
query-aware decode pattern) and
`loading` (`pattern_from_dict`). Import from here: ``from sparsify.patterns import sliding_window``.
"""

from sparsify.patterns.adaptive import (
    AdaptivePattern,
    EstimatedVerticalSlash,
    PooledCoverage,
    estimated_vertical_slash,
    pooled_coverage,
)
from sparsify.patterns.base import (
    DEFAULT_MAX_TRACED_LEN,
    BlockGrid,
    Pattern,
    TracedBlockGrid,
    causal_block_mask,
    known_patterns,
    register_pattern,
)
from sparsify.patterns.composites import Intersection, Union
from sparsify.patterns.decode import QueryAwareDecode, query_aware_decode
from sparsify.patterns.families import (
    AShape,
    AttentionSinks,
    Dense,
    DistancePattern,
    LastTokens,
    MultiDiagonal,
    PowerOfTwo,
    Radial,
    Skip,
    SlidingWindow,
    Strided,
    VerticalSlash,
    VerticalStripes,
    a_shape,
    attention_sinks,
    dense,
    last_tokens,
    multi_diagonal,
    power_of_two,
    radial,
    skip,
    sliding_window,
    strided,
    vertical_slash,
    vertical_stripes,
)
from sparsify.patterns.loading import pattern_from_dict
from sparsify.patterns.profile_table import BlockTopK, block_top_k

__all__ = [
    "QueryAwareDecode",
    "query_aware_decode",
    "DEFAULT_MAX_TRACED_LEN",
    "BlockGrid",
    "TracedBlockGrid",
    "Pattern",
    "DistancePattern",
    "Dense",
    "Skip",
    "SlidingWindow",
    "AttentionSinks",
    "LastTokens",
    "AShape",
    "MultiDiagonal",
    "VerticalStripes",
    "VerticalSlash",
    "Strided",
    "Radial",
    "PowerOfTwo",
    "BlockTopK",
    "Union",
    "Intersection",
    "dense",
    "skip",
    "sliding_window",
    "attention_sinks",
    "last_tokens",
    "a_shape",
    "multi_diagonal",
    "vertical_stripes",
    "vertical_slash",
    "strided",
    "radial",
    "power_of_two",
    "block_top_k",
    "causal_block_mask",
    "register_pattern",
    "known_patterns",
    "AdaptivePattern",
    "EstimatedVerticalSlash",
    "PooledCoverage",
    "estimated_vertical_slash",
    "pooled_coverage",
    "pattern_from_dict",
]
