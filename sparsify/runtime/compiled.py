"""The `torch.compile` path of a site: the sparse kernel as a ``torch.library`` custom op, everything else traceable.

Eager calls of `SparseAttention.attend` keep their lean path (cached mask, backend and plan,
a direct ``backend.run``). Under ``torch.compile`` (``torch.compiler.is_compiling()``) the site
calls `compiled_attend` instead, which dynamo traces without graph breaks:

* dense and skipped heads are plain tensor ops (SDPA, ``index_select``/``index_copy_``);
* the runtime mask is a read of the site's mask cache, a dict that dynamo guards on; a length
  the cache does not hold yet is built while dynamo traces (`ensure_runtime_mask` through
  `TraceTimeCalls`, a constant result), so the graph does not break for it. Symbolic lengths
  (dynamic shapes) are specialised there (``guard_scalar``): a graph serves one set of lengths, as its masks do;
* the backend is resolved once per (dtype, device, user-mask layout) at trace time
  (`resolve_backend_name`, also through `TraceTimeCalls`), and its name is an argument of the kernel op;
* the kernel is ``torch.ops.sparsify.block_sparse_attention``: q/k/v, the user's ``attn_mask``,
  the runtime mask's tensors and plain scalars in, the attention of the sparse heads out. A fake
  kernel gives its shape, so dynamo and Inductor treat it as one opaque call. Its implementation
  rebuilds the `RuntimeBlockMask` from the tensors, prepares the backend's plan and runs it.
  Plans are not cached across calls (the op has no owner to keep them): GPU backends' ``prepare``
  is device work only (triton, fa4 after its first compile); the ``torch`` backend's host plan costs
  a few percent of its run on CPU. Backend instances (which hold compiled kernels, e.g. fa4's) are
  kept by the op, one per backend name (`KernelBackends`).
* gradients: the op has an autograd formula by recomputation — its backward op reruns the
  attention with the differentiable ``torch`` backend and returns the input gradients — so
  training under ``torch.compile`` works with every backend (forward on the fast kernel, backward
  at the speed of the ``torch`` backend).

Input-adaptive heads: their mask estimator runs outside the graph (`estimate_adaptive_mask`, one
graph break per site that has such heads); their kernel call is the same op.

Dense warm-up steps: the site reads its step counter's ``dense_phase`` (``dense_steps -> bool``,
kept up to date outside the graph by `StepCounter` and by the diffusers door's
`DenoisingStepTracker`), so they cost one extra compiled variant, not a recompile per step; a
counter without ``dense_phase`` is read as an int, which dynamo guards on.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar

from sparsify.runtime.block_mask import RuntimeBlockMask

if TYPE_CHECKING:
    from sparsify.backends.base import Backend
    from sparsify.runtime.site import SparseAttention

logger = logging.getLogger(__name__)

__all__ = ["KernelBackends", "TraceTimeCalls", "block_sparse_attention", "compiled_attend", "ensure_runtime_mask",
           "resolve_backend_name"]


class KernelBackends:
    """The backend instances the kernel op runs on: one per backend name, created on first use.

    An instance holds what its kernels need across calls (fa4's compiled kernels, flex's compiled
    function), so every graph that calls the op with the same backend name shares one. Owned by
    the op, which is registered once per process.

    Example:
        >>> KernelBackends().get("torch").name
        'torch'
    """

    def __init__(self) -> None:
        self._instances: dict[str, "Backend"] = {}

    def get(self, name: str) -> "Backend":
        """The instance of backend ``name`` (unknown names raise, listing the known ones)."""
        backend = self._instances.get(name)
        if backend is None:
            from sparsify.backends.base import get_backend

            backend = get_backend(name)
            self._instances[name] = backend
        return backend


_KERNELS = KernelBackends()


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
) -> torch.Tensor:
    """Block-sparse attention of the heads a runtime mask describes, on backend ``backend`` (an opaque op).

    The runtime mask travels as its tensors and fields (`RuntimeBlockMask`); the result is what
    ``backend.run`` returns: ``[batch, mask heads, q_len, value_head_dim]``.

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
    kernel = _KERNELS.get(backend)
    plan = kernel.prepare(mask, q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape), dtype=q.dtype,
                          device=q.device)
    output = kernel.run(plan, q, k, v, attn_mask=attn_mask, scale=scale, softcap=softcap, sinks=sinks)
    if output.dtype != q.dtype:
        output = output.to(q.dtype)
    # A custom op's output must not alias an input (a backend could return a view of one).
    aliases = any(output.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in (q, k, v))
    return output.clone() if aliases else output


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                 kv_head_index, block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap,
                                 sinks, backend):
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
    mask = _mask_from_tensors(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index,
                              block_size, q_len, k_len, causal, q_offset, per_input)
    reference = _KERNELS.get("torch")
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
     q_len, k_len, causal, q_offset, per_input, scale, softcap, sinks, _backend) = inputs
    ctx.save_for_backward(q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                          kv_head_index, sinks)
    ctx.scalars = (block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap)


