"""Deprecated home of the input-adaptive patterns: they live in `sparsify.patterns` (``sparsify.patterns.adaptive``).

Importing this module warns once (``DeprecationWarning``) and re-exports the same objects;
it will be removed in a later release. Use ``from sparsify.patterns import pooled_coverage``.
"""

import warnings

from sparsify.patterns.adaptive import (
    SCORINGS,
    AdaptivePattern,
    EstimatedVerticalSlash,
    PooledCoverage,
    estimated_vertical_slash,
    pooled_coverage,
)

warnings.warn("sparsify.adaptive_patterns is deprecated: import the adaptive patterns from sparsify.patterns",
              DeprecationWarning, stacklevel=2)

__all__ = ["AdaptivePattern", "EstimatedVerticalSlash", "PooledCoverage", "estimated_vertical_slash",
           "pooled_coverage", "SCORINGS"]
