"""Attention backends: one file per backend, all behind `Backend` and a name registry."""

from sparsify.backends.base import Backend, available_backends, get_backend, register_backend
from sparsify.backends import torch as _torch_backend  # noqa: F401  (registers "torch")

__all__ = ["Backend", "available_backends", "get_backend", "register_backend"]
from sparsify.backends import triton as _triton_backend  # noqa: F401,E402  (registers "triton")
from sparsify.backends import flex as _flex_backend  # noqa: F401,E402  (registers "flex")
