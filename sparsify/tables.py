"""Block arithmetic shared by the search and the reports (the runtime's block mask lives in `sparsify.runtime`)."""

from sparsify.runtime.block_mask import blocks_for

__all__ = ["blocks_for"]
