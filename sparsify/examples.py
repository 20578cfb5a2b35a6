"""Deprecated name of `sparsify.toy_models` (the built-in toy models; ``examples/`` holds the example scripts).

Importing this module warns (``DeprecationWarning``) and re-exports `sparsify.toy_models`; it will
be removed in a later release. Use ``from sparsify.toy_models import StructuredVideoTransformer``.
"""

import warnings

from sparsify.toy_models import *  # noqa: F401,F403

warnings.warn("sparsify.examples is deprecated: the toy models live in sparsify.toy_models",
              DeprecationWarning, stacklevel=2)
