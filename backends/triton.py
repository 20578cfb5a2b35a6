"""The `triton` backend: our fused block-sparse flash-attention kernel (`triton_kernels`).

All sparse heads of a site run in one launch; launch metadata (work list sorted heaviest row
first, full/partial block counts) is derived once per block-tables object and cached.

Where it runs: CUDA tensors when Triton imports. With ``TRITON_INTERPRET=1`` set before Triton
is imported, the same kernel also runs on CPU tensors through Triton's interpreter (slow; for
tests).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import threading
import weakref

import torch

from sparsify.backends.base import Backend, register_backend
from sparsify.errors import UnsupportedError
from sparsify.site import AttentionSite
from sparsify.tables import BlockTables

__all__ = ["TritonBackend"]

_PLAN_CACHE_SIZE = 128
_plan_cache: collections.OrderedDict = collections.OrderedDict()
_plan_lock = threading.Lock()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@register_backend("triton")
class TritonBackend(Backend):
    """Fused block-sparse attention forward in Triton; CUDA, fp16/bf16 (fp32 in TF32).

    Example:
        >>> from sparsify.backends import get_backend  # doctest: +SKIP
        >>> out = get_backend("triton").attention(q, k, v, tables)  # doctest: +SKIP
    """

    def is_available(self) -> bool:
        if not _triton_importable():
            return False
        return torch.cuda.is_available() or _interpreting()

    def unsupported_reason(self, site: AttentionSite, dtype: torch.dtype, device: torch.device) -> str | None:
        if not _triton_importable():
            return "triton is not installed (pip install triton)"
        device = torch.device(device)
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            return (f"the triton kernel runs on CUDA tensors only, got {device.type} "
                    "(CPU only through TRITON_INTERPRET=1, for tests)")
        from sparsify.backends import triton_kernels as kernels

        if dtype not in kernels.SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported; supported: float16, bfloat16, float32 (as TF32)"
        if device.type == "cpu" and dtype == torch.bfloat16:
            # Triton's CPU interpreter emulates bf16 through numpy and returns wrong numbers.
            return "bfloat16 is not supported by Triton's CPU interpreter (it is on CUDA)"
        head_dim = max(site.head_dim, site.value_head_dim or site.head_dim)
        if head_dim > kernels.MAX_HEAD_DIM:
            return f"head dim {head_dim} is over the kernel's limit {kernels.MAX_HEAD_DIM}"
        return None

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
        if not q.is_cuda and not (q.device.type == "cpu" and _interpreting()):
            raise UnsupportedError(f"the triton backend needs CUDA tensors, got {q.device.type}")
        kernels = _kernels()
        plan = _get_plan(tables, q.device)
        return kernels.block_sparse_attention(q, k, v, tables, attn_mask=attn_mask, scale=scale, plan=plan)


_kernels_module = None


def _kernels():
    global _kernels_module
    if _kernels_module is None:
        from sparsify.backends import triton_kernels

        _kernels_module = triton_kernels
    return _kernels_module


# Last plan per tables object (by id, checked through weak references and tensor versions):
# the common case of one tables object called again and again skips the keyed cache below.
_recent_plans: dict = {}


def _get_plan(tables: BlockTables, device: torch.device):
    tensors = (tables.kv_indices, tables.kv_counts, tables.kv_head_index)
    scalars = (tables.block_size, tables.q_len, tables.k_len, bool(tables.causal), device)
    recent = _recent_plans.get(id(tables))
    if recent is not None:
        tref, refs, versions, rscalars, plan = recent
        if (tref() is tables and rscalars == scalars
                and all(ref() is t and t._version == ver for ref, t, ver in zip(refs, tensors, versions))):
            return plan
    plan = _get_plan_keyed(tables, device, tensors)
    entry = (weakref.ref(tables), tuple(weakref.ref(t) for t in tensors),
             tuple(t._version for t in tensors), scalars, plan)
    with _plan_lock:
        while len(_recent_plans) >= _PLAN_CACHE_SIZE:
            _recent_plans.pop(next(iter(_recent_plans)))
        _recent_plans[id(tables)] = entry
    return plan


def _get_plan_keyed(tables: BlockTables, device: torch.device, tensors: tuple):
    kernels = _kernels()
    key = (tuple((id(t), t._version) for t in tensors), tables.block_size, tables.q_len,
           tables.k_len, bool(tables.causal), str(device))
    with _plan_lock:
        hit = _plan_cache.get(key)
        if hit is not None:
            refs, plan = hit
            if all(ref() is t for ref, t in zip(refs, tensors)):
                _plan_cache.move_to_end(key)
                return plan
    plan = kernels.plan_launch(tables, device)
    with _plan_lock:
        _plan_cache[key] = (tuple(weakref.ref(t) for t in tensors), plan)
        while len(_plan_cache) > _PLAN_CACHE_SIZE:
            _plan_cache.popitem(last=False)
    return plan
