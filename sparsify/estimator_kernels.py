"""Triton kernels of the input-adaptive estimators: the vertical-slash probe's block masses, and pooled coverage lists.

The probe (the last ``probe_rows`` queries) attends to every key; `vertical_slash_line_mass`
needs, per key block ``J``, its probability mass split by offset class (which block diagonal
each (row, key) pair lies on). In plain torch that is a ``[B, H, probe_rows, k_len]`` score
tensor written, softmaxed and read again (gigabytes at 128K tokens). Here one launch, one program
per (key block, batch x head), computes the scores tile by tile and keeps, per probe row, their
maximum and the sums of their exponentials per offset class (relative to that maximum); a few
torch ops on those small tensors normalise them by each row's total and sum over the rows.

No atomics: every output element has one writer, so results are deterministic. Scores
accumulate in float32 (float32 inputs are multiplied in IEEE float32, not TF32). Block sizes
must be powers of two from 16 to 256 (`supports`); other cases take the torch path.

Pooled coverage (`coverage_lists_of_scores`): one program per few query blocks reads their rows of
pooled scores once, adds the key bias, hides causal blocks, takes the softmax in registers and
picks the best blocks one by one (largest mass first, ties to the lower block) until the
coverage is reached: the block lists come out directly, with no ``[B, H, Qb, Kb]`` probability or
sort-key tensor and no sort. Rows of up to `MAX_COVERAGE_BLOCKS` key blocks (`supports_coverage`).

The interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["coverage_lists_of_scores", "probe_block_split", "supports", "supports_coverage"]

LOG2E = 1.4426950408889634
#: Key blocks a row of the coverage kernel holds in registers (2048 blocks: 256K tokens at block 128).
MAX_COVERAGE_BLOCKS = 2048


def supports(block_size: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this block size, head dim and dtype (else the caller uses the torch path).

    Example:
        >>> supports(128, 64, torch.bfloat16), supports(96, 64, torch.bfloat16)
        (True, False)
    """
    return (16 <= block_size <= 256 and block_size & (block_size - 1) == 0 and head_dim <= 256
            and dtype in (torch.float16, torch.bfloat16, torch.float32))


