"""Triton kernels of one query-aware decode step: page summary update, page scores, split-K attention over the selected pages, combine.

`sparsify.runtime.decode.QueryAwareDecoder` runs a decode step as four launches on the device,
with no host read and no copy of the cache:

1. `page_scores` — first, in the programs whose page tile holds them, the element-wise minimum /
   maximum of the keys of the page(s) the step's new tokens fall in (stored for later steps:
   `update_summaries` does the same alone); then per key/value head every page's bound
   ``Σ_d max(q_d · min_d, q_d · max_d)`` (largest over the group's query heads and the step's
   rows), reading the summaries only; pages past the cache's end score ``-inf``, the sink and
   window pages ``+inf`` (so they are always chosen). One launch covers every head of every batch entry;
2. `top_pages` — per key/value head the pages of the largest scores by a radix select in one
   program's registers (``torch.topk`` took two to three times as long in the H100's decode graph);
3. `selected_pages_attention` — split-K flash decode: each program walks a share of one key/value
   head's selected pages, loading every key/value tile straight from the cache by page index
   (no gather copy) once for all the group's query heads and rows (they are the rows of one tile);
   it writes a partial output and its running max / sum;
4. `combine_splits` — the log-sum-exp merge of the partial outputs into the step's output.

Precision: bf16/fp16 multiply on the tensor cores with float32 accumulation; float32 in full
(IEEE) precision, not TF32 (so the pages chosen match the torch path's). Head dims up to 256 (padded to a power of two, at least 16). Pages of any size.
With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["MAX_PAGES_IN_REGISTERS", "combine_splits", "decode_step", "page_scores", "selected_pages_attention",
           "split_count", "top_pages", "update_summaries"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Key slots per tile of the attention kernel.
BLOCK_N = 64
# Mask kinds (constexpr MASK_KIND): none, bool (read as bytes), additive (visible above a threshold).
_NO_MASK, _BOOL_MASK, _FLOAT_MASK = 0, 1, 2


def _padded(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


@triton.jit
def _cache_end(END, length, HAS_END: tl.constexpr):
    """int64 one past the cache's last slot: ``END``'s value, or ``length`` (the cache's size) without one."""
    if HAS_END:
        end = tl.load(END).to(tl.int64)
    else:
        end = tl.zeros([], tl.int64) + length
    return end


@triton.jit
def _page_summary(base, page, end, k_len, page_size, stride_kn, stride_kd, offs_d, offs_n,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """float32 ``(min, max)`` over the keys of ``page`` before ``end`` (``base``: the key/value head's first key)."""
    low = tl.full([BLOCK_D], float("inf"), tl.float32)
    high = tl.full([BLOCK_D], float("-inf"), tl.float32)
    for start in range(0, page_size, CHUNK):
        slot = page * page_size + start + offs_n
        valid = (start + offs_n < page_size) & (slot < end) & (slot < k_len)
        load_mask = valid[:, None] & (offs_d[None, :] < HEAD_D)
        keys = tl.load(base + slot[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=load_mask,
                       other=0.0).to(tl.float32)
        low = tl.minimum(low, tl.min(tl.where(valid[:, None], keys, float("inf")), 0))
        high = tl.maximum(high, tl.max(tl.where(valid[:, None], keys, float("-inf")), 0))
    return low, high


@triton.jit
def _update_summaries_kernel(K, MIN, MAX, END,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_sb, stride_sh, stride_sp, stride_sd,
                             num_kv_heads, k_len, new_tokens, page_size,
                             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                             HAS_END: tl.constexpr):
    """Program (b·Hkv + h, t): min / max of the keys before ``END`` of the t-th page the new tokens touch."""
    pid_bh = tl.program_id(0)
    touched = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    end = _cache_end(END, k_len, HAS_END)
    first_page = (end - new_tokens) // page_size
    last_page = (end - 1) // page_size
    page = tl.minimum(first_page + touched, last_page)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, CHUNK)
    base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    low, high = _page_summary(base, page, end, k_len, page_size, stride_kn, stride_kd, offs_d, offs_n, HEAD_D,
                              BLOCK_D, CHUNK)
    out = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + page * stride_sp + offs_d * stride_sd
    tl.store(MIN + out, low.to(MIN.dtype.element_ty), mask=offs_d < HEAD_D)
    tl.store(MAX + out, high.to(MAX.dtype.element_ty), mask=offs_d < HEAD_D)


@triton.jit
def _page_scores_kernel(Q, MIN, MAX, END, SCORES, K,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_sb, stride_sh, stride_sp, stride_sd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        num_kv_heads, group, rows, pages, page_size, sink_pages, window_pages, k_len, new_tokens,
                        length,
                        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                        TOUCHED: tl.constexpr, CHUNK: tl.constexpr, HAS_END: tl.constexpr):
    """Program (b·Hkv + h, page tile): float32 scores of ``BLOCK_P`` pages of one key/value head.

    ``TOUCHED`` > 0: first re-summarise the (at most ``TOUCHED``) pages the step's ``new_tokens``
    fall in that lie in this tile — stored for later steps and used for this one's scores — which
    is what `update_summaries` does, without its launch. Without ``END`` the cache ends at ``length``.
    """
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    end = _cache_end(END, length, HAS_END)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    # Row i of the tile is query head h·group + i // rows, step row i % rows.
    real_row = offs_r < group * rows
    q_head = h * group + offs_r // rows
    q_ptr = (Q + b.to(tl.int64) * stride_qb + q_head.to(tl.int64)[:, None] * stride_qh
             + (offs_r % rows)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptr, mask=real_row[:, None] & (offs_d[None, :] < HEAD_D), other=0.0).to(MIN.dtype.element_ty)
    s_base = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    s_ptr = s_base + offs_p.to(tl.int64)[:, None] * stride_sp + offs_d[None, :] * stride_sd
    present = (offs_p < pages) & (offs_p.to(tl.int64) * page_size < end)      # pages past the end: never summarised
    s_mask = present[:, None] & (offs_d[None, :] < HEAD_D)
    low = tl.load(MIN + s_ptr, mask=s_mask, other=0.0)
    high = tl.load(MAX + s_ptr, mask=s_mask, other=0.0)
    if TOUCHED > 0:
        first_page = (end - new_tokens) // page_size
        last_touched = (end - 1) // page_size
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        offs_n = tl.arange(0, CHUNK)
        for touched in tl.static_range(TOUCHED):
            page = tl.minimum(first_page + touched, last_touched)
            if (page >= pid_p * BLOCK_P) & (page < pid_p * BLOCK_P + BLOCK_P):
                page_low, page_high = _page_summary(k_base, page, end, k_len, page_size, stride_kn, stride_kd,
                                                    offs_d, offs_n, HEAD_D, BLOCK_D, CHUNK)
                page_low = page_low.to(MIN.dtype.element_ty)
                page_high = page_high.to(MAX.dtype.element_ty)
                summary = s_base + page * stride_sp + offs_d * stride_sd
                tl.store(MIN + summary, page_low, mask=offs_d < HEAD_D)
                tl.store(MAX + summary, page_high, mask=offs_d < HEAD_D)
                is_page = (offs_p == page)[:, None]
                low = tl.where(is_page, page_low[None, :], low)
                high = tl.where(is_page, page_high[None, :], high)
    positive = tl.where(q > 0, q, 0.0).to(MIN.dtype.element_ty)
    negative = tl.where(q < 0, q, 0.0).to(MIN.dtype.element_ty)
    bound = tl.dot(positive, tl.trans(high), input_precision="ieee")
    bound = tl.dot(negative, tl.trans(low), bound, input_precision="ieee")
    best = tl.max(tl.where(real_row[:, None], bound, float("-inf")), 0)                    # [BLOCK_P]
    last_page = (end - 1) // page_size
    forced = (offs_p < sink_pages) | ((offs_p <= last_page) & (offs_p > last_page - window_pages))
    best = tl.where(forced, float("inf"), best)
    best = tl.where(offs_p.to(tl.int64) * page_size >= end, float("-inf"), best)
    out = SCORES + pid_bh.to(tl.int64) * pages + offs_p
    tl.store(out, best, mask=offs_p < pages)


@triton.jit
def _selected_pages_attention_kernel(Q, K, V, CHOSEN, END, MASK, ACC, MAX_SCORE, SUM,
                                     stride_qb, stride_qh, stride_qm, stride_qd,
                                     stride_kb, stride_kh, stride_kn, stride_kd,
                                     stride_vb, stride_vh, stride_vn, stride_vd,
                                     stride_mb, stride_mr, stride_mn,
                                     num_kv_heads, group, rows, k_len, selected, page_size, splits,
                                     slots_per_split, qk_scale, mask_threshold,
                                     HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                                     BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                                     MASK_KIND: tl.constexpr, HAS_END: tl.constexpr):
    """Program (b·Hkv + h, split): online softmax of the group's rows over one share of the head's selected slots.

    The head's selected slots are numbered ``n = j · page_size + i`` (slot ``i`` of its ``j``-th
    selected page); a split covers ``[split · slots_per_split, (split + 1) · slots_per_split)``.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    end = _cache_end(END, k_len, HAS_END)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    real_row = offs_r < group * rows
    step_row = offs_r % rows
    q_head = h * group + offs_r // rows
    q_ptr = (Q + b.to(tl.int64) * stride_qb + q_head.to(tl.int64)[:, None] * stride_qh
             + step_row[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptr, mask=real_row[:, None] & (offs_d[None, :] < HEAD_D), other=0.0).to(K.dtype.element_ty)
    # Row r of the step sits at slot end - rows + r and sees the slots up to it.
    row_slot = end - rows + step_row
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    chosen_base = CHOSEN + pid_bh.to(tl.int64) * selected
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    first = split * slots_per_split
    last = tl.minimum(first + slots_per_split, selected * page_size)
    for start in range(first, last, BLOCK_N):
        n = start + offs_n
        in_split = n < last
        page = tl.load(chosen_base + n // page_size, mask=in_split, other=0)
        slot = page * page_size + n % page_size
        present = in_split & (slot < end) & (slot < k_len)
        keys = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       mask=present[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        values = tl.load(v_base + slot[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                         mask=present[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        visible = present[None, :] & (slot[None, :] <= row_slot[:, None]) & real_row[:, None]
        if MASK_KIND != 0:
            m_ptr = MASK + b.to(tl.int64) * stride_mb + step_row[:, None] * stride_mr + slot[None, :] * stride_mn
            user = tl.load(m_ptr, mask=visible, other=0)
            if MASK_KIND == 1:
                visible = visible & (user != 0)
            else:
                visible = visible & (user.to(tl.float32) > mask_threshold)
        qk = tl.dot(q, tl.trans(keys), input_precision="ieee") * qk_scale
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(values.dtype), values, acc, input_precision="ieee")
        m_i = m_new
    part = (pid_bh * splits + split).to(tl.int64) * BLOCK_R
    tl.store(ACC + (part + offs_r)[:, None] * BLOCK_DV + offs_dv[None, :], acc)
    tl.store(MAX_SCORE + part + offs_r, m_i)
    tl.store(SUM + part + offs_r, l_i)


@triton.jit
def _combine_splits_kernel(ACC, MAX_SCORE, SUM, O,
                           stride_ob, stride_oh, stride_om, stride_od,
                           num_kv_heads, group, rows, splits,
                           HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr,
                           CHUNK: tl.constexpr):
    """Program (b·Hkv + h, tile row): the log-sum-exp merge of the splits' partial outputs of one query row.

    Two passes over the splits, ``CHUNK`` at a time: their largest running max, then the weighted sums.
    """
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    offs_c = tl.arange(0, CHUNK)
    offs_dv = tl.arange(0, BLOCK_DV)
    first = (pid_bh * splits).to(tl.int64)
    m_max = tl.full([CHUNK], float("-inf"), tl.float32)
    for start in range(0, splits, CHUNK):
        real = start + offs_c < splits
        m = tl.load(MAX_SCORE + (first + start + offs_c) * BLOCK_R + row, mask=real, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    top = tl.max(m_max, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([CHUNK], tl.float32)
    out = tl.zeros([BLOCK_DV], tl.float32)
    for start in range(0, splits, CHUNK):
        real = start + offs_c < splits
        part = (first + start + offs_c) * BLOCK_R + row
        m = tl.load(MAX_SCORE + part, mask=real, other=float("-inf"))
        weight = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - top))
        total += weight * tl.load(SUM + part, mask=real, other=0.0)
        acc = tl.load(ACC + part[:, None] * BLOCK_DV + offs_dv[None, :], mask=real[:, None], other=0.0)
        out += tl.sum(weight[:, None] * acc, 0)
    denominator = tl.sum(total, 0)
    out = out / tl.where(denominator == 0.0, 1.0, denominator)                         # no visible key: 0
    q_head = h * group + row // rows
    o_ptr = (O + b.to(tl.int64) * stride_ob + q_head.to(tl.int64) * stride_oh + (row % rows) * stride_om
             + offs_dv * stride_od)
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=offs_dv < HEAD_DV)


#: Most pages `top_pages` selects in one program's registers (128K tokens at pages of 16); beyond, torch's top-k.
MAX_PAGES_IN_REGISTERS = 8192


@triton.jit
def _top_pages_kernel(SCORES, CHOSEN, pages, selected, PAD: tl.constexpr):
    """Program (b·Hkv + h): the pages of the ``selected`` largest scores of one head, in page order (ties: lower page).

    A radix select in registers: the scores become unsigned 32-bit keys in float order, 32 rounds
    of one count each find the ``selected``-th largest key bit by bit from the top, then every page
    above it and the lowest pages equal to it are stored at their rank among the chosen (a prefix sum).
    """
    pid_bh = tl.program_id(0)
    index = tl.arange(0, PAD)
    valid = index < pages
    scores = tl.load(SCORES + pid_bh.to(tl.int64) * pages + index, mask=valid, other=float("-inf"))
    scores = tl.where(scores == 0.0, 0.0, scores)                      # -0.0 ties with +0.0, as in torch
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)                       # float order as signed integer order
    keys = tl.where(valid, ordered.to(tl.int64) + 2147483648, -1)      # [0, 2^32) in float order; padding lowest
    threshold = tl.zeros([], dtype=tl.int64)                           # the selected-th largest key, bit by bit
    for round_ in tl.static_range(32):
        candidate = threshold | (tl.full([], 1, tl.int64) << (31 - round_))
        above = tl.sum((keys >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(above >= selected, candidate, threshold)
    greater = keys > threshold
    equal = keys == threshold
    ties_taken = selected - tl.sum(greater.to(tl.int32), axis=0)
    take = greater | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= ties_taken))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(CHOSEN + pid_bh.to(tl.int64) * selected + slot, index.to(tl.int64), mask=take)


def top_pages(scores: torch.Tensor, selected: int) -> torch.Tensor:
    """int64 ``[B, Hkv, selected]``: per head the pages of the ``selected`` largest ``scores`` ``[B, Hkv, pages]``.

    The same set as ``scores.topk(selected).indices`` (ties: the lower page), in page order: one
    launch of one program per (batch, head) that radix-selects in registers, up to
    `MAX_PAGES_IN_REGISTERS` pages; more go to ``torch.topk`` (whose order is unspecified). The
    decode step's page selection.

    Example:
        >>> top_pages(torch.tensor([[[0.5, 2.0, -1.0, 3.0]]], device="cuda"), 2).tolist()   # doctest: +SKIP
        [[[1, 3]]]
    """
    batch, kv_heads, pages = scores.shape
    if not 0 < selected <= pages:
        raise ValueError(f"top_pages: selected must lie in [1, {pages}] (the pages scored), got {selected}")
    if pages > MAX_PAGES_IN_REGISTERS:
        return scores.topk(selected, dim=-1, sorted=False).indices
    chosen = torch.empty(batch, kv_heads, selected, dtype=torch.int64, device=scores.device)
    pad = max(16, triton.next_power_of_2(pages))
    _top_pages_kernel[(batch * kv_heads,)](scores.contiguous(), chosen, pages, selected, PAD=pad,
                                           num_warps=4 if pad <= 2048 else 8)
    return chosen


def _check(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"query-aware decode kernels take float16, bfloat16 or float32; {name} is {tensor.dtype}")
        if tensor.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"query-aware decode kernels take head dims up to {MAX_HEAD_DIM}; {name} has "
                             f"{tensor.shape[-1]}")


def _end_argument(end: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(tensor the kernels read, whether they read it)``: ``end`` (0-dim device tensor), or ``None`` — the cache
    ends at its size, a launch argument (no fill kernel for a growing cache's step)."""
    return (like, False) if end is None else (end, True)


def update_summaries(key: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor, end: torch.Tensor | None,
                     new_tokens: int, page_size: int) -> None:
    """Re-summarise, in place, the pages of the last ``new_tokens`` cache slots before ``end`` (0-dim device tensor;
    ``None``: the cache's size).

    ``key`` is the cache ``[B, Hkv, S, D]``; ``minimum`` / ``maximum`` ``[B, Hkv, pages, D]`` hold
    at least the pages up to slot ``S``. One launch.

    Example:
        >>> keys = torch.randn(1, 1, 40, 16)
        >>> low, high = torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16)
        >>> update_summaries(keys, low, high, torch.tensor(40), 1, 32)         # doctest: +SKIP
    """
    batch, kv_heads, k_len, dim = key.shape
    touched = _touched_pages(new_tokens, page_size)
    end, has_end = _end_argument(end, key)
    _update_summaries_kernel[(batch * kv_heads, touched)](
        key, minimum, maximum, end, *key.stride(), *minimum.stride(), kv_heads, k_len, new_tokens, page_size,
        HEAD_D=dim, BLOCK_D=_padded(dim), CHUNK=min(64, _padded(page_size)), HAS_END=has_end)


def page_scores(query: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor, end: torch.Tensor | None,
                pages: int, page_size: int, sink_pages: int, window_pages: int, key: torch.Tensor | None = None,
                new_tokens: int = 0, length: int | None = None) -> torch.Tensor:
    """float32 ``[B, Hkv, pages]``: each page's bound for the group's query heads and rows; past ``end`` -inf, sinks and window +inf.

    ``query`` is ``[B, H, rows, D]``; ``minimum`` / ``maximum`` ``[B, Hkv, ≥ pages, D]``. With the
    cache's ``key`` and ``new_tokens`` > 0, the pages those tokens fall in are re-summarised first
    (as `update_summaries` would) in the same launch. ``end`` ``None``: the cache ends at
    ``length`` (default: ``key``'s size, else ``pages · page_size``). One launch.

    Example:
        >>> scores = page_scores(q, low, high, end, 64, 32, 1, 2)             # doctest: +SKIP
    """
    batch, heads, rows, dim = query.shape
    kv_heads = minimum.shape[1]
    group = heads // kv_heads
    scores = torch.empty(batch, kv_heads, pages, dtype=torch.float32, device=query.device)
    block_p = 64 if dim <= 64 else 32                                  # two [pages, D] tiles in registers
    touched = _touched_pages(new_tokens, page_size) if key is not None and new_tokens > 0 else 0
    key_strides = key.stride() if touched else (0, 0, 0, 0)
    if length is None:
        length = key.shape[2] if key is not None else pages * page_size
    end, has_end = _end_argument(end, query)
    _page_scores_kernel[(batch * kv_heads, triton.cdiv(pages, block_p))](
        query, minimum, maximum, end, scores, key if touched else query, *query.stride(), *minimum.stride(),
        *key_strides, kv_heads, group, rows, pages, page_size, sink_pages, window_pages,
        key.shape[2] if touched else 0, new_tokens, length, HEAD_D=dim, BLOCK_D=_padded(dim),
        BLOCK_R=_padded(group * rows), BLOCK_P=block_p, TOUCHED=touched, CHUNK=min(64, _padded(page_size)),
        HAS_END=has_end, num_warps=4)
    return scores


def _touched_pages(new_tokens: int, page_size: int) -> int:
    """The most pages ``new_tokens`` consecutive slots can fall in."""
    return (new_tokens - 1 + page_size - 1) // page_size + 1


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: Split-K programs per multiprocessor the decode attention aims for (`split_count`).
PROGRAMS_PER_MULTIPROCESSOR = 4


def split_count(programs: int, selected_slots: int, device: torch.device,
                per_multiprocessor: int = PROGRAMS_PER_MULTIPROCESSOR) -> tuple[int, int]:
    """``(splits, slots_per_split)``: how the selected slots of each of ``programs`` key/value heads split over programs.

    Enough splits to give every multiprocessor ``per_multiprocessor`` programs, each a whole number
    of tiles (more splits: shorter programs, a longer combine). Off CUDA (Triton's interpreter,
    tests) the device counts as eight multiprocessors, so small cases still split and exercise the combine.

    Example:
        >>> split_count(8, 6720, torch.device("cpu"))
        (4, 1728)
    """
    target = per_multiprocessor * (_multiprocessors(device.index or 0) if device.type == "cuda" else 8)
    tiles = triton.cdiv(max(selected_slots, 1), BLOCK_N)
    splits = max(1, min(tiles, triton.cdiv(target, programs)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * BLOCK_N


def _attention_warps(head_dim: int, dtype: torch.dtype) -> int:
    """Warps of the attention kernel: 8 where 4 would spill registers (ptxas on sm_90: head dims over 64, float32)."""
    return 4 if _padded(head_dim) <= 64 and dtype != torch.float32 else 8


def _user_mask(attention_mask: torch.Tensor | None, batch: int, rows: int, k_len: int):
    """``(tensor, kind, strides, threshold)`` of the mask's last ``rows`` rows, as the torch path reads it (head 0)."""
    if attention_mask is None:
        return None, _NO_MASK, (0, 0, 0), 0.0
    user = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask
    user = user[..., -rows:, :].expand(batch, rows, k_len)
    if user.dtype == torch.bool:
        return user.view(torch.uint8), _BOOL_MASK, user.stride(), 0.0
    return user, _FLOAT_MASK, user.stride(), torch.finfo(user.dtype).min / 2


def selected_pages_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chosen: torch.Tensor,
                             end: torch.Tensor | None, attention_mask: torch.Tensor | None, scale: float,
                             page_size: int, per_multiprocessor: int = PROGRAMS_PER_MULTIPROCESSOR) -> torch.Tensor:
    """``[B, H, rows, Dv]``: attention of the step's rows over the ``chosen`` pages ``[B, Hkv, count]`` of the cache.

    Reads the pages in place (no gather); row ``r`` sees the slots before ``end - rows + r + 1``
    (``end`` ``None``: the cache's size) that ``attention_mask`` (bool, or additive: visible above
    half the dtype's minimum) shows. Two launches: the split-K pass (``per_multiprocessor``: its
    programs per multiprocessor, `split_count`) and the combine.

    Example:
        >>> out = selected_pages_attention(q, keys, values, chosen, end, None, 0.125, 32)   # doctest: +SKIP
    """
    batch, heads, rows, dim = query.shape
    kv_heads, k_len, dim_v = key.shape[1], key.shape[2], value.shape[-1]
    group = heads // kv_heads
    selected = chosen.shape[-1]
    block_r, block_dv = _padded(group * rows), _padded(dim_v)
    splits, slots_per_split = split_count(batch * kv_heads, selected * page_size, query.device, per_multiprocessor)
    partial = torch.empty(batch * kv_heads * splits * block_r, block_dv, dtype=torch.float32, device=query.device)
    max_score = torch.empty(batch * kv_heads * splits * block_r, dtype=torch.float32, device=query.device)
    total = torch.empty_like(max_score)
    mask, mask_kind, mask_strides, threshold = _user_mask(attention_mask, batch, rows, k_len)
    chosen = chosen.contiguous()
    end, has_end = _end_argument(end, query)
    _selected_pages_attention_kernel[(batch * kv_heads, splits)](
        query, key, value, chosen, end, mask if mask is not None else query, partial, max_score, total,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides,
        kv_heads, group, rows, k_len, selected, page_size, splits, slots_per_split, scale * LOG2E, threshold,
        HEAD_D=dim, HEAD_DV=dim_v, BLOCK_D=_padded(dim), BLOCK_DV=block_dv, BLOCK_R=block_r, BLOCK_N=BLOCK_N,
        MASK_KIND=mask_kind, HAS_END=has_end, num_warps=_attention_warps(max(dim, dim_v), key.dtype))
    return combine_splits(partial, max_score, total, query.new_empty(batch, heads, rows, dim_v), kv_heads, group,
                          rows, splits, block_r)


def combine_splits(partial: torch.Tensor, max_score: torch.Tensor, total: torch.Tensor, out: torch.Tensor,
                   kv_heads: int, group: int, rows: int, splits: int, block_r: int) -> torch.Tensor:
    """Merge the splits' partial outputs (base-2 running max and sum per row) into ``out`` ``[B, H, rows, Dv]``; one launch."""
    batch, dim_v = out.shape[0], out.shape[-1]
    _combine_splits_kernel[(batch * kv_heads, group * rows)](
        partial, max_score, total, out, *out.stride(), kv_heads, group, rows, splits, HEAD_DV=dim_v,
        BLOCK_DV=partial.shape[-1], BLOCK_R=block_r, CHUNK=16, num_warps=4)
    return out


def decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, minimum: torch.Tensor,
                maximum: torch.Tensor, end: torch.Tensor | None, attention_mask: torch.Tensor | None, scale: float,
                page_size: int, sink_pages: int, window_pages: int, selected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output [B, H, rows, Dv], chosen pages int64 [B, Hkv, selected])`` of one decode step; updates the summaries.

    ``minimum`` / ``maximum`` are the layer's page summaries (capacity at least the cache's pages);
    the step's ``rows`` new tokens end at slot ``end`` (0-dim device tensor; ``None``: at the cache's
    size, a growing cache). Four launches (the summary update runs inside the page scores' launch),
    no host sync.

    Example:
        >>> out, chosen = decode_step(q, keys, values, low, high, end, None, 0.125, 32, 1, 2, 106)  # doctest: +SKIP
    """
    _check({"query": query, "key": key, "value": value})
    rows, k_len = query.shape[2], key.shape[2]
    pages = triton.cdiv(k_len, page_size)
    scores = page_scores(query, minimum, maximum, end, pages, page_size, sink_pages, window_pages, key=key,
                         new_tokens=rows)                             # the summary update happens in this launch
    chosen = top_pages(scores, selected)
    return selected_pages_attention(query, key, value, chosen, end, attention_mask, scale, page_size), chosen
