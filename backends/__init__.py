"""Attention backends: one file per backend, all behind `Backend` and a name registry."""

from sparsify.backends.base import Backend, available_backends, get_backend, register_backend
from sparsify.backends import torch as _torch_backend  # noqa: F401  (registers "torch")

__all__ = ["Backend", "available_backends", "get_backend", "register_backend"]
