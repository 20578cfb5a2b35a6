"""The `triton` backend: our fused block-sparse flash-attention kernel (`triton_kernels`), the portable GPU fallback.

All heads of a plan run in one launch; `prepare` derives the launch metadata (work list sorted
heaviest row first, the mask's full and partial block lists on the device) once per mask, and
the plan keeps the direct launches of the call layouts it has seen.

Where it runs: CUDA tensors when Triton imports. With ``TRITON_INTERPRET=1`` set before Triton
is imported, the same kernel also runs on CPU tensors through Triton's interpreter (slow; for
tests; ``backend="auto"`` never picks it there).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from sparsify.backends.base import Backend, BackendFeatures, BackendPlan, register_backend
from sparsify.errors import UnsupportedError
from sparsify.block_mask import RuntimeBlockMask
from sparsify.site import AttentionSite

__all__ = ["TritonBackend", "TritonPlan"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclasses.dataclass
class TritonPlan(BackendPlan):
    """The triton backend's plan: the kernel's launch metadata for one mask."""

    launch: object = None  # triton_kernels.LaunchPlan


@register_backend("triton")
class TritonBackend(Backend):
    """Fused block-sparse attention forward in Triton; CUDA, fp16/bf16/fp32; forward only.

    ``fast_launch`` (default: on unless the environment sets ``SPARSIFY_TRITON_FAST_LAUNCH=0``)
    lets repeat calls of a plan take the cached direct launch (`triton_kernels`); off, every call
    takes the full host path (same results, bitwise).

    Example:
        >>> backend = get_backend("triton")                                  # doctest: +SKIP
        >>> out = backend.attention(q, k, v, mask)                           # doctest: +SKIP
    """

    features = BackendFeatures(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                               max_head_dim=256, training=False, cuda_graphs=True)
    auto_priority = 20
    install_hint = "pip install triton (it ships with CUDA builds of torch)"

    def __init__(self, fast_launch: bool | None = None) -> None:
        if fast_launch is None:
            fast_launch = os.environ.get("SPARSIFY_TRITON_FAST_LAUNCH", "1") != "0"
        self.fast_launch = bool(fast_launch)

    def availability(self, device: torch.device | str | None = None) -> str | None:
        if not _triton_importable():
            return "triton is not installed"
        if device is not None:
            kind = torch.device(device).type
            if kind == "cpu" and _interpreting():
                return None
            if kind != "cuda":
                return (f"the triton kernel runs on CUDA tensors only, got {kind} "
                        "(CPU only through TRITON_INTERPRET=1, for tests)")
        elif not (torch.cuda.is_available() or _interpreting()):
            return "no CUDA device in this process"
        return None

    def unsupported_reason(self, site: AttentionSite, dtype: torch.dtype, device) -> str | None:
        reason = super().unsupported_reason(site, dtype, device)
        if reason is None and torch.device(device).type == "cpu" and dtype == torch.bfloat16:
            # Triton's CPU interpreter emulates bf16 through numpy and returns wrong numbers.
            return "bfloat16 is not supported by Triton's CPU interpreter (it is on CUDA)"
        return reason

    def prepare(self, mask: RuntimeBlockMask, *, q_shape, k_shape, v_shape, dtype, device) -> TritonPlan:
        from sparsify.backends import triton_kernels as kernels

        device = torch.device(device)
        reason = self.availability(device)
        if reason is not None:
            raise UnsupportedError(f"triton backend: {reason}")
        if q_shape[1] != mask.num_heads:
            raise UnsupportedError(f"triton backend: q has {q_shape[1]} heads but the mask describes {mask.num_heads}")
        return TritonPlan(mask=mask.to(device), q_shape=tuple(q_shape), k_shape=tuple(k_shape),
                          v_shape=tuple(v_shape), dtype=dtype, device=device, launch=kernels.plan_launch(mask, device))

    def run(self, plan: TritonPlan, q, k, v, *, attn_mask=None, scale=None, softcap=None, sinks=None) -> torch.Tensor:
        from sparsify.backends import triton_kernels as kernels

        if q.shape != plan.q_shape or q.dtype != plan.dtype:  # cheap: the kernel checks the rest
            plan.check_call(q, k, v, self.name)
        return kernels.block_sparse_attention(q, k, v, plan.launch, attn_mask=attn_mask, scale=scale,
                                              softcap=softcap, sinks=sinks, fast_launch=self.fast_launch)
