"""Fused block-sparse flash-attention forward kernel (Triton) and its launcher, driven by a `RuntimeBlockMask`.

One launch serves every head of a plan. Each program computes one query tile (``BLOCK_M``
rows of one query block) of one head and one batch entry, walking only the key blocks the mask
keeps, with an online softmax in float32 (base 2, the scale folded into ``log2(e)``).

Work order and load balance: `plan_launch` sorts the rows of the mask — ``(head, query
block)``, or ``(batch, head, query block)`` for masks estimated per input — by kept-block count,
heaviest first, into a work list; programs start roughly in ``pid`` order, so the longest rows
start first and the tail of the launch is made of short rows.

Masking is paid only where needed: the mask's *full* blocks run in an unmasked loop, its
*partial* blocks (the causal diagonal at the mask's query offset, the partial last key block)
in a masked loop. With an ``attn_mask`` or a softcap every block takes the masked loop; a mask
that is the same for every query row (HF key padding, ``[B, 1, 1, k_len]``) is read as one
vector per key tile, any other broadcastable mask through its strides (broadcast dims cost no
memory). Learned sinks add one term per row to the softmax denominator at the end.

Loads: on Hopper and newer, when strides are 16-byte aligned and head dims are powers of two,
Q/K/V/O move through host-built TMA tensor descriptors over ``[batch, heads, seq, dim]`` (the
per-head sequence bound makes rows past the end read as zeros and clips stores); otherwise
masked pointer loads. The interpreter (``TRITON_INTERPRET=1``) runs both.

Precision: bf16/fp16 inputs multiply on the tensor cores with float32 accumulation; float32
inputs are multiplied in TF32 (about 1e-3 relative error), as Triton's default float32 dot.
Head dims are padded (masked loads) to the next power of two >= 16; up to 256 is accepted.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton older than 3.4: pointer loads only
    TensorDescriptor = None

from sparsify.errors import UnsupportedError
from sparsify.block_mask import RuntimeBlockMask

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Mask kinds (constexpr MASK_KIND).
_NO_MASK, _BOOL_MASK, _ADD_MASK = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shape and schedule of one launch. ``block_m``/``block_n`` divide the mask's block."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def default_config(head_dim: int, block_size: int, dtype: torch.dtype) -> KernelConfig:
    """The measured tile shape for ``(padded head dim, block size)`` on Hopper (a pure function).

    From ``benchmarks/kernel_bench.py --tune`` on an H200 (benchmarks/NOTES.md): D=128 runs
    best with 128x128 tiles, 8 warps, 3 stages; D=64 with 128x64; 64-token blocks with 64x64
    tiles and 4 warps. D=256 and float32 (twice the bytes) get smaller tiles to fit shared memory.
    """
    d = padded_head_dim(head_dim)
    if d > 128:
        cfg = KernelConfig(64, 32, 8, 2)
    elif block_size < 128:
        cfg = KernelConfig(64, 64, 4, 3)
    elif d <= 64:
        cfg = KernelConfig(128, 64, 8, 3)
    else:
        cfg = KernelConfig(128, 128, 8, 3)
    if dtype == torch.float32:
        cfg = dataclasses.replace(cfg, block_n=max(16, cfg.block_n // 2), num_stages=2)
    return dataclasses.replace(cfg, block_m=min(cfg.block_m, block_size), block_n=min(cfg.block_n, block_size))


def padded_head_dim(head_dim: int) -> int:
    """Head dim the kernel computes with (next power of two, at least 16)."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _softmax_update(qk, m_i, l_i, acc, v, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step on raw scores ``qk`` (unscaled unless MASKED) and values ``v``."""
    if MASKED:  # qk is already scaled (base 2) and holds -inf where not visible
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _scaled_scores(qk, qk_scale, softcap, SOFTCAP: tl.constexpr):
    """Scores in base-2 units, softcapped (``c * tanh(s / c)``) when SOFTCAP."""
    if SOFTCAP:
        x = qk * (qk_scale / (LOG2E_CONST * softcap))            # s / c in natural units
        tanh = 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E_CONST)) + 1.0)
        return tanh * (softcap * LOG2E_CONST)
    return qk * qk_scale


