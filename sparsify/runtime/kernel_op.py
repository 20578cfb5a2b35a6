"""The block-sparse kernel as a ``torch.library`` custom op, and the handles by which the op reaches the site that owns its plans.

`SparseAttention.attend` (``sparsify.runtime.sparse_attention``) has one attend path for eager
and compiled calls; every group of heads that runs on a backend is one call of
``torch.ops.sparsify.block_sparse_attention``. A fake kernel gives the op's shape, so dynamo and
Inductor treat it as one opaque call. In eager mode with nothing for autograd to record, the site
calls the op's implementation (`SparseAttention.run_kernel`) itself, sparing the dispatcher's
custom-op machinery (host time on every call).

Plans are prepared once per (mask, call shape), not per call: the op takes a *site handle*, a
small int naming the `SparseAttention` that made the call (`SiteHandles`), and the slot of its
mask (``"sparse"`` or ``"dense"``: static masks the site caches per lengths; ``""``: a mask
built for this call only, e.g. by an input-adaptive estimator, prepared per call). The op's
implementation asks that site for the plan (`SparseAttention.run_kernel`), so plans and backend
instances (compiled kernels included) live on the module, and die with it. The op's only
process-wide state is the table of *weak* references from handle to site: it keeps nothing
alive and holds no kernel. A call without a handle (0; ``torch.library.opcheck``, one-off
calls) prepares a fresh backend instance per call.

Why a table and not the module itself as an argument: a custom op takes schema types only
(tensors, numbers, strings, lists of them), and a site's plans are not tensors alone (FA4's
compiled CuTe kernels and Triton's launch settings live on the backend instance), so the op must
reach a Python object. Handing the tensors and a backend *name* instead would need a
process-global cache of compiled kernels by name (what this design removed); a graph break
around the kernel would break ``fullgraph`` compiles. The one way to pass a Python object to a
custom op is torch's opaque reference type (``torch._library.opaque_object.register_opaque_type(...,
typ="reference")``, a private API). torch 2.13 takes such an argument through dynamo, Inductor
and CUDA graphs; torch 2.11 compiles it but refuses CUDA graphs for any graph with an opaque
input ("non-Tensor inputs", pytorch/pytorch#176615, fixed after the 2.11 branch cut by #179793),
so ``mode="reduce-overhead"`` would silently run without CUDA graphs there. While torch 2.11 is
supported, the int handle stays; once the oldest supported torch takes opaque inputs under CUDA
graphs, `SparseAttention` can pass itself (a `KernelOwner`) and this table goes.

Under CUDA graphs (``torch.compile(mode="reduce-overhead")``) the op's implementation runs once
in the warm-up (the plan is prepared then) and once while the graph is captured (the cached plan
runs: no host work, no host sync); replays run the recorded kernels only.

Gradients: the op has an autograd formula by recomputation — its backward op reruns the attention
with the differentiable ``torch`` backend and returns the input gradients — so training works with
every backend, eager or compiled (forward on the fast kernel, backward at the speed of the
``torch`` backend).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Protocol

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparsify.block_mask import RuntimeBlockMask

logger = logging.getLogger(__name__)

__all__ = ["KernelOwner", "SiteHandles", "block_sparse_attention", "block_sparse_attention_backward",
           "may_skip_custom_op"]


def may_skip_custom_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` may run a custom op's implementation directly instead of the op.

    True in eager mode for plain tensors (no fake, functional or other subclass, no proxy) with
    nothing for autograd to record and nothing else watching the dispatcher: the op would run
    exactly its implementation, and the dispatcher's custom-op machinery only costs host time on
    every call. The op stays under ``torch.compile`` (it is what keeps the kernel one opaque node),
    under ``torch.jit.trace``, a ``TorchDispatchMode`` (``make_fx``, ``FlopCounterMode``) and
    functorch transforms (``vmap``): each of them would otherwise see the kernel's allocations but
    not the kernel.

    Example:
        >>> may_skip_custom_op(torch.zeros(2), None)
        True
        >>> may_skip_custom_op(torch.zeros(2, requires_grad=True))
        False
    """
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    return all(tensor is None or (type(tensor) in (torch.Tensor, torch.nn.Parameter)
                                  and not (grad and tensor.requires_grad))
               for tensor in tensors)


class KernelOwner(Protocol):
    """What the op needs of the module that owns a site's plans (`SparseAttention` implements it)."""

    def run_kernel(self, mask_slot: str, mask: RuntimeBlockMask, backend: str, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None, softcap: float | None,
                   sinks: torch.Tensor | None) -> torch.Tensor: ...


class SiteHandles:
    """Small int handles for the modules that own kernel plans, resolved by the kernel op; weak references only.

    A compiled graph carries the handle as a constant (a module cannot be an argument of a custom
    op); the module registers itself at construction and again when it is copied or unpickled, so
    a copy gets its own handle and never reaches the original's plans.

    Example:
        >>> handles = SiteHandles()
        >>> class Owner: ...
        >>> owner = Owner()
        >>> handle = handles.register(owner)
        >>> handles.owner(handle) is owner
        True
    """

    def __init__(self) -> None:
        self._owners: weakref.WeakValueDictionary[int, KernelOwner] = weakref.WeakValueDictionary()
        self._next = itertools.count(1)

    def register(self, owner: KernelOwner) -> int:
        """A new handle for ``owner`` (held weakly)."""
        handle = next(self._next)
        self._owners[handle] = owner
        return handle

    def owner(self, handle: int) -> KernelOwner:
        """The module behind ``handle``; a handle whose module is gone raises, saying so."""
        owner = self._owners.get(handle)
        if owner is None:
            raise RuntimeError(f"sparsify kernel op: the SparseAttention module of site handle {handle} no longer "
                               f"exists (a compiled graph outlived the model it was compiled from); compile the "
                               f"model again")
        return owner


