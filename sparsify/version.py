"""The installed sparsify's version, readable from any layer without importing the package's front door."""

__all__ = ["VERSION", "sparsify_version"]

VERSION = "0.1.0"
"""The release this source tree is (``sparsify.__version__`` is this string)."""


def sparsify_version() -> str:
    """This sparsify's version string.

    Example:
        >>> sparsify_version() == VERSION
        True
    """
    return VERSION
