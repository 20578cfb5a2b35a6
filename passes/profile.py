"""Deprecated name of the observe pass, now `sparsify.passes.observe`: re-exports it and warns on import."""

import warnings

from sparsify.passes.observe import (
    AttentionInterpreter,
    ObservingInterpreter,
    SiteObserver,
    canonical_arguments,
    observe,
)

__all__ = ["AttentionInterpreter", "ObservingInterpreter", "SiteObserver", "canonical_arguments", "observe"]

warnings.warn("sparsify.passes.profile is deprecated: import the observe pass from sparsify.passes.observe",
              DeprecationWarning, stacklevel=2)
