"""Deprecated path of `sparsify.estimators` (the input-adaptive mask estimators).

Importing this module warns (``DeprecationWarning``) and re-exports `sparsify.estimators`; it will be
removed in a later release. Use ``from sparsify.estimators import vertical_slash_block_mask``.
"""

import warnings

from sparsify.estimators import *  # noqa: F401,F403

warnings.warn("sparsify.runtime.adaptive is deprecated: the estimators live in sparsify.estimators "
              "(a floor below the patterns and the runtime, which both use them)", DeprecationWarning, stacklevel=2)
