"""The `fa4` backend: block-sparse attention through FlashAttention-4's CuTe DSL forward kernel (sm90, sm100).

FlashAttention-4 (pip ``flash-attn-4``, an optional extra: ``pip install "sparsify-attention[fa4]"``)
takes the runtime mask's two block lists as they are (``BlockSparseTensorsTorch``: "mask" blocks =
our partial blocks, "full" blocks = our full blocks; FlexAttention's layout, batch 1 broadcast).

Two call paths:

* **lean** (sm90, the default): the plan compiles FA4's sm90 forward kernel once per kernel
  configuration (kept on the backend instance, which the sites of one compiled model share) and
  calls the compiled tvm-ffi function directly — a few views, one allocation, one call per ``run``,
  capturable in a CUDA graph. This skips the 140–200 µs of Python FA4's own entry spends per call.
* **entry**: FA4's internal ``_flash_attn_fwd`` (sm100; calls with a key-padding ``attn_mask``,
  applied as a score_mod bias on every block; any configuration whose lean compile failed). Correct,
  with FA4's host overhead. ``SPARSIFY_FA4_LEAN=0`` forces it everywhere.

Semantics: FA4's causal mask is bottom-right aligned; the runtime mask's query offset maps to
FA4's causal mode (offset ``k_len - q_len``) or to a local window with no left bound. GQA follows
``h // group`` on the K/V tensors passed; a subset of heads is served by a strided view of K/V, or a
gather when no view fits. Softcap and learned sinks are FA4's own. Forward only.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import math
import os
import time
import warnings
from typing import Any, Sequence

import torch

from sparsify.backends.base import Backend, BackendFeatures, BackendPlan, register_backend
from sparsify.errors import UnsupportedError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "sparsify-attention[fa4]"'
# The lean path depends on FA4 internals (kernel constructor, positional argument order); it is
# verified for this release only.
VERIFIED_FA4_VERSION = "4.0.0b36"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_SINK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Small pure helpers (testable on CPU)
# ----------------------------------------------------------------------------------------------


def attention_window(causal: bool, q_len: int, k_len: int, q_offset: int) -> tuple[bool, bool, int | None]:
    """``(is_causal, is_local, window_size_right)`` that makes FA4 keep ``key <= q_offset + query``.

    FA4's causal mask is bottom-right aligned (``key <= query + k_len - q_len``); any other offset is a
    local window with no left bound and a right bound of ``q_offset - (k_len - q_len)``, which FA4 takes as
    a runtime value (no recompile per offset).

    Example:
        >>> attention_window(True, 100, 300, 200)
        (True, False, None)
        >>> attention_window(True, 100, 300, 150)
        (False, True, -50)
    """
    if not causal:
        return False, False, None
    delta = q_offset - (k_len - q_len)
    if delta == 0:
        return True, False, None
    return False, True, delta


@dataclasses.dataclass(frozen=True)
class KVHeadLayout:
    """How the query heads of a call map onto key/value heads for FA4 (``kv = h // group``).

    ``head_slice`` selects a strided view of the key/value heads (``None``: all heads, as they are);
    ``gather`` lists the key/value head of every query head when no view fits (copied per call).
    """

    group: int
    head_slice: slice | None
    gather: tuple[int, ...] | None


def kv_head_layout(kv_head_index: Sequence[int], num_kv_heads: int) -> KVHeadLayout:
    """The cheapest FA4 layout for query heads reading ``kv_head_index`` out of ``num_kv_heads``.

    Finds ``start, step, group`` with ``kv_head_index[h] == start + step * (h // group)`` (largest
    group first) so that a strided view of K/V serves the call; otherwise falls back to a gather.

    Example:
        >>> kv_head_layout([0, 0, 1, 1], 2)
        KVHeadLayout(group=2, head_slice=None, gather=None)
        >>> kv_head_layout([1, 1, 3, 3], 4).head_slice
        slice(1, 4, 2)
        >>> kv_head_layout([0, 0, 1, 3, 3], 4).gather
        (0, 0, 1, 3, 3)
    """
    heads = len(kv_head_index)
    if heads == 0:
        raise ValueError("kv_head_index is empty: a block mask must cover at least one query head")
    bad = [kv for kv in kv_head_index if not 0 <= kv < num_kv_heads]
    if bad:
        raise ValueError(f"kv_head_index names key/value heads {bad} outside 0..{num_kv_heads - 1}")
    for group in range(heads, 0, -1):
        if heads % group:
            continue
        leaders = list(kv_head_index[::group])
        if any(kv_head_index[h] != leaders[h // group] for h in range(heads)):
            continue
        step = leaders[1] - leaders[0] if len(leaders) > 1 else 1
        if step <= 0 or any(leaders[j] != leaders[0] + j * step for j in range(len(leaders))):
            continue
        start, count = leaders[0], len(leaders)
        if start == 0 and step == 1 and count == num_kv_heads:
            return KVHeadLayout(group=group, head_slice=None, gather=None)
        return KVHeadLayout(group=group, head_slice=slice(start, start + step * (count - 1) + 1, step), gather=None)
    return KVHeadLayout(group=1, head_slice=None, gather=tuple(int(kv) for kv in kv_head_index))


def fa4_block_list(count: torch.Tensor, indices: torch.Tensor, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 contiguous ``(count, indices)`` of a runtime mask's rows, as FA4 takes them (no copy when they already are).

    FA4 visits a list from its last entry down and applies the key-end mask only to the first block it
    visits, so the block holding the last key must be last: the rows of a `RuntimeBlockMask` ascend
    (its invariant), so they need no sort. Slots past ``count`` are never read; a mask with no slots
    gets one (FA4 takes no zero-width list). Device-only work, no host sync.

    Example:
        >>> count, indices = fa4_block_list(torch.tensor([[[2]]]), torch.tensor([[[[1, 3, 3]]]]), 2)
        >>> count.dtype, indices.tolist()
        (torch.int32, [[[[1, 3]]]])
    """
    count = count.to(torch.int32)
    indices = indices[..., :num_key_blocks].to(torch.int32)
    if indices.shape[-1] == 0:
        indices = torch.zeros(*indices.shape[:-1], 1, dtype=torch.int32, device=indices.device)
    return count.contiguous(), indices.contiguous()


# ----------------------------------------------------------------------------------------------
# Plans and compiled kernels
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KernelSpec:
    """Everything FA4's sm90 forward kernel is specialised on (one compile per distinct value)."""

    arch: int
    dtype: torch.dtype
    head_dim: int
    value_head_dim: int
    group: int
    is_causal: bool
    is_local: bool
    tile_m: int
    tile_n: int
    mma_pv_is_rs: bool
    intra_wg_overlap: bool
    q_subtile_factor: int
    pack_gqa: bool
    sparse_broadcast_pattern: tuple | None  # None: dense kernel
    softcap: float | None
    sink_dtype: torch.dtype | None


@dataclasses.dataclass
class FA4Plan(BackendPlan):
    """Host work done once per mask: block lists in FA4's form, K/V head layout, the compiled kernel(s)."""

    description: str = ""
    arch: int = 90
    out_shape: tuple[int, ...] = ()
    default_scale: float = 1.0
    is_causal: bool = False
    window_right: int | None = None
    kv_slice: slice | None = None
    kv_gather: torch.Tensor | None = None
    # Positional FA4 argument for the block-sparse tensors: an 8-tuple, or None for a dense plan.
    sparse_args: tuple | None = None
    base_spec: _KernelSpec | None = None  # the lean path's kernel; None: FA4's own entry
    calls: dict[tuple, Any] = dataclasses.field(default_factory=dict)  # (softcap, sink dtype) -> callable
    entry_block_sparse: Any = None      # what FA4's `_flash_attn_fwd` takes (the entry path)
    empty: bool = False


def _warmup_block_lists(plan: FA4Plan) -> tuple | None:
    """Zero-count block lists with ``plan``'s stride-0 pattern, for the warm-up launch of a new kernel (made only
    then: a per-call plan of an estimated mask would otherwise allocate four tensors on every call).

    CHECK(gpu): a kernel compiled with these (and tiny q/k/v) serves the real tensors (dynamic shapes).
    """
    if plan.sparse_args is None or plan.entry_block_sparse is None:
        return None
    lists = plan.entry_block_sparse
    bases = (lists.mask_block_cnt, lists.mask_block_idx, lists.full_block_cnt, lists.full_block_idx)
    return tuple(None if t is None else torch.zeros_like(base).expand(t.shape)
                 for t, base in zip(plan.sparse_args[:4], bases)) + (None,) * 4


@register_backend("fa4")
class FA4Backend(Backend):
    """Runs the block-sparse heads of a site with FlashAttention-4 (sm90/sm100, bf16/fp16, forward only).

    State (compiled kernels) lives on the instance; the sites of one compiled model share it.
    ``lean=False`` (or ``SPARSIFY_FA4_LEAN=0``) calls FA4's own entry instead of the compiled
    kernel (correct everywhere FA4 is, with its 140-200 µs of Python per call).

    Example:
        >>> get_backend("fa4").availability("cpu") is not None        # doctest: +SKIP
        True
    """

    features = BackendFeatures(devices=("cuda",), dtypes=_SUPPORTED_DTYPES, max_head_dim=256, attn_mask="key_padding",
                               per_input_masks=True, softcap=True, sinks=True, training=False, cuda_graphs=True)
    auto_priority = 10
    install_hint = f"install it with: {INSTALL_HINT}"

    def __init__(self, lean: bool | None = None):
        self._kernels: dict[_KernelSpec, Any] = {}
        self._fa4_modules: _FA4Modules | None = None
        self._available_devices: set[torch.device] = set()  # availability is checked once per device
        self.lean = os.environ.get("SPARSIFY_FA4_LEAN", "1") != "0" if lean is None else bool(lean)

    # -- availability -------------------------------------------------------------------------

    def availability(self, device: torch.device | str | None = None) -> str | None:
        """``None`` when FA4 can run on ``device`` (default: the current CUDA device), else why not."""
        for module, package in (("flash_attn", "flash-attn-4"), ("cutlass", "nvidia-cutlass-dsl"),
                                ("tvm_ffi", "apache-tvm-ffi")):
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a broken install counts as missing
                found = False
            if not found:
                return f"the fa4 backend needs {package} (module {module!r}), which is not installed"
        try:
            version = importlib.metadata.version("flash-attn-4")
        except importlib.metadata.PackageNotFoundError:
            return "the fa4 backend needs flash-attn-4 (an FA2 'flash_attn' is installed, not FA4)"
        if version != VERIFIED_FA4_VERSION:
            return f"the fa4 backend is verified with flash-attn-4=={VERIFIED_FA4_VERSION}, found {version}"
        device = torch.device("cuda" if device is None else device)
        if device.type != "cuda":
            return f"the fa4 backend runs on CUDA GPUs only, not on {device.type}"
        if not torch.cuda.is_available():
            return "the fa4 backend needs a CUDA GPU, and torch sees none"
        major, minor = torch.cuda.get_device_capability(device)
        if major not in (9, 10):
            return f"the fa4 backend needs compute capability 9.x (Hopper) or 10.x (Blackwell); {device} has {major}.{minor}"
        return None

    def unsupported_reason(self, site, dtype: torch.dtype, device) -> str | None:
        reason = super().unsupported_reason(site, dtype, device)
        if reason is not None:
            return reason
        value_dim = site.value_head_dim or site.head_dim
        if site.head_dim % 8 or value_dim % 8:
            return f"FA4 needs head dims divisible by 8, got {site.head_dim}/{value_dim}"
        major, _ = torch.cuda.get_device_capability(device)
        if major == 10 and not (site.head_dim <= 128 and value_dim <= 128):
            return f"the fa4 backend serves head dims <= 128 on sm100 (got {site.head_dim})"
        return None

    def block_size_problem(self, block_size: int, head_dim: int, device) -> str | None:
        """Why FA4 cannot take blocks of ``block_size`` at ``head_dim`` on ``device`` (sm90: key block == FA4's key tile)."""
        major, _ = torch.cuda.get_device_capability(device)
        if major == 9 and not (block_size == 64 or (block_size == 128 and head_dim <= 128)):
            return (f"on sm90 FA4's key tile is 128 keys for head dims <= 128 and 64 with 64-token blocks; "
                    f"block_size={block_size} at head_dim {head_dim} does not fit (use block_size 128 or 64)")
        if major == 10 and block_size % 256 and block_size != 128:
            return f"on sm100 FA4 wants query blocks that are multiples of 256 (or 128), got {block_size}"
        return None

    # -- prepare ------------------------------------------------------------------------------

    def prepare(self, mask, *, q_shape, k_shape, v_shape, dtype, device, softcap: float | None = None,
                sinks_dtype: torch.dtype | None = None) -> FA4Plan:
        """Validate ``mask`` against the shapes, compile (first time per configuration), return a plan.

        ``softcap``/``sinks_dtype`` pre-compile the variant later calls use; other variants compile on
        their first ``run`` (never under CUDA-graph capture). Host-side, once per mask; no device sync
        except reading ``mask.kv_head_index`` when it lives on the GPU.
        """
        device = torch.device(device)
        self._require_available(device)
        q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
        batch, heads, q_len, head_dim = q_shape
        value_dim = v_shape[3]
        block = int(mask.block_size)
        description = (
            f"FA4 plan (batch {batch}, {heads} heads, q_len {q_len}, k_len {k_shape[2]}, "
            f"head_dim {head_dim}, block {block})"
        )
        self._check_shapes(description, mask, q_shape, k_shape, v_shape, dtype)
        problem = self.block_size_problem(block, head_dim, device)
        if problem is not None:
            raise UnsupportedError(f"{description}: {problem}")
        arch = _arch_of(device)
        # CHECK(gpu): a local window with no left bound and a (possibly negative) runtime right bound gives
        # key <= q_offset + query on every kept block, and rows left with no key come out as zeros.
        is_causal, is_local, window_right = attention_window(bool(mask.causal), q_len, k_shape[2], int(mask.q_offset))
        # CHECK(gpu): strided K/V head views (k[:, start::step]) and gathered heads give the right kv head.
        layout = kv_head_layout(list(mask.kv_heads) if mask.kv_heads is not None else _host_ints(mask.kv_head_index),
                                k_shape[1])
        num_key_blocks = math.ceil(k_shape[2] / block)
        # CHECK(gpu): with ascending lists the key-end block is masked (k_len % block != 0) in both lists.
        partial_count, partial_index = fa4_block_list(
            mask.kv_num_blocks.to(device), mask.kv_indices.to(device), num_key_blocks)
        full_count, full_index = fa4_block_list(
            mask.full_kv_num_blocks.to(device), mask.full_kv_indices.to(device), num_key_blocks)
        fa4 = self._fa4()
        block_sparse = fa4.BlockSparseTensorsTorch(
            mask_block_cnt=partial_count, mask_block_idx=partial_index,
            full_block_cnt=full_count, full_block_idx=full_index, block_size=(block, block),
        )
        num_kv_view = heads // layout.group
        config = fa4._get_fwd_config(
            arch=arch, head_dim=head_dim, head_dim_v=value_dim, max_seqlen_q=q_len, max_seqlen_k=k_shape[2],
            num_head_kv=num_kv_view, qhead_per_kvhead=layout.group, pack_gqa=False, batch_size=batch,
            causal=is_causal, local=is_local, window_size_left=None, window_size_right=window_right,
            num_splits=1, device=device, seqlen_q=q_len, block_sparse_tensors=block_sparse,
        )
        try:
            normalized = fa4.normalize_block_sparse_config(
                block_sparse, batch_size=batch, num_head=heads, seqlen_q=q_len, seqlen_k=k_shape[2],
                block_size=(config.m_block_size, config.n_block_size), q_stage=config.q_stage,
                allow_kv_subtile=arch // 10 == 10,
            )
        except ValueError as error:
            raise UnsupportedError(
                f"{description}: FA4 cannot run this block mask ({error}). On sm90 the key block must equal "
                f"FA4's key tile ({config.n_block_size} for head_dim {head_dim}); on sm100 the query block must "
                f"be a multiple of {config.q_stage * config.m_block_size}."
            ) from error
        tensors = normalized.tensors
        sparse_args = (tensors.mask_block_cnt, tensors.mask_block_idx, tensors.full_block_cnt,
                       tensors.full_block_idx, None, None, None, None)
        plan = FA4Plan(
            mask=mask, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape, dtype=dtype, device=device,
            description=description, arch=arch, out_shape=(batch, heads, q_len, value_dim),
            default_scale=1.0 / math.sqrt(head_dim), is_causal=is_causal, window_right=window_right,
            kv_slice=layout.head_slice,
            kv_gather=None if layout.gather is None else torch.tensor(layout.gather, dtype=torch.long, device=device),
            sparse_args=sparse_args, base_spec=None, empty=q_len == 0 or k_shape[2] == 0,
            entry_block_sparse=fa4.BlockSparseTensorsTorch(
                mask_block_cnt=partial_count, mask_block_idx=partial_index, full_block_cnt=full_count,
                full_block_idx=full_index, block_size=(block, block)),
        )
        if arch // 10 != 9 or not self.lean:
            return plan  # sm100 (lean path unverified there) or lean off: FA4's own entry
        plan.base_spec = _KernelSpec(
            arch=arch, dtype=dtype, head_dim=head_dim, value_head_dim=value_dim, group=layout.group,
            is_causal=is_causal, is_local=is_local, tile_m=config.m_block_size, tile_n=config.n_block_size,
            mma_pv_is_rs=config.mma_pv_is_rs, intra_wg_overlap=config.intra_wg_overlap,
            q_subtile_factor=normalized.q_subtile_factor, pack_gqa=False,
            sparse_broadcast_pattern=normalized.broadcast_pattern, softcap=None, sink_dtype=None,
        )
        self._add_variant(plan, softcap, sinks_dtype)
        return plan

    # -- run ----------------------------------------------------------------------------------

    def run(self, plan: FA4Plan, q, k, v, *, attn_mask=None, scale=None, softcap=None, sinks=None) -> torch.Tensor:
        """Attention of ``q`` ``[B, H, Sq, D]`` over ``k``/``v`` ``[B, Hkv, Sk, D]`` under ``plan``'s mask.

        Returns ``[B, H, Sq, Dv]``; rows with no visible key are zeros. ``attn_mask`` may be a key
        padding mask (bool or additive, broadcastable from ``[B, 1, 1, Sk]``); FA4 adds it as a
        bias on every block. Forward only. Without ``attn_mask``, one kernel launch (plus two
        gathers when the heads need them), capturable in a CUDA graph once the variant (softcap,
        sink dtype) has run once.
        """
        if q.shape != plan.q_shape or k.shape != plan.k_shape or v.shape != plan.v_shape or q.dtype != plan.dtype:
            plan.check_call(q, k, v, self.name)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise UnsupportedError(f"{plan.description}: the fa4 backend is forward-only; train with backend='torch' "
                                   "or run under torch.no_grad()")
        if sinks is not None and tuple(sinks.shape) != (plan.q_shape[1],):
            raise UnsupportedError(f"{plan.description}: sinks must have shape ({plan.q_shape[1]},), "
                                   f"got {tuple(sinks.shape)}")
        if plan.empty:
            return torch.zeros(plan.out_shape, dtype=q.dtype, device=q.device)
        if plan.kv_gather is not None:
            k = k.index_select(1, plan.kv_gather)
            v = v.index_select(1, plan.kv_gather)
        elif plan.kv_slice is not None:
            k = k[:, plan.kv_slice]
            v = v[:, plan.kv_slice]
        if attn_mask is not None:
            return self._run_entry(plan, q, k, v, scale, softcap, sinks, _key_bias(attn_mask, plan))
        if plan.base_spec is None:
            return self._run_entry(plan, q, k, v, scale, softcap, sinks, None)
        call = plan.calls.get((float(softcap) if softcap else None, None if sinks is None else sinks.dtype))
        if call is None:
            call = self._add_variant(plan, softcap, None if sinks is None else sinks.dtype)
            if call is None:  # the lean compile failed for this variant: FA4's entry serves it
                return self._run_entry(plan, q, k, v, scale, softcap, sinks, None)
        out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device)
        # Positional order of FlashAttentionForwardSm90.__call__ without `stream`: q, k, v, o (BSHD views),
        # lse, scale, cu_seqlens_q/k, seqused_q/k, page_table, window left/right, learnable_sink,
        # the block-sparse 8-tuple, AuxData, cu_total_(splits_)m_blocks — what FA4 itself passes.
        call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2), None,
             plan.default_scale if scale is None else float(scale), None, None, None, None, None,
             None, plan.window_right, sinks, plan.sparse_args, self._fa4().empty_aux, None, None)
        return out

    # -- internals ----------------------------------------------------------------------------

    def _require_available(self, device: torch.device) -> None:
        if device in self._available_devices:
            return
        reason = self.availability(device)
        if reason is not None:
            raise UnsupportedError(reason)
        self._available_devices.add(device)

    @staticmethod
    def _check_shapes(description, mask, q_shape, k_shape, v_shape, dtype) -> None:
        if dtype not in _SUPPORTED_DTYPES:
            raise UnsupportedError(f"{description}: FA4 runs float16/bfloat16 only, not {dtype}")
        if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
            raise ValueError(f"{description}: q, k, v must be 4-d [batch, heads, length, dim]")
        if k_shape[0] != q_shape[0] or v_shape[:3] != k_shape[:3] or k_shape[3] != q_shape[3]:
            raise ValueError(f"{description}: q {q_shape}, k {k_shape}, v {v_shape} do not fit together")
        if q_shape[3] % 8 or v_shape[3] % 8:
            raise UnsupportedError(f"{description}: FA4 needs head dims divisible by 8")
        if mask is None:
            return
        if (mask.q_len, mask.k_len) != (q_shape[2], k_shape[2]):
            raise ValueError(f"{description}: the block mask is for q_len {mask.q_len}, k_len {mask.k_len}")
        count = mask.kv_num_blocks
        expected_blocks = math.ceil(q_shape[2] / mask.block_size)
        if count.dim() != 3 or count.shape[1] != q_shape[1] or count.shape[2] != expected_blocks or count.shape[0] not in (1, q_shape[0]):
            raise ValueError(
                f"{description}: kv_num_blocks has shape {tuple(count.shape)}, expected "
                f"[1 or {q_shape[0]}, {q_shape[1]}, {expected_blocks}]"
            )
        if len(mask.kv_head_index) != q_shape[1]:
            raise ValueError(f"{description}: kv_head_index has {len(mask.kv_head_index)} entries for {q_shape[1]} query heads")

    def _add_variant(self, plan: FA4Plan, softcap: float | None, sink_dtype: torch.dtype | None):
        """The compiled kernel for ``(softcap, sink dtype)`` (compiled once per configuration), or ``None``
        when the lean compile failed for it (then FA4's own entry serves those calls)."""
        softcap = float(softcap) if softcap else None
        if sink_dtype is not None and sink_dtype not in _SINK_DTYPES:
            raise UnsupportedError(f"{plan.description}: sinks must be float16/bfloat16/float32, not {sink_dtype}")
        spec = dataclasses.replace(plan.base_spec, softcap=softcap, sink_dtype=sink_dtype)
        if spec in self._kernels:
            call = self._kernels[spec]
        else:
            if torch.cuda.is_current_stream_capturing():
                raise UnsupportedError(
                    f"{plan.description}: kernel variant softcap={softcap}, sinks={sink_dtype} was never run; "
                    "run it once before CUDA-graph capture")
            try:
                call = self._compile_sm90(spec, plan)
            except Exception as error:  # noqa: BLE001 - FA4 internals differ: its own entry still works
                logger.warning("fa4: compiling the direct-call kernel failed (%s: %s); %s falls back to FA4's "
                               "own entry (correct, ~150 us more host time per call)",
                               type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                               plan.description)
                call = None
            self._kernels[spec] = call
        if call is not None:
            plan.calls[(softcap, sink_dtype)] = call
        return call

    def _compile_sm90(self, spec: _KernelSpec, plan: FA4Plan):
        """Compile FA4's sm90 forward for ``spec`` with tiny dummy tensors, load it, return the raw call."""
        fa4 = self._fa4()
        start = time.perf_counter()
        batch, heads, _, head_dim = plan.q_shape
        length = max(spec.tile_m, spec.tile_n)  # shapes are dynamic: any length serves (CHECK(gpu))
        kv_heads = heads // spec.group
        make = lambda h, d: torch.zeros(batch, h, length, d, dtype=spec.dtype, device=plan.device).transpose(1, 2)  # noqa: E731
        q, k, v, out = make(heads, head_dim), make(kv_heads, head_dim), make(kv_heads, spec.value_head_dim), make(heads, spec.value_head_dim)
        sinks = None if spec.sink_dtype is None else torch.zeros(heads, dtype=spec.sink_dtype, device=plan.device)
        warmup_sparse = _warmup_block_lists(plan)
        # One compile per kernel configuration, kept on this backend instance.
        kernel = fa4.FlashAttentionForwardSm90(
            fa4.torch2cute_dtype_map[spec.dtype], spec.head_dim, spec.value_head_dim, spec.group,
            is_causal=spec.is_causal, is_local=spec.is_local, pack_gqa=spec.pack_gqa,
            tile_m=spec.tile_m, tile_n=spec.tile_n, num_stages=2, num_threads=384, Q_in_regs=False,
            intra_wg_overlap=spec.intra_wg_overlap, mma_pv_is_rs=spec.mma_pv_is_rs,
            # CHECK(gpu): softcap = c*tanh(scale*qk/c); sinks = extra natural-log logit column per head.
            score_mod=None if spec.softcap is None else fa4.create_softcap_scoremod(spec.softcap),
            mask_mod=None, has_aux_tensors=False, q_subtile_factor=spec.q_subtile_factor,
            paged_kv_non_tma=False,
        )
        sparse_cute = None
        if warmup_sparse is not None:
            sparse_cute = fa4.to_cute_block_sparse_tensors(fa4.BlockSparseTensorsTorch(*warmup_sparse[:4]))
        with warnings.catch_warnings():  # CuTe DSL warns that FA4's AuxData is no JitArgument; FA4 passes it anyway
            warnings.filterwarnings("ignore", message="Argument aux_data", category=UserWarning)
            compiled = fa4.cute.compile(
                kernel, fa4.to_cute_tensor(q), fa4.to_cute_tensor(k), fa4.to_cute_tensor(v),
                fa4.to_cute_tensor(out, assumed_align=16), None, plan.default_scale,
                None, None, None, None, None, None, plan.window_right,
                None if sinks is None else fa4.to_cute_tensor(sinks, assumed_align=4, leading_dim=0),
                sparse_cute, fa4.AuxData(None, None), None, None,
                fa4.cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
                options="--enable-tvm-ffi",
            )
        # The kwargs wrapper costs a Python frame per call; the raw tvm_ffi.Function takes the same
        # positional arguments (FA4's disk cache calls it that way). CHECK(gpu): both give equal output.
        raw_getter = getattr(compiled, "__tvm_ffi_object__", None)
        call = raw_getter() if raw_getter is not None else compiled
        # First launch loads the CUDA module; do it now so that later calls can be graph-captured.
        call(q, k, v, out, None, plan.default_scale, None, None, None, None, None, None, plan.window_right,
             sinks, warmup_sparse, fa4.empty_aux, None, None)
        torch.cuda.synchronize(plan.device)
        logger.info("compiled FA4 sm90 kernel %s in %.1f s", spec, time.perf_counter() - start)
        return call

    def _fa4(self) -> "_FA4Modules":
        if self._fa4_modules is None:
            self._fa4_modules = _FA4Modules()
        return self._fa4_modules

    def _run_entry(self, plan: FA4Plan, q, k, v, scale, softcap, sinks, key_bias) -> torch.Tensor:
        """FA4's internal entry (``_flash_attn_fwd``): sm100, key-padding masks, and lean-compile fallbacks."""
        fa4 = self._fa4()
        out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device)
        score_mod, aux = None, None
        if key_bias is not None:
            score_mod, aux = fa4.key_bias_score_mod(float(softcap) if softcap else None), [key_bias]
        elif softcap:
            score_mod = fa4.softcap_score_mod(float(softcap))
        fa4._flash_attn_fwd(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            softmax_scale=plan.default_scale if scale is None else float(scale), causal=plan.is_causal,
            window_size_left=None, window_size_right=plan.window_right, learnable_sink=sinks,
            block_sparse_tensors=plan.entry_block_sparse, out=out.transpose(1, 2), score_mod=score_mod,
            aux_tensors=aux,
        )
        return out


