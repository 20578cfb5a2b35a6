"""Attention backends: one file per backend, all behind `Backend` (prepare → run) and a name registry."""

from sparsify.backends.base import (
    Backend,
    BackendFeatures,
    BackendPlan,
    BackendUnavailableError,
    auto_candidates,
    available_backends,  # deprecated: backend_names
    backend_class,
    backend_names,
    describe_backends,
    get_backend,
    register_backend,
    require_backend,
)
from sparsify.backends import torch as _torch_backend  # noqa: F401,E402  (registers "torch")
from sparsify.backends import triton as _triton_backend  # noqa: F401,E402  (registers "triton")
from sparsify.backends import flex as _flex_backend  # noqa: F401,E402  (registers "flex")
from sparsify.backends import fa4 as _fa4_backend  # noqa: F401,E402  (registers "fa4")

__all__ = [
    "Backend",
    "BackendFeatures",
    "BackendPlan",
    "BackendUnavailableError",
    "auto_candidates",
    "backend_class",
    "backend_names",
    "describe_backends",
    "get_backend",
    "register_backend",
    "require_backend",
]
