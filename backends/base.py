"""The interface every attention backend implements (prepare → run), what each declares, and the registry."""

from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, Callable, ClassVar, TypeVar

import torch

from sparsify.errors import UnsupportedError
from sparsify.block_mask import RuntimeBlockMask
from sparsify.site import AttentionSite

__all__ = [
    "Backend",
    "BackendFeatures",
    "BackendPlan",
    "BackendUnavailableError",
    "backend_class",
    "backend_names",
    "get_backend",
    "register_backend",
]


class BackendUnavailableError(UnsupportedError):
    """A backend was asked for by name, but this process cannot run it (package, device, compute capability)."""


@dataclasses.dataclass(frozen=True)
class BackendFeatures:
    """What a backend serves, declared once by the backend itself.

    Attributes:
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes it accepts.
        max_head_dim: the largest query/key or value head dim.
        attn_mask: which user ``attn_mask`` (bool or additive, on top of the block mask) it takes:
            ``"any"`` (broadcastable to ``[B, H, Sq, Sk]``), ``"key_padding"`` (one value per batch
            element and key, broadcastable from ``[B, 1, 1, Sk]``) or ``"none"``.
        per_input_masks: takes runtime masks with a batch dimension (masks estimated per input).
        softcap: applies ``softcap * tanh(scores / softcap)`` (Gemma2).
        sinks: adds learned per-head sink logits to the softmax (gpt-oss).
        training: its output is differentiable (autograd through ``run``).
        cuda_graphs: a ``run`` can be captured in a CUDA graph (no host sync, no host allocation).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int = 256
    attn_mask: str = "any"
    per_input_masks: bool = True
    softcap: bool = True
    sinks: bool = True
    training: bool = False
    cuda_graphs: bool = False


@dataclasses.dataclass
class BackendPlan:
    """What `Backend.prepare` derived from one mask for one call shape; reused by every `Backend.run`.

    Backends subclass it to hold their launch data. ``q_shape``/``k_shape``/``v_shape`` are the
    shapes the plan serves; a call with other shapes is refused.
    """

    mask: RuntimeBlockMask
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def check_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> None:
        """Raise `UnsupportedError` when a call does not fit the shapes this plan was prepared for."""
        if q.shape != self.q_shape or k.shape != self.k_shape or v.shape != self.v_shape or q.dtype != self.dtype:
            raise UnsupportedError(
                f"{backend} backend: this plan was prepared for q {tuple(self.q_shape)}, k {tuple(self.k_shape)}, "
                f"v {tuple(self.v_shape)} in {self.dtype}; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)} in {q.dtype} (prepare a plan per call shape)"
            )


class Backend(abc.ABC):
    """A way to run block-sparse attention for some heads of one site: ``prepare`` once per mask, ``run`` per call.

    ``run(plan, q, k, v, ...)`` receives

    * ``q`` — ``[batch, heads, q_len, head_dim]`` with ``heads == plan.mask.num_heads``,
    * ``k``/``v`` — ``[batch, kv_heads, k_len, head_dim]``; query head ``h`` reads key/value
      head ``mask.kv_head_index[h]``,
    * ``attn_mask`` — ``None``, bool (True = attend) or additive float, broadcastable to
      ``[batch, heads, q_len, k_len]``,
    * ``scale`` (``None``: ``1 / sqrt(head_dim)``), ``softcap`` and ``sinks`` (``[heads]``),

    and returns ``[batch, heads, q_len, value_head_dim]`` equal to dense attention restricted to
    ``plan.mask.element_mask()`` and ``attn_mask``. A query row with no visible key returns
    zeros, never NaN. State lives on the plan or on the backend instance, never in module globals.

    A backend declares, in its class: ``name`` (by `register_backend`), ``features``
    (`BackendFeatures`), ``auto_priority`` (order in which ``backend="auto"`` considers it;
    ``None``: never), ``cost_key`` (its hardware-profile key), ``onnx_lowering`` (the name of the
    `sparsify.export` lowering that reproduces it, or ``None``) and ``install_hint``.
    """

    name: ClassVar[str] = ""
    features: ClassVar[BackendFeatures]
    auto_priority: ClassVar[int | None] = None
    cost_key: ClassVar[str] = ""
    onnx_lowering: ClassVar[str | None] = "block_gather"
    install_hint: ClassVar[str] = ""

    # --- availability ---------------------------------------------------------------------------

    def availability(self, device: torch.device | str | None = None) -> str | None:
        """``None`` when this process can run the backend (on ``device`` when given), else the reason."""
        if device is not None and torch.device(device).type not in self.features.devices:
            kinds = " / ".join(kind.upper() if kind == "cuda" else kind for kind in self.features.devices)
            return f"it runs on {kinds} tensors only, not {torch.device(device).type}"
        return None

    def is_available(self, device: torch.device | str | None = None) -> bool:
        """Whether `availability` finds nothing missing."""
        return self.availability(device) is None

    def unsupported_reason(self, site: AttentionSite, dtype: torch.dtype, device: torch.device | str) -> str | None:
        """``None`` when the backend serves ``site`` for inputs of ``dtype`` on ``device``, else why not."""
        reason = self.availability(device)
        if reason is not None:
            return reason
        features = self.features
        if dtype not in features.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in features.dtypes)
            return f"dtype {str(dtype).replace('torch.', '')} is not supported; supported: {names}"
        head_dim = max(site.head_dim, site.value_head_dim or site.head_dim)
        if head_dim > features.max_head_dim:
            return f"head dim {head_dim} is over its limit {features.max_head_dim}"
        if getattr(site, "softcap", None) and not features.softcap:
            return "it does not apply softcapping (the site softcaps its scores)"
        if getattr(site, "has_sinks", False) and not features.sinks:
            return "it does not support learned attention sinks (the site has them)"
        return None

    def block_size_problem(self, block_size: int, head_dim: int, device: torch.device | str) -> str | None:
        """``None`` when the backend takes blocks of ``block_size`` tokens at ``head_dim`` on ``device``, else why not."""
        return None

    def attn_mask_problem(self, attn_mask: torch.Tensor) -> str | None:
        """``None`` when ``run`` takes this user mask (per the declared ``features.attn_mask``), else why not."""
        kind = self.features.attn_mask
        if kind == "any":
            return None
        if kind == "none":
            return "it takes no attn_mask"
        mask = attn_mask.reshape((1,) * max(0, 4 - attn_mask.dim()) + tuple(attn_mask.shape))
        per_key = all(mask.shape[d] == 1 or mask.stride(d) == 0 for d in (1, 2))
        if not per_key:
            return (f"it takes key-padding masks only (one value per batch element and key, broadcastable from "
                    f"[batch, 1, 1, k_len]); got attn_mask {tuple(attn_mask.shape)}")
        return None

    def supports(self, site: AttentionSite, dtype: torch.dtype, device: torch.device | str) -> bool:
        """Whether ``run`` can serve ``site`` for inputs of ``dtype`` on ``device``."""
        return self.unsupported_reason(site, dtype, device) is None

    # --- prepare / run --------------------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, mask: RuntimeBlockMask, *, q_shape: tuple[int, ...], k_shape: tuple[int, ...],
                v_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> BackendPlan:
        """Host work for one mask and call shape, done once: launch metadata, compiled kernels."""

    @abc.abstractmethod
    def run(self, plan: BackendPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            attn_mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Block-sparse attention of ``plan.mask``'s heads for one call."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: RuntimeBlockMask, *,
                  attn_mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
        """`prepare` and `run` in one call (tests, one-off calls; runtime modules cache the plan).

        Example:
            >>> mask = RuntimeBlockMask.dense(2, block_size=16, q_len=32, k_len=32, causal=True)
            >>> q = torch.randn(1, 2, 32, 8)
            >>> get_backend("torch").attention(q, q, q, mask).shape
            torch.Size([1, 2, 32, 8])
        """
        plan = self.prepare(mask, q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
                            dtype=q.dtype, device=q.device)
        return self.run(plan, q, k, v, attn_mask=attn_mask, scale=scale, softcap=softcap, sinks=sinks)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


_BACKENDS: dict[str, type[Backend]] = {}
BackendClass = TypeVar("BackendClass", bound=type[Backend])


def register_backend(name: str) -> Callable[[BackendClass], BackendClass]:
    """Class decorator adding a backend to the registry under ``name`` (also its default ``cost_key``).

    Example:
        >>> @register_backend("mine")          # doctest: +SKIP
        ... class MyBackend(Backend): ...
    """

    def decorate(cls: BackendClass) -> BackendClass:
        if name in _BACKENDS:
            raise ValueError(f"backend {name!r} is registered twice")
        cls.name = name
        if not cls.cost_key:
            cls.cost_key = name
        _BACKENDS[name] = cls
        return cls

    return decorate


def backend_names() -> list[str]:
    """Names of all registered backends (available in this process or not), sorted."""
    return sorted(_BACKENDS)


def available_backends() -> list[str]:
    """Deprecated name of `backend_names` (it lists every registered backend, available or not); use that."""
    warnings.warn("sparsify.backends.available_backends() is deprecated: it lists every registered backend, "
                  "available or not; use backend_names() (or describe_backends() for availability)",
                  DeprecationWarning, stacklevel=2)
    return backend_names()


def backend_class(name: str) -> type[Backend]:
    """The registered class of ``name``; unknown names raise `UnsupportedError` listing the known ones."""
    if name not in _BACKENDS:
        raise UnsupportedError(f"unknown backend {name!r}; known: auto, {', '.join(backend_names())}")
    return _BACKENDS[name]


def get_backend(name: str) -> Backend:
    """A new instance of the backend ``name`` (each instance owns its own plans and caches).

    Example:
        >>> get_backend("torch").name
        'torch'
    """
    return backend_class(name)()


def require_backend(name: str, device: torch.device | str | None = None) -> Backend:
    """`get_backend` that also refuses, with a `BackendUnavailableError`, a backend this process cannot run.

    The message names what is missing and how to install it.
    """
    backend = get_backend(name)
    reason = backend.availability(device)
    if reason is not None:
        hint = f"; {backend.install_hint}" if backend.install_hint else ""
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}{hint}")
    return backend


def auto_candidates(device: torch.device | str) -> list[Backend]:
    """Backends ``backend="auto"`` considers on ``device``, by their declared ``auto_priority``, available ones only."""
    device = torch.device(device)
    ordered = sorted((cls for cls in _BACKENDS.values() if cls.auto_priority is not None),
                     key=lambda cls: (cls.auto_priority, cls.name))
    found = []
    for cls in ordered:
        if device.type not in cls.features.devices:
            continue
        backend = cls()
        if backend.is_available(device):
            found.append(backend)
    return found


def describe_backends(device: torch.device | str | None = None) -> list[dict[str, Any]]:
    """One row per registered backend: name, availability (with the reason), features — for the CLI and errors."""
    rows = []
    for name in backend_names():
        backend = get_backend(name)
        reason = backend.availability(device)
        rows.append({"name": name, "available": reason is None, "reason": reason or "",
                     "devices": ",".join(backend.features.devices), "training": backend.features.training,
                     "auto_priority": backend.auto_priority, "onnx": backend.onnx_lowering or "-"})
    return rows
