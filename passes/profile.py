"""Former name of the observe pass, now `sparsify.passes.observe`: re-exports it (importers move there)."""

from sparsify.passes.observe import (
    AttentionInterpreter,
    ObservingInterpreter,
    SiteObserver,
    canonical_arguments,
    observe,
)

__all__ = ["AttentionInterpreter", "ObservingInterpreter", "SiteObserver", "canonical_arguments", "observe"]
