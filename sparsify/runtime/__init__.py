"""The runtime between a strategy and the kernels: the block mask, its sources, and the module that owns a site.

The package re-exports only the block mask (the lowest layer); import the mask sources, the site
module and the kernel op from their modules (`sparsify.runtime.mask_source`, ...).
"""

from sparsify.runtime.block_mask import RuntimeBlockMask, blocks_for, causal_element_mask, pattern_block_masks

__all__ = ["RuntimeBlockMask", "blocks_for", "causal_element_mask", "pattern_block_masks"]
