"""Leftover: `blocks_for` lives in `sparsify.runtime.block_mask`; delete this module once its importers import it from there."""

from sparsify.runtime.block_mask import blocks_for

__all__ = ["blocks_for"]
