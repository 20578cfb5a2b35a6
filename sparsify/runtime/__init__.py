"""The runtime between a strategy and the kernels: the mask sources, the module that owns a site, and the kernel op.

Import them from their modules (`sparsify.runtime.mask_source`, `sparsify.runtime.sparse_attention`,
...). The runtime block mask they build and the backends consume stands a floor below, in
`sparsify.block_mask`; its names here (``sparsify.runtime.RuntimeBlockMask``, ...) are deprecated.
"""

import warnings

_MOVED_TO_BLOCK_MASK = ("RuntimeBlockMask", "blocks_for", "causal_element_mask", "pattern_block_masks")


def __getattr__(name: str):
    if name in _MOVED_TO_BLOCK_MASK:
        warnings.warn(f"sparsify.runtime.{name} is deprecated: import it from sparsify.block_mask",
                      DeprecationWarning, stacklevel=2)
        from sparsify import block_mask

        return getattr(block_mask, name)
    raise AttributeError(f"module 'sparsify.runtime' has no attribute {name!r}")
