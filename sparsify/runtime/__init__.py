"""The runtime between a strategy and the kernels: the block mask, its sources, and the module that owns a site."""

from sparsify.runtime.block_mask import RuntimeBlockMask, blocks_for, causal_element_mask
from sparsify.runtime.mask_source import StaticMaskSource, pattern_block_masks

__all__ = ["RuntimeBlockMask", "StaticMaskSource", "blocks_for", "causal_element_mask", "pattern_block_masks"]