def _key_bias(attn_mask: torch.Tensor, plan: FA4Plan) -> torch.Tensor:
    """A key-padding mask (bool or additive, broadcastable from ``[B, 1, 1, Sk]``) as a float32 bias ``[B, Sk]``."""
    batch, heads, q_len, _ = plan.q_shape
    k_len = plan.k_shape[2]
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    shape = tuple(mask.shape)
    per_key = (shape[1] == 1 or mask.stride(1) == 0) and (shape[2] == 1 or mask.stride(2) == 0)
    if len(shape) != 4 or not per_key or shape[3] != k_len or shape[0] not in (1, batch):
        raise UnsupportedError(
            f"{plan.description}: the fa4 backend applies key-padding masks only (one value per batch element and "
            f"key, broadcastable from [batch, 1, 1, {k_len}]); got attn_mask {tuple(attn_mask.shape)}. Use "
            f"backend='triton' or 'torch' for masks that vary per head or query")
    keys = mask[:, 0, 0, :].expand(batch, k_len)
    if keys.dtype == torch.bool:
        return torch.where(keys, 0.0, float("-inf")).to(torch.float32).contiguous()
    return keys.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# FA4 imports (lazy: importing FA4 takes seconds and initialises CUDA)
# ----------------------------------------------------------------------------------------------