def _backward(ctx, grad_output):
    q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_head_index, sinks = (
        ctx.saved_tensors)
    block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap = ctx.scalars
    dq, dk, dv, dsinks = torch.ops.sparsify.block_sparse_attention_backward(
        grad_output, q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        kv_head_index, block_size, q_len, k_len, causal, q_offset, per_input, scale, softcap, sinks)
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, None, None,
            dsinks if sinks is not None else None, None)


block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)


# --- outside the graph: masks and backends ------------------------------------------------------


def ensure_runtime_mask(layer: "SparseAttention", q_len: int, k_len: int, q_offset: int, device: str) -> bool:
    """Build ``layer``'s runtime mask for these lengths into its cache unless it is there (runs at trace time).

    Dynamo runs this function while it traces (through `TraceTimeCalls`, its result a constant), so
    the mask is built outside the graph and the dict read that follows finds it: no graph break.
    """
    key = (q_len, k_len, q_offset, device)
    if key not in layer._masks:
        logger.debug("site %s: building the runtime mask for q_len=%d, k_len=%d, q_offset=%d on %s for a compiled "
                     "graph", layer.site.name, q_len, k_len, q_offset, device)
        layer.runtime_mask(q_len, k_len, torch.device(device), q_offset)
    return True


def resolve_backend_name(layer: "SparseAttention", dtype: torch.dtype, device: torch.device,
                         mask_layout: tuple | None) -> str:
    """The name of the backend ``layer`` uses for these inputs (run at trace time; its result is a graph constant).

    Gradients do not narrow the choice: the kernel op's backward recomputes with the ``torch``
    backend, so the forward may run on a kernel that computes none. ``mask_layout`` is ``None`` or
    ``(shape, stride, dtype)`` of the user's ``attn_mask`` for the sparse heads: a backend that
    cannot take that mask is replaced by the one an eager call would fall back to.
    """
    backend = layer.backend_for(dtype, device, needs_grad=False)
    if mask_layout is not None:
        shape, stride, mask_dtype = mask_layout
        probe = torch.empty_strided(shape, stride, dtype=mask_dtype, device="meta")
        if backend.attn_mask_problem(probe) is not None:
            backend = layer._backend_for_mask(backend, probe, dtype, torch.device(device), False)
    return backend.name


class TraceTimeCalls:
    """A site's calls that dynamo runs while it traces, their results graph constants: one pair per `SparseAttention`.

    ``torch.compiler.assume_constant_result`` needs arguments dynamo can turn into Python
    constants, and torch 2.11 cannot do that for a module; so each site gets two plain functions
    closed over a weak reference to it, called with lengths, dtypes and devices only. The site
    makes them at construction and again when it is copied (``copy.deepcopy`` or unpickling), so a
    copy never reaches the original's caches.

    Example:
        >>> calls = TraceTimeCalls(layer)                                        # doctest: +SKIP
        >>> calls.ensure_mask(4096, 4096, 0, "cuda:0")                           # doctest: +SKIP
        True
    """

    def __init__(self, layer: "SparseAttention"):
        owner = weakref.ref(layer)

        @torch.compiler.assume_constant_result
        def ensure_mask(q_len: int, k_len: int, q_offset: int, device: str) -> bool:
            return ensure_runtime_mask(owner(), q_len, k_len, q_offset, device)

        @torch.compiler.assume_constant_result
        def backend_name(dtype: torch.dtype, device: torch.device, mask_layout: tuple | None) -> str:
            return resolve_backend_name(owner(), dtype, device, mask_layout)

        self.ensure_mask = ensure_mask
        self.backend_name = backend_name


# --- the compiled attention of one site ---------------------------------------------------------