#: The kernel op's table of site handles (weak references; see `SiteHandles`).
SITE_HANDLES = SiteHandles()


def _mask_from_tensors(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index, block_size,
                       q_len, k_len, causal, q_offset, per_input) -> RuntimeBlockMask:
    return RuntimeBlockMask(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index,
                            block_size, q_len, k_len, causal, q_offset, per_input)


@torch.library.custom_op("sparsify::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    kv_head_index: torch.Tensor,
    block_size: int,
    q_len: int,
    k_len: int,
    causal: bool,
    q_offset: int,
    per_input: bool,
    scale: float | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    backend: str,
    site_handle: int = 0,
    mask_slot: str = "",
) -> torch.Tensor:
    """Block-sparse attention of the heads a runtime mask describes, on backend ``backend`` (an opaque op).

    The runtime mask travels as its tensors and fields (`RuntimeBlockMask`); the result is what
    ``backend.run`` returns: ``[batch, mask heads, q_len, value_head_dim]``. ``site_handle`` is the
    handle of the module that owns the plans (`SiteHandles`; 0: none, prepare per call) and
    ``mask_slot`` names the site's cached mask (``""``: a mask for this call only).

    Example:
        >>> mask = RuntimeBlockMask.dense(2, block_size=16, q_len=32, k_len=32, causal=True)
        >>> q = torch.randn(1, 2, 32, 8)
        >>> torch.ops.sparsify.block_sparse_attention(
        ...     q, q, q, None, mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
        ...     mask.kv_head_index, 16, 32, 32, True, 0, False, None, None, None, "torch").shape
        torch.Size([1, 2, 32, 8])
    """
    mask = _mask_from_tensors(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index,
                              block_size, q_len, k_len, causal, q_offset, per_input)
    if site_handle:
        output = SITE_HANDLES.owner(site_handle).run_kernel(mask_slot, mask, backend, q, k, v, attn_mask, scale,
                                                            softcap, sinks)
    else:
        from sparsify.backends.base import get_backend

        output = get_backend(backend).attention(q, k, v, mask, attn_mask=attn_mask, scale=scale, softcap=softcap,
                                                sinks=sinks)
    if output.dtype != q.dtype:
        output = output.to(q.dtype)
    # A custom op's output must not alias an input (a backend could return a view of one).
    aliases = any(output.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in (q, k, v))
    return output.clone() if aliases else output


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                 kv_head_index, block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap,
                                 sinks, backend, site_handle=0, mask_slot=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("sparsify::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
    grad_output: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    kv_head_index: torch.Tensor,
    block_size: int,
    q_len: int,
    k_len: int,
    causal: bool,
    q_offset: int,
    per_input: bool,
    scale: float | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dsinks)`` of `block_sparse_attention`, by recomputing it with the ``torch`` backend.

    ``dsinks`` is an empty tensor when there are no sinks.
    """
    from sparsify.backends.base import get_backend

    mask = _mask_from_tensors(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index,
                              block_size, q_len, k_len, causal, q_offset, per_input)
    reference = get_backend("torch")
    plan = reference.prepare(mask, q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
                             dtype=q.dtype, device=q.device)

    def attention(q, k, v, sinks=None):
        return reference.run(plan, q, k, v, attn_mask=attn_mask, scale=scale, softcap=softcap, sinks=sinks)

    # A custom op runs below autograd: torch.func's vjp differentiates the recomputation all the same.
    inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    output, vjp = torch.func.vjp(attention, *inputs)
    grads = vjp(grad_output.to(output.dtype))
    dsinks = grads[3] if sinks is not None else q.new_empty(0)
    return grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), dsinks


@block_sparse_attention_backward.register_fake
def _block_sparse_attention_backward_fake(grad_output, q, k, v, attn_mask, kv_num_blocks, kv_indices,
                                          full_kv_num_blocks, full_kv_indices, kv_head_index, block_size, q_len,
                                          k_len, causal, q_offset, per_input, scale, softcap, sinks):
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index, block_size,
     q_len, k_len, causal, q_offset, per_input, scale, softcap, sinks, _backend, *_owner) = inputs
    ctx.save_for_backward(q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                          kv_head_index, sinks)
    ctx.scalars = (block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap)
    ctx.trailing = len(inputs) - 19  # the optional site handle and mask slot, when given


def _backward(ctx, grad_output):
    q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index, sinks = (
        ctx.saved_tensors)
    block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap = ctx.scalars
    dq, dk, dv, dsinks = torch.ops.sparsify.block_sparse_attention_backward(
        grad_output, q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        kv_head_index, block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap, sinks)
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, None, None,
            dsinks if sinks is not None else None, None) + (None,) * ctx.trailing


block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)
