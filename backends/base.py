"""The interface every attention backend implements, and the registry that names them."""

from __future__ import annotations

import abc
from typing import Callable, TypeVar

import torch

from sparsify.errors import UnsupportedError
from sparsify.site import AttentionSite
from sparsify.tables import BlockTables


class Backend(abc.ABC):
    """A way to run block-sparse attention for the sparse heads of one site.

    ``attention`` receives only the sparse query heads of a site (the rewrite sends dense heads
    to ``F.scaled_dot_product_attention``):

    * ``q`` — ``[batch, heads, q_len, head_dim]`` (``heads == tables.num_heads``),
    * ``k``/``v`` — ``[batch, kv_heads, k_len, head_dim]``; query head ``h`` reads key/value head
      ``tables.kv_head_index[h]``,
    * ``attn_mask`` — ``None``, bool (True = attend) or additive float, broadcastable to
      ``[batch, heads, q_len, k_len]``,
    * ``scale`` — softmax scale; ``None`` means ``1 / sqrt(head_dim)``.

    It returns ``[batch, heads, q_len, value_head_dim]`` equal to dense attention restricted to
    the element mask the tables describe (``tables.element_mask()`` and ``attn_mask``). A query
    row with no visible key returns zeros, never NaN.
    """

    name: str = ""

    @abc.abstractmethod
    def is_available(self) -> bool:
        """Whether this backend can run in the current process (libraries, devices)."""

    def unsupported_reason(self, site: AttentionSite, dtype: torch.dtype, device: torch.device) -> str | None:
        """``None`` when the backend serves this site on this dtype/device, else why not."""
        return None

    def supports(self, site: AttentionSite, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether ``attention`` can serve ``site`` for inputs of ``dtype`` on ``device``."""
        return self.is_available() and self.unsupported_reason(site, dtype, device) is None

    @abc.abstractmethod
    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tables: BlockTables,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Block-sparse attention of the heads described by ``tables``."""


_BACKENDS: dict[str, type[Backend]] = {}
BackendClass = TypeVar("BackendClass", bound=type[Backend])


def register_backend(name: str) -> Callable[[BackendClass], BackendClass]:
    """Class decorator adding a backend to the registry under ``name``."""

    def decorate(cls: BackendClass) -> BackendClass:
        if name in _BACKENDS:
            raise ValueError(f"backend {name!r} is registered twice")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return decorate


def available_backends() -> list[str]:
    """Names of all registered backends (available in this process or not)."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """A backend instance by name.

    Example:
        >>> get_backend("torch").name
        'torch'
    """
    if name not in _BACKENDS:
        raise UnsupportedError(f"unknown backend {name!r}; known: {', '.join(available_backends())}")
    return _BACKENDS[name]()