LOG2E_CONST = tl.constexpr(LOG2E)


@triton.jit
def _load_tile(desc, base, b, kvh, start_n, stride_n, offs_n, offs_d, HEAD: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, USE_TMA: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows ``start_n + [0, BLOCK_N)`` of one key/value head, all inside ``k_len``."""
    if USE_TMA:
        x = desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, BLOCK)
    else:
        rows = (start_n + offs_n).to(tl.int64)
        if EVEN_D:
            x = tl.load(base + rows[:, None] * stride_n)
        else:
            x = tl.load(base + rows[:, None] * stride_n, mask=offs_d[None, :] < HEAD, other=0.0)
    return x


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, O, Mask, Sinks,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, KV_HEAD, WORK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_fb, stride_fh, stride_fq,
    stride_pb, stride_ph, stride_pq,
    stride_cb, stride_ch,
    q_len, k_len, q_offset, q_blocks, num_heads, num_batch, qk_scale, softcap,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr,
    PER_BATCH_MASK: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Q, K, V, O are tensors, or (USE_TMA) 4-D tensor descriptors of [batch, heads, seq, dim]."""
    SUB_M: tl.constexpr = BLOCK_SIZE // BLOCK_M
    SPLIT_N: tl.constexpr = BLOCK_SIZE // BLOCK_N
    EVEN_D: tl.constexpr = (HEAD_D == BLOCK_D) and (HEAD_DV == BLOCK_DV)
    FULL_MASKED: tl.constexpr = (MASK_KIND != 0) or SOFTCAP   # full blocks still need the masked step

    pid = tl.program_id(0)
    if PER_BATCH_MASK:  # work items are (batch, head, query block)
        sub = pid % SUB_M
        item = tl.load(WORK + pid // SUB_M)
        b = item // (num_heads * q_blocks)
        row = item % (num_heads * q_blocks)
        bm = b
    else:               # work items are (head, query block), shared by the batch
        b = pid % num_batch
        rest = pid // num_batch
        sub = rest % SUB_M
        row = tl.load(WORK + rest // SUB_M)
        bm = 0
    h = row // q_blocks
    qb = row % q_blocks
    m_start = qb * BLOCK_SIZE + sub * BLOCK_M
    if m_start >= q_len:  # a sub-tile past the end of a partial last query block
        return
    kvh = tl.load(KV_HEAD + h)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len
    b64 = b.to(tl.int64)
    if USE_TMA:
        q = Q.load([b, h, m_start, 0]).reshape(BLOCK_M, BLOCK_D)
        k_base = K
        v_base = V
    else:
        q_ptrs = (Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
                  + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        k_base = K + b64 * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
        v_base = V + b64 * stride_vb + kvh * stride_vh + offs_dv[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_base = Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh

    count_offset = bm * stride_cb + h * stride_ch + qb
    full_row = FULL_IDX + bm * stride_fb + h * stride_fh + qb * stride_fq
    part_row = PART_IDX + bm * stride_pb + h * stride_ph + qb * stride_pq
    n_full = tl.load(FULL_CNT + count_offset) * SPLIT_N
    n_part = tl.load(PART_CNT + count_offset) * SPLIT_N

    # Full key tiles: no structural mask.
    for t in range(0, n_full):
        start_n = tl.load(full_row + t // SPLIT_N) * BLOCK_SIZE + (t % SPLIT_N) * BLOCK_N
        k = _load_tile(K, k_base, b, kvh, start_n, stride_kn, offs_n, offs_d, HEAD_D,
                       BLOCK_N, BLOCK_D, USE_TMA, EVEN_D)
        v = _load_tile(V, v_base, b, kvh, start_n, stride_vn, offs_n, offs_dv, HEAD_DV,
                       BLOCK_N, BLOCK_DV, USE_TMA, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if FULL_MASKED:
            qk = _scaled_scores(qk, qk_scale, softcap, SOFTCAP)
            if MASK_KIND != 0:
                cols64 = (start_n + offs_n).to(tl.int64)
                if MASK_PER_KEY:
                    mval = tl.load(m_base + cols64 * stride_mn)[None, :]
                else:
                    mval = tl.load(m_base + offs_m[:, None].to(tl.int64) * stride_mm + cols64[None, :] * stride_mn,
                                   mask=row_ok[:, None], other=0)
                if MASK_KIND == 1:
                    qk = tl.where(mval != 0, qk, float("-inf"))
                else:
                    qk = qk + mval.to(tl.float32) * LOG2E_CONST
            m_i, l_i, acc = _softmax_update(qk, m_i, l_i, acc, v, qk_scale, MASKED=True,
                                            DOT_PRECISION=DOT_PRECISION)
        else:
            m_i, l_i, acc = _softmax_update(qk, m_i, l_i, acc, v, qk_scale, MASKED=False,
                                            DOT_PRECISION=DOT_PRECISION)

    # Partial key tiles: the causal diagonal, the end of the keys (and any attn_mask).
    for t in range(0, n_part):
        kb = tl.load(part_row + t // SPLIT_N)
        start_n = kb * BLOCK_SIZE + (t % SPLIT_N) * BLOCK_N
        cols = start_n + offs_n
        col_ok = cols < k_len
        cols64 = cols.to(tl.int64)
        if USE_TMA:  # rows past k_len come back as zeros
            k = K.load([b, kvh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b, kvh, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = tl.load(k_base + cols64[:, None] * stride_kn,
                        mask=col_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
            v = tl.load(v_base + cols64[:, None] * stride_vn,
                        mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        qk = _scaled_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, softcap, SOFTCAP)
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + q_offset)
        if MASK_KIND != 0:
            if MASK_PER_KEY:  # the same for every query row (key padding): one vector per tile
                mval = tl.load(m_base + cols64 * stride_mn, mask=col_ok, other=0)[None, :]
            else:
                m_ptrs = m_base + offs_m[:, None].to(tl.int64) * stride_mm + cols64[None, :] * stride_mn
                mval = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            if MASK_KIND == 1:
                visible = visible & (mval != 0)
            else:
                qk = qk + mval.to(tl.float32) * LOG2E_CONST
        qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(qk, m_i, l_i, acc, v, qk_scale, MASKED=True,
                                        DOT_PRECISION=DOT_PRECISION)

    if HAS_SINKS:  # one more softmax column per row: the head's learned sink logit
        sink = tl.load(Sinks + h).to(tl.float32) * LOG2E_CONST
        m_final = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_final)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.math.exp2(sink - m_final)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no visible key return zeros
    out = (acc / l_safe[:, None]).to(q.dtype)
    if USE_TMA:  # the copy engine clips rows past q_len
        O.store([b, h, m_start, 0], out.reshape(1, 1, BLOCK_M, BLOCK_DV))
    else:
        o_ptrs = (O + b64 * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, out, mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@dataclasses.dataclass
class LaunchPlan:
    """Launch metadata of one mask (see `plan_launch`), plus the cached direct launches of its call layouts."""

    mask: RuntimeBlockMask
    work: torch.Tensor | None  # int32 [rows]: row ids, heaviest first (None: sorted per call, per-input masks)
    full_indices: torch.Tensor  # int32 [Bm, H, q_blocks, full_width]
    full_counts: torch.Tensor   # int32 [Bm, H, q_blocks]
    partial_indices: torch.Tensor
    partial_counts: torch.Tensor
    kv_head_index: torch.Tensor  # int32 [H]
    launches: dict = dataclasses.field(default_factory=dict)   # call layout -> _Launch (direct launches)


def plan_launch(mask: RuntimeBlockMask, device: torch.device) -> LaunchPlan:
    """Work list and block lists of ``mask`` on ``device`` (small torch ops on the device, no host read).

    Example:
        >>> kept = torch.tensor([[[True, False], [True, True]]])
        >>> mask = RuntimeBlockMask.from_block_masks(kept, block_size=16, q_len=32, k_len=32, causal=False)
        >>> plan_launch(mask, torch.device("cpu")).work.tolist()
        [1, 0]
    """
    mask = mask.to(device)
    as_int = lambda t: t.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
    plan = LaunchPlan(mask=mask, work=None, full_indices=as_int(mask.full_kv_indices),
                      full_counts=as_int(mask.full_kv_num_blocks), partial_indices=as_int(mask.kv_indices),
                      partial_counts=as_int(mask.kv_num_blocks), kv_head_index=as_int(mask.kv_head_index))
    if not (mask.per_input or mask.batch > 1):
        plan.work = _work_list(plan)
    return plan


def _work_list(plan: LaunchPlan) -> torch.Tensor:
    """Rows heaviest first (stable, so ties keep head-major order for locality of K/V)."""
    weight = (plan.full_counts + plan.partial_counts).flatten().to(torch.int64)
    return torch.argsort(weight, descending=True, stable=True).to(torch.int32)


def _mask_operand(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int]):
    """(tensor, kind, strides) for the kernel; broadcast dims get stride 0 (no copy)."""
    if attn_mask is None:
        return None, _NO_MASK, (0, 0, 0, 0)
    try:
        expanded = attn_mask.expand(shape)
    except RuntimeError as err:
        raise UnsupportedError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {shape}") from err
    if attn_mask.dtype == torch.bool:
        expanded = attn_mask.view(torch.uint8).expand(shape)  # same bytes, no copy
        return expanded, _BOOL_MASK, expanded.stride()
    if not attn_mask.is_floating_point():
        raise UnsupportedError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    return expanded, _ADD_MASK, expanded.stride()


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: LaunchPlan,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    use_tma: bool | None = None,
    fast_launch: bool = True,
) -> torch.Tensor:
    """Run the fused kernel for ``plan`` (from `plan_launch`); semantics of `sparsify.backends.base.Backend.run`.

    ``fast_launch`` lets a repeat call take the cached direct launch of the plan (see below);
    float32 inputs run their dot products in TF32 only where torch's float32 matmul precision
    allows it (``torch.set_float32_matmul_precision("high")``), as torch's own matmuls do.
    """
    precision = "tf32" if q.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"
    fast = (fast_launch and FAST_LAUNCH_SUPPORTED and attn_mask is None and config is None and use_tma is None and softcap is None
            and sinks is None and plan.work is not None and q.is_cuda and _knobs is not None
            and _raw_stream is not None)
    if fast:
        key = (_fast_key(q, k, v), precision)
        rec = plan.launches.get(key)
        if rec is not None and rec.device_index == _current_device() and _hooks_off():
            return _fast_launch(rec, q, k, v, scale)
        fast = _hooks_off()
    mask = plan.mask
    check_inputs(q, k, v, mask)
    batch, heads, q_len, head_d = q.shape
    head_dv = v.shape[-1]
    bs = mask.block_size
    if config is None:
        config = default_config(max(head_d, head_dv), bs, q.dtype)
        if attn_mask is not None and attn_mask.expand(batch, heads, q_len, mask.k_len).stride(2) != 0:
            # A per-element mask tile is pipelined too: 128x128 x 3 stages overflowed shared memory.
            config = dataclasses.replace(config, block_n=min(config.block_n, 64), num_stages=2)
    if bs % config.block_m or bs % config.block_n:
        raise UnsupportedError(f"kernel tile {config} does not divide block_size={bs}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_d)
    if plan.work is not None:           # a mask shared by the batch, sorted once in plan_launch
        work, per_batch = plan.work, False
    else:                               # a per-input mask: rows sorted on the device, per call
        if mask.batch not in (1, batch):
            raise UnsupportedError(f"the mask holds {mask.batch} batch elements, the call {batch}")
        work, per_batch = _work_list(plan), mask.batch > 1
    out = torch.empty(batch, heads, q_len, head_dv, dtype=q.dtype, device=q.device)
    mask_tensor, kind, mstrides = _mask_operand(attn_mask, (batch, heads, q_len, mask.k_len))
    mask_arg = mask_tensor if mask_tensor is not None else q  # any pointer; unused when MASK_KIND == 0
    sinks_arg = sinks.to(device=q.device, dtype=torch.float32).contiguous() if sinks is not None else q
    block_d, block_dv = padded_head_dim(head_d), padded_head_dim(head_dv)
    if use_tma is None:
        use_tma = tma_usable(q, k, v, out) and (head_d, head_dv) == (block_d, block_dv)
    operands = (q, k, v, out)
    if use_tma:
        operands = tuple(
            TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])
            for t, rows in zip(operands, (config.block_m, config.block_n, config.block_n, config.block_m))
        )
    grid0 = work.numel() * (bs // config.block_m) * (1 if per_batch else batch)
    full_idx, part_idx, counts = plan.full_indices, plan.partial_indices, plan.full_counts
    batch_stride = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731
    # Every kernel parameter in signature order (constexprs included), as Triton binds them.
    args = [
        *operands, mask_arg, sinks_arg,
        full_idx, plan.full_counts, part_idx, plan.partial_counts, plan.kv_head_index, work,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstrides,
        batch_stride(full_idx), full_idx.stride(1), full_idx.stride(2),
        batch_stride(part_idx), part_idx.stride(1), part_idx.stride(2),
        batch_stride(counts), counts.stride(1),
        q_len, mask.k_len, mask.q_offset, mask.q_blocks, heads, batch, float(scale) * LOG2E,
        float(softcap) if softcap else 1.0,
        head_d, head_dv, block_d, block_dv,
        bs, config.block_m, config.block_n,
        bool(mask.causal), kind, mask_tensor is not None and mstrides[2] == 0,
        per_batch, bool(softcap), sinks is not None,
        precision, use_tma,
    ]
    kernel = _block_sparse_fwd_kernel[(grid0,)](*args, num_warps=config.num_warps, num_stages=config.num_stages)
    if fast:
        _remember_launch(plan, (_fast_key(q, k, v), precision), kernel, args, grid0, out, use_tma, q.device)
    return out


# ------------------------------------------------------------------ host fast path
# A call whose launch is fully determined by (plan, shapes, strides, dtypes, 16-byte alignment of
# the inputs, device) reuses the compiled kernel and every launch argument of the first such call,
# kept on the plan: no input checks, no Triton argument binding/specialization/cache-key hashing,
# no grid or config derivation. Per call it only allocates the output, copies four cached TMA
# descriptor templates with new base tensors (or passes the tensors), and calls Triton's launcher
# directly. Only calls without attn_mask/softcap/sinks/config/use_tma overrides and with a shared
# (not per-input) mask take it. The backend instance decides (`TritonBackend.fast_launch`; the
# environment's SPARSIFY_TRITON_FAST_LAUNCH=0 turns it off for new instances); this module only
# records whether its argument template matches the kernel.
_LAUNCHES_PER_PLAN = 8
_OPERAND_POS = (0, 1, 2, 3)
_MASK_POS, _SINKS_POS = 4, 5
_names = list(getattr(_block_sparse_fwd_kernel, "arg_names", None) or [])
_SCALE_POS = _names.index("qk_scale") if "qk_scale" in _names else -1
_HEAD_D_POS = _names.index("HEAD_D") if "HEAD_D" in _names else -1
# Whether the argument template below matches the kernel (a constant of this module).
FAST_LAUNCH_SUPPORTED = not (_SCALE_POS < 0 or _HEAD_D_POS < 0 or _names[_MASK_POS] != "Mask"
                             or _names[_SINKS_POS] != "Sinks")
del _names

try:  # the raw stream getter Triton's own launch path uses
    _raw_stream = torch._C._cuda_getCurrentRawStream
    _current_device = torch._C._cuda_getDevice
except AttributeError:  # CPU-only torch builds
    _raw_stream = _current_device = None

try:
    from triton import knobs as _knobs
except ImportError:  # older Triton: no direct-launch path
    _knobs = None


class _Launch:
    """Cached launch of one call layout of a plan: compiled kernel, grid and argument template."""

    __slots__ = ("run", "function", "packed", "args", "grid0", "out_shape", "dtype", "device",
                 "descs", "default_qk_scale", "device_index")


def _fast_key(q, k, v):
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16)


def _hooks_off() -> bool:
    """No launch hooks set (Triton >= 3.5 keeps them as `HookChain`s, empty unless a profiler
    such as proton adds one). The direct launch passes no hooks, so it is only taken then."""
    rt = _knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return ((enter is None or not getattr(enter, "calls", True))
            and (leave is None or not getattr(leave, "calls", True)))


def _remember_launch(plan: LaunchPlan, key, kernel, args, grid0, out, use_tma, device) -> None:
    run = getattr(kernel, "run", None)
    function = getattr(kernel, "function", None)
    packed = getattr(kernel, "packed_metadata", None)
    if run is None or function is None or packed is None:  # not a compiled CUDA kernel
        return
    if device.index is None or _current_device() != device.index:  # launched on another device
        return
    rec = _Launch()
    rec.run, rec.function, rec.packed = run, function, packed
    template = list(args)
    descs = None
    if use_tma:  # attribute dicts of the descriptors; the base tensor is replaced per call
        descs = tuple(dict(vars(template[i]), base=None) for i in _OPERAND_POS)
    for i in (*_OPERAND_POS, _MASK_POS, _SINKS_POS):
        template[i] = None  # hold no reference to this call's tensors
    rec.args = template
    rec.descs = descs
    rec.grid0 = grid0
    rec.out_shape = tuple(out.shape)
    rec.dtype = out.dtype
    rec.device = out.device
    rec.device_index = device.index
    rec.default_qk_scale = float(1.0 / math.sqrt(args[_HEAD_D_POS])) * LOG2E  # as the slow path
    while len(plan.launches) >= _LAUNCHES_PER_PLAN:
        plan.launches.pop(next(iter(plan.launches)))
    plan.launches[key] = rec


def _fast_launch(rec: _Launch, q, k, v, scale) -> torch.Tensor:
    out = torch.empty(rec.out_shape, dtype=rec.dtype, device=rec.device)
    args = rec.args.copy()
    if rec.descs is None:
        args[0] = q
        args[1] = k
        args[2] = v
        args[3] = out
    else:
        new = _TD_NEW
        for i, t in enumerate((q, k, v, out)):
            d = new(TensorDescriptor)
            d.__dict__.update(rec.descs[i])
            d.base = t
            args[i] = d
    args[_MASK_POS] = q
    args[_SINKS_POS] = q
    args[_SCALE_POS] = rec.default_qk_scale if scale is None else float(scale) * LOG2E
    rec.run(rec.grid0, 1, 1, _raw_stream(rec.device_index), rec.function, rec.packed, None, None, None, *args)
    return out


_TD_NEW = object.__new__


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]  # slow (tens of us): asked once per device


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine (Hopper+ TMA descriptors) can load these [b, h, s, d] tensors."""
    if TensorDescriptor is None or not all(t.is_cuda for t in tensors):
        return False
    index = tensors[0].device.index
    if _cuda_major(torch.cuda.current_device() if index is None else index) < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((stride * size) % 16 for stride in t.stride()[:-1]):
            return False
    return True


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: RuntimeBlockMask) -> None:
    """Raise `UnsupportedError` naming the first input the kernel cannot serve."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UnsupportedError("q, k and v must be [batch, heads, seq, head_dim]")
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedError(f"dtype {q.dtype} is not supported; supported: float16, bfloat16, float32")
    batch, heads, q_len, head_d = q.shape
    if heads != mask.num_heads:
        raise UnsupportedError(f"q has {heads} heads but the mask describes {mask.num_heads}")
    if q_len != mask.q_len or k.shape[2] != mask.k_len or v.shape[2] != mask.k_len:
        raise UnsupportedError(
            f"sequence lengths q={q_len}, k={k.shape[2]}, v={v.shape[2]} do not match the mask "
            f"(q_len={mask.q_len}, k_len={mask.k_len})")
    if k.shape[0] != batch or v.shape[0] != batch or k.shape[1] != v.shape[1]:
        raise UnsupportedError("k and v must have q's batch and the same number of heads")
    if k.shape[3] != head_d:
        raise UnsupportedError(f"key head dim {k.shape[3]} differs from the query's {head_d}")
    if max(head_d, v.shape[3]) > MAX_HEAD_DIM:
        raise UnsupportedError(f"head dim {max(head_d, v.shape[3])} is over the kernel's limit {MAX_HEAD_DIM}")
    if mask.block_size < 16 or mask.block_size & (mask.block_size - 1):
        raise UnsupportedError(f"block_size {mask.block_size} must be a power of two >= 16")
