"""Former home of the input-adaptive patterns, now `sparsify.patterns.adaptive`: re-exports it (no warning yet)."""

from sparsify.patterns.adaptive import (
    SCORINGS,
    AdaptivePattern,
    EstimatedVerticalSlash,
    PooledCoverage,
    estimated_vertical_slash,
    pooled_coverage,
)

__all__ = ["AdaptivePattern", "EstimatedVerticalSlash", "PooledCoverage", "estimated_vertical_slash",
           "pooled_coverage", "SCORINGS"]