@torch.compiler.disable
def estimate_adaptive_mask(layer: "SparseAttention", q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                           q_offset: int, scale: float | None) -> RuntimeBlockMask:
    """The per-input mask of ``layer``'s adaptive heads for this call, estimated outside the graph.

    The estimators are device work, but not all of them trace (e.g. the vertical-slash estimator
    reads its probe size from a tensor), so they run eagerly: one graph break per site with
    input-adaptive heads. Their kernel call is in the graph like any other.
    """
    return layer.adaptive_source.mask(q, k, attn_mask=attn_mask, q_offset=int(q_offset), scale=scale)


def in_dense_steps(layer: "SparseAttention") -> bool:
    """Whether ``layer`` runs dense now because of its dense warm-up steps (see the module docstring)."""
    if not layer.dense_steps or layer.step_counter is None:
        return False
    phases = getattr(layer.step_counter, "dense_phase", None)
    if phases is not None and layer.dense_steps in phases:
        return bool(phases[layer.dense_steps])
    return layer.step_counter.step < layer.dense_steps


def compiled_attend(layer: "SparseAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: torch.Tensor | None, scale: float | None, *, is_causal: bool, q_offset: int,
                    softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """`SparseAttention.attend` in a form dynamo traces without graph breaks (same semantics, same errors).

    Dense heads run SDPA (which Inductor lowers to its fused kernels); static sparse heads and
    input-adaptive heads run the kernel op, adaptive heads with the mask their estimator builds from
    this call's q and k (`estimate_adaptive_mask`, outside the graph).

    Example:
        >>> compiled = torch.compile(compiled_model)       # sites call this while dynamo traces  # doctest: +SKIP
    """
    from sparsify.runtime.site import _dense, _select_heads

    dense_only = (layer.sparse_heads.numel() == 0 and layer.skipped_heads.numel() == 0
                  and layer.adaptive_heads.numel() == 0)
    if dense_only or in_dense_steps(layer):
        return _dense(q, k, v, attn_mask, is_causal, scale, q_offset, softcap, sinks)
    attn_mask = layer.checked_call(q, k, attn_mask, is_causal)
    output = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if layer.skipped_heads.numel():
        output.index_fill_(1, layer.skipped_heads, 0)
    if layer.dense_heads.numel():
        dense_out = _dense(q.index_select(1, layer.dense_heads), k.index_select(1, layer.dense_kv_heads),
                           v.index_select(1, layer.dense_kv_heads), _select_heads(attn_mask, layer.dense_heads),
                           is_causal, scale, q_offset, softcap,
                           sinks.index_select(0, layer.dense_heads) if sinks is not None else None)
        output.index_copy_(1, layer.dense_heads, dense_out)
    if layer.sparse_heads.numel():
        # Masks are per length: symbolic lengths (dynamic shapes) specialise here, with a guard on their values.
        lengths = (guard_scalar(q.shape[2]), guard_scalar(k.shape[2]), guard_scalar(q_offset))
        layer._trace_time_ensure_mask(*lengths, str(q.device))
        mask = layer._masks[(*lengths, str(q.device))]                 # a dict read dynamo guards on
        output.index_copy_(1, layer.sparse_heads, _kernel(layer, layer.sparse_heads, mask, q, k, v, attn_mask, scale,
                                                          softcap, sinks).to(output.dtype))
    if layer.adaptive_heads.numel():
        heads = layer.adaptive_heads
        mask = estimate_adaptive_mask(layer, q.index_select(1, heads), k, _select_heads(attn_mask, heads), q_offset,
                                      scale)
        output.index_copy_(1, heads, _kernel(layer, heads, mask, q, k, v, attn_mask, scale, softcap,
                                             sinks).to(output.dtype))
    return output


def _kernel(layer: "SparseAttention", heads: torch.Tensor, mask: RuntimeBlockMask, q, k, v, attn_mask, scale, softcap,
            sinks) -> torch.Tensor:
    """The kernel op for the query heads ``heads`` of the site under ``mask``."""
    from sparsify.runtime.site import _select_heads

    head_mask = _select_heads(attn_mask, heads)
    layout = None
    if head_mask is not None:
        layout = (tuple(int(s) for s in head_mask.shape), tuple(int(s) for s in head_mask.stride()), head_mask.dtype)
    backend = layer._trace_time_backend_name(q.dtype, q.device, layout)
    return torch.ops.sparsify.block_sparse_attention(
        q.index_select(1, heads), k, v, head_mask, mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
        mask.full_kv_indices, mask.kv_head_index, mask.block_size, mask.q_len, mask.k_len, mask.causal,
        mask.q_offset, mask.per_input, scale, softcap,
        sinks.index_select(0, heads) if sinks is not None else None, backend)