@triton.jit
def _probe_kernel(Q, K, KV_INDEX, VALID, ROW_MAX, PARTS,
                  stride_qb, stride_qh, stride_qs, stride_qd,
                  stride_kb, stride_kh, stride_ks, stride_kd, stride_valid,
                  heads, probe_offset, k_len, probe_rows, base, shift, qk_scale,
                  CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  D_PAD: tl.constexpr, CLASSES: tl.constexpr, CLASSES_PAD: tl.constexpr):
    key_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    k_blocks = tl.num_programs(0)
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    kv = tl.load(KV_INDEX + head)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    row_offsets = tl.arange(0, BLOCK_M)
    column_offsets = tl.arange(0, BLOCK_N)
    class_index = tl.arange(0, CLASSES_PAD)
    q_rows = Q + batch * stride_qb + head.to(tl.int64) * stride_qh + probe_offset   # the first probe row
    k_rows = K + batch * stride_kb + kv * stride_kh
    out_rows = (batch_head.to(tl.int64) * k_blocks + key_block) * probe_rows
    for row_start in range(0, probe_rows, BLOCK_M):
        rows = row_start + row_offsets
        row_ok = rows < probe_rows
        q = tl.load(q_rows + rows[:, None] * stride_qs + dims[None, :] * stride_qd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        parts = tl.zeros([BLOCK_M, CLASSES_PAD], dtype=tl.float32)       # per row and class, relative to row_max
        for column_start in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            keys = key_block * BLOCK_SIZE + column_start + column_offsets
            key_ok = keys < k_len
            k = tl.load(k_rows + keys.to(tl.int64)[:, None] * stride_ks + dims[None, :] * stride_kd,
                        mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            else:
                scores = tl.dot(q, tl.trans(k)) * qk_scale
            visible = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= (base + rows)[:, None])
            if HAS_VALID:
                valid = tl.load(VALID + batch * stride_valid + keys, mask=key_ok, other=0)
                visible = visible & (valid != 0)[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            parts = parts * tl.exp2(row_max - safe_max)[:, None]
            weights = tl.exp2(scores - safe_max[:, None])                 # hidden pairs: 0
            # Offset class of (row r, key c of the block): floor((shift + r - c) / block) + 1, here >= 0.
            offset_class = (shift + rows[:, None] - (column_start + column_offsets)[None, :] + BLOCK_SIZE) \
                // BLOCK_SIZE
            lowest = (shift + row_start - (column_start + BLOCK_N - 1) + BLOCK_SIZE) // BLOCK_SIZE
            for step in tl.static_range(3):          # a tile of at most block x block pairs spans 3 classes
                part = tl.sum(tl.where(offset_class == lowest + step, weights, 0.0), 1)
                parts += tl.where(class_index[None, :] == lowest + step, part[:, None], 0.0)
            row_max = new_max
        tl.store(ROW_MAX + out_rows + rows, row_max, mask=row_ok)
        tl.store(PARTS + (out_rows + rows[:, None]) * CLASSES + class_index[None, :], parts,
                 mask=row_ok[:, None] & (class_index[None, :] < CLASSES))


def probe_block_split(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                      probe_rows: int, scale: float, causal: bool, q_offset: int,
                      key_valid: torch.Tensor | None) -> torch.Tensor:
    """``float32 [B, H, k_blocks, classes]``: the probe rows' softmax mass in each key block, split by offset class.

    Row ``r`` of the probe is query ``q_len - probe_rows + r``, at absolute position ``base + r``
    (``base = q_offset + q_len - probe_rows``); the pair (row ``r``, key ``J * block + c``) falls in
    class ``floor((base % block + r - c) / block) + 1`` of key block ``J``, and
    ``classes = (base % block + probe_rows - 1) // block + 2``. What `sparsify.estimators`'s
    torch path computes, with float32 scores instead of the inputs' dtype.

    One launch: each (key block, head) program writes, per probe row, its scores' maximum and the
    sums of ``2^(score - maximum)`` per class (``[B, H, k_blocks, probe_rows, classes]``, small);
    torch then normalises them with the rows' totals over every key block and sums over the rows.

    Example:
        >>> q = torch.randn(1, 2, 64, 16, device="cuda")                                   # doctest: +SKIP
        >>> probe_block_split(q, q[:, :1], block_size=16, kv_head_index=torch.tensor([0, 0]),  # doctest: +SKIP
        ...                   probe_rows=16, scale=0.25, causal=True, q_offset=0, key_valid=None).shape
        torch.Size([1, 2, 4, 2])
    """
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    device = q.device
    k_blocks = -(-k_len // block_size)
    base = q_offset + q_len - probe_rows
    shift = base % block_size
    classes = (shift + probe_rows - 1) // block_size + 2
    kv_index = kv_head_index.to(device, torch.int64, non_blocking=True)
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else kv_index
    block_n = min(block_size, 64)
    block_m = max(16, min(64, block_size, triton.next_power_of_2(probe_rows)))   # <= block: 3 classes a tile
    row_max = torch.empty(batch, heads, k_blocks, probe_rows, device=device, dtype=torch.float32)
    parts = torch.empty(batch, heads, k_blocks, probe_rows, classes, device=device, dtype=torch.float32)
    _probe_kernel[(k_blocks, batch * heads)](
        q, k, kv_index, valid, row_max, parts, *q.stride(), *k.stride(),
        valid.stride(0) if key_valid is not None else 0, heads, (q_len - probe_rows) * q.stride(2), k_len, probe_rows,
        base, shift, scale * LOG2E,
        CAUSAL=bool(causal), HAS_VALID=key_valid is not None, IEEE=q.dtype == torch.float32, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        CLASSES=classes, CLASSES_PAD=max(2, triton.next_power_of_2(classes)), num_warps=4)
    # Row totals (base 2) over every key block: max + log2 of the block's sum, combined; -inf: the row sees nothing.
    block_totals = row_max + parts.sum(-1).log2()
    totals = torch.logsumexp(block_totals * math.log(2.0), dim=2, keepdim=True) / math.log(2.0)   # [B, H, 1, P]
    totals = torch.where(totals == float("-inf"), float("inf"), totals)
    weights = torch.exp2(row_max - totals)                                                      # [B, H, Kb, P]
    return (weights.unsqueeze(-2) @ parts).squeeze(-2)                                          # [B, H, Kb, classes]


def supports_coverage(k_blocks: int) -> bool:
    """Whether the coverage kernel takes rows of ``k_blocks`` key blocks (else the caller uses the torch path).

    Example:
        >>> supports_coverage(1024), supports_coverage(4096)
        (True, False)
    """
    return 1 <= k_blocks <= MAX_COVERAGE_BLOCKS


@triton.jit
def _coverage_kernel(SCORES, KEY_BIAS, COVERAGE, MIN_BLOCKS, MAX_BLOCKS, LISTS,
                     heads, q_blocks, k_blocks, q_len, q_offset, limit,
                     CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, K_PAD: tl.constexpr):
    row_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    rows = row_tile * ROWS + tl.arange(0, ROWS)
    row_ok = rows < q_blocks
    columns = tl.arange(0, K_PAD)
    column_ok = columns < k_blocks
    offsets = (batch_head.to(tl.int64) * q_blocks + rows[:, None]) * k_blocks + columns[None, :]
    logits = tl.load(SCORES + offsets, mask=row_ok[:, None] & column_ok[None, :], other=float("-inf"))
    logits += tl.load(KEY_BIAS + batch * k_blocks + columns, mask=column_ok, other=float("-inf"))[None, :]
    if CAUSAL:   # a key block is visible when its first key is at or before the block's last query
        query_last = tl.minimum(rows * BLOCK_SIZE + BLOCK_SIZE - 1, q_len - 1) + q_offset
        logits = tl.where(columns[None, :] * BLOCK_SIZE <= query_last[:, None], logits, float("-inf"))
    row_max = tl.max(logits, 1)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    weights = tl.exp(logits - safe_max[:, None])
    total = tl.sum(weights, 1)
    mass = weights / tl.where(total > 0, total, 1.0)[:, None]           # rows that see nothing: zeros
    mass = tl.where(column_ok[None, :], mass, -1.0)                      # padding: never picked
    coverage = tl.load(COVERAGE + head)
    min_blocks = tl.load(MIN_BLOCKS + head)
    max_blocks = tl.load(MAX_BLOCKS + head)
    covered = tl.zeros([ROWS], dtype=tl.float32)
    out = LISTS + (batch_head.to(tl.int64) * q_blocks + rows) * limit
    # A row keeps its ranks up to the first one it does not keep (the mass before a rank only grows, the
    # rank's own mass only shrinks): the loop ends when no row of the tile keeps its rank (the lists hold -1).
    rank = 0
    going = limit > 0
    while going:
        value, best = tl.max(mass, 1, return_indices=True, return_indices_tie_break_left=True)  # lowest of equals
        covered += value
        before = covered - value                                         # mass of the better blocks
        keep = ((before < coverage) & (value > 0)) | (rank < min_blocks)
        keep = keep & (rank < max_blocks) & row_ok
        tl.store(out + rank, best.to(tl.int64), mask=keep)
        mass = tl.where(columns[None, :] == best[:, None], -1.0, mass)
        rank += 1
        going = (rank < limit) & (tl.max(keep.to(tl.int32), 0) > 0)


def coverage_lists_of_scores(scores: torch.Tensor, key_bias: torch.Tensor, *, coverage: torch.Tensor,
                             min_blocks: torch.Tensor, max_blocks: torch.Tensor, limit: int, block_size: int,
                             q_len: int, causal: bool, q_offset: int) -> torch.Tensor:
    """Block lists ``int64 [B, H, Qb, limit]`` of pooled coverage from pooled scores ``float32 [B, H, Qb, Kb]``.

    The logits are ``scores + key_bias[b]`` (``key_bias [B, Kb]``: log of each key block's valid
    keys, ``-inf`` for none), with causal blocks hidden; per row the softmax mass is ranked and
    kept as `sparsify.estimators.coverage_block_lists` keeps it (``coverage``, ``min_blocks``,
    ``max_blocks``: per-head tensors on the scores' device; ``limit`` >= every ``max_blocks``).

    Example:
        >>> scores = torch.randn(1, 1, 4, 4, device="cuda")                                   # doctest: +SKIP
        >>> one = torch.ones(1, dtype=torch.int64, device="cuda")                             # doctest: +SKIP
        >>> coverage_lists_of_scores(scores, torch.zeros(1, 4, device="cuda"), coverage=torch.tensor([0.9]).cuda(),
        ...                          min_blocks=one, max_blocks=2 * one, limit=2, block_size=16, q_len=64,
        ...                          causal=True, q_offset=0).shape                              # doctest: +SKIP
        torch.Size([1, 1, 4, 2])
    """
    batch, heads, q_blocks, k_blocks = scores.shape
    lists = torch.full((batch, heads, q_blocks, limit), -1, device=scores.device, dtype=torch.int64)
    pad = triton.next_power_of_2(k_blocks)
    rows = max(1, min(4, 4096 // pad))                                   # about 4K logits per program
    grid = (triton.cdiv(q_blocks, rows), batch * heads)
    _coverage_kernel[grid](scores.contiguous(), key_bias.to(torch.float32).contiguous(),
                           coverage.to(torch.float32).contiguous(), min_blocks.to(torch.int32).contiguous(),
                           max_blocks.to(torch.int32).contiguous(), lists, heads, q_blocks, k_blocks, q_len,
                           q_offset, limit, CAUSAL=bool(causal), BLOCK_SIZE=block_size, ROWS=rows, K_PAD=pad,
                           num_warps=4 if pad <= 1024 else 8)
    return lists