class _FA4Modules:
    """The FA4 / CuTe DSL names this backend uses, imported on first need."""

    def __init__(self):
        with warnings.catch_warnings():  # FA4's helpers import names the CuTe DSL has deprecated (not ours to fix)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(cutlass|quack|flash_attn)")
            warnings.filterwarnings("ignore", message=r"cutlass\.", category=DeprecationWarning)
            self._import()

    def _import(self) -> None:
        import cutlass.cute as cute
        from flash_attn.cute import interface, utils
        from flash_attn.cute.block_sparsity import (
            BlockSparseTensorsTorch, normalize_block_sparse_config, to_cute_block_sparse_tensors,
        )
        from flash_attn.cute.cute_dsl_utils import to_cute_tensor
        from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90

        self.cute = cute
        self.BlockSparseTensorsTorch = BlockSparseTensorsTorch
        self.normalize_block_sparse_config = normalize_block_sparse_config
        self.to_cute_block_sparse_tensors = to_cute_block_sparse_tensors
        self.to_cute_tensor = to_cute_tensor
        self.FlashAttentionForwardSm90 = FlashAttentionForwardSm90
        self.AuxData = utils.AuxData
        self.create_softcap_scoremod = utils.create_softcap_scoremod
        self.torch2cute_dtype_map = interface.torch2cute_dtype_map
        self._get_fwd_config = interface._get_fwd_config
        self._flash_attn_fwd = interface._flash_attn_fwd
        self.empty_aux = utils.AuxData(None, None)
        self._score_mods: dict[tuple, Any] = {}

    def softcap_score_mod(self, softcap: float):
        """FA4's softcap score_mod for this value (one function per value, so FA4 hashes it once)."""
        key = ("softcap", softcap)
        if key not in self._score_mods:
            self._score_mods[key] = self.create_softcap_scoremod(softcap)
        return self._score_mods[key]

    def key_bias_score_mod(self, softcap: float | None):
        """A score_mod adding ``aux_tensors[0][batch, key]`` (a float32 ``[B, Sk]`` bias), after a softcap if given."""
        key = ("key_bias", softcap)
        if key not in self._score_mods:
            self._score_mods[key] = _make_key_bias_score_mod(self.cute, softcap)
        return self._score_mods[key]


def _make_key_bias_score_mod(cute, softcap: float | None):
    """Build the CuTe score_mod (the values it bakes in are defaults, which FA4's kernel hash includes)."""
    import cutlass

    @cute.jit
    def key_bias(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors, softcap=softcap):
        bias = aux_tensors[0]
        batch_index = cute.make_rmem_tensor(1, cutlass.Int32)
        batch_index.store(b_idx)
        key_index = cute.make_rmem_tensor(1, cutlass.Int32)
        key_index.store(kv_idx)
        value = cute.make_rmem_tensor(1, bias.element_type)
        value[0] = bias[batch_index[0], key_index[0]]
        if cutlass.const_expr(softcap is not None):
            score = softcap * cute.math.tanh(score / softcap, fastmath=True)
        return score + value.load().to(cutlass.Float32)

    return key_bias


def _arch_of(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _host_ints(values) -> list[int]:
    """``kv_head_index`` as host ints (a device sync when it lives on the GPU: keep it on the CPU)."""
    if isinstance(values, torch.Tensor):
        return [int(x) for x in values.tolist()]
    return [int(x) for x in values]
