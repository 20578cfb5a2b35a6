"""Triton kernels of the input-adaptive estimators: vertical-slash probe, lines and lists; pooled means, coverage.

The probe (the last ``probe_rows`` queries) attends to every key; `vertical_slash_line_mass`
needs, per key block ``J``, its probability mass split by offset class (which block diagonal
each (row, key) pair lies on). In plain torch that is a ``[B, H, probe_rows, k_len]`` score
tensor written, softmaxed and read again (gigabytes at 128K tokens). Here (`probe_block_split`)
two launches over (batch x head, chunk of key blocks): the first keeps each probe row's maximum
and sum of exponentials per chunk, the second combines them into the rows' totals, recomputes the
chunk's scores and writes the ``[B, H, Kb, classes]`` split itself. `top_lines_of_split` turns
the split into the per-head top key blocks and block diagonals (an in-register sort per batch x
head) and `vertical_slash_lists_of_lines` writes every query block's list: a vertical-slash
estimate is four launches.

No atomics: every output element has one writer, so results are deterministic. Scores
accumulate in float32 (float32 inputs are multiplied in IEEE float32, not TF32). Block sizes
must be powers of two from 16 to 256 (`supports`); other cases take the torch path.

Pooled coverage: `block_means` pools queries and keys per block (one launch each);
`coverage_lists_of_scores` — one program per few query blocks — reads their rows of pooled
scores once, adds the key bias, hides causal blocks, takes the softmax in registers and picks
the best blocks one by one (largest mass first, ties to the lower block) until the coverage is
reached, then appends the sink blocks: the block lists come out directly, with no
``[B, H, Qb, Kb]`` probability or sort-key tensor and no sort. Where a row is much wider than
the ranks it may keep (long contexts at low density: 1,024 blocks, ≤ 64 ranks at 128K), a radix
select first takes each row's ``limit`` best blocks into a small tile and the ranking runs over
that tile alone. Rows of up to `MAX_COVERAGE_BLOCKS` key blocks (`supports_coverage`). Query-mean
scoring (`query_mean_logits`) replaces the pooled scores by each query block's mean query against
every key, reduced per key block to its log-sum-exp in one launch; the coverage kernel takes those.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors (tests);
``tests/test_kernel_compile.py`` compiles them for sm_90 without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["block_means", "coverage_lists_of_scores", "probe_block_split", "query_mean_logits", "supports",
           "supports_coverage", "supports_lines", "top_lines_of_split", "vertical_slash_lists_of_lines"]

LOG2E = 1.4426950408889634
#: Key blocks a row of the coverage kernel holds in registers (2048 blocks: 256K tokens at block 128).
MAX_COVERAGE_BLOCKS = 2048
#: The coverage kernel ranks a row's blocks over a pre-selected candidate tile where the row (padded) is at least
#: this many times wider than the ranks it may keep (the padded ``limit``); narrower rows are ranked whole.
PRESELECT_WIDTH_RATIO = 4


def supports(block_size: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this block size, head dim and dtype (else the caller uses the torch path).

    Example:
        >>> supports(128, 64, torch.bfloat16), supports(96, 64, torch.bfloat16)
        (True, False)
    """
    return (16 <= block_size <= 256 and block_size & (block_size - 1) == 0 and head_dim <= 256
            and dtype in (torch.float16, torch.bfloat16, torch.float32))


@triton.jit
def _key_tile_scores(q, K, k_rows, VALID, batch, stride_ks, stride_kd, stride_valid, keys, dims, dim_ok, row_ok,
                     k_len, row_last, qk_scale, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr):
    """Scores (base 2) of a tile of query rows against a tile of keys; hidden pairs are -inf (causal: a row sees the
    keys up to ``row_last``, its absolute position or its block's last query)."""
    key_ok = keys < k_len
    k = tl.load(k_rows + keys.to(tl.int64)[:, None] * stride_ks + dims[None, :] * stride_kd,
                mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        scores = tl.dot(q, tl.trans(k)) * qk_scale
    visible = row_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= row_last[:, None])
    if HAS_VALID:
        valid = tl.load(VALID + batch * stride_valid + keys, mask=key_ok, other=0)
        visible = visible & (valid != 0)[None, :]
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def _running_exp2_sum(running_max, running_sum, scores):
    """Rows' running maximum and sum of ``2^(score - maximum)`` after one more tile of base-2 ``scores`` (-inf: none)."""
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, running_sum * tl.exp2(running_max - safe_max) + tl.sum(tl.exp2(scores - safe_max[:, None]), 1)


@triton.jit
def _probe_head(Q, K, KV_INDEX, batch_head, heads, stride_qb, stride_qh, stride_kb, stride_kh, probe_offset,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """``(batch, q_rows, k_rows, dims, dim_ok)`` of a probe program's (batch, head): its first probe row and key row."""
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    kv = tl.load(KV_INDEX + head)
    dims = tl.arange(0, D_PAD)
    q_rows = Q + batch * stride_qb + head.to(tl.int64) * stride_qh + probe_offset
    k_rows = K + batch * stride_kb + kv * stride_kh
    return batch, q_rows, k_rows, dims, dims < HEAD_DIM


@triton.jit
def _probe_rows(q_rows, rows, row_ok, dims, dim_ok, stride_qs, stride_qd):
    """A tile of probe queries (rows past the probe: zeros)."""
    return tl.load(q_rows + rows[:, None] * stride_qs + dims[None, :] * stride_qd,
                   mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _probe_stats_kernel(Q, K, KV_INDEX, VALID, ROW_MAX, ROW_SUM,
                        stride_qb, stride_qh, stride_qs, stride_qd,
                        stride_kb, stride_kh, stride_ks, stride_kd, stride_valid,
                        heads, probe_offset, k_len, probe_rows, base, qk_scale,
                        CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
                        CHUNK_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    # Pass 1: per probe row, the maximum and the sum of 2^(score - maximum) over this program's chunk of keys.
    batch_head = tl.program_id(0)      # heads vary fastest: the heads sharing a key/value head read a chunk together
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    batch, q_rows, k_rows, dims, dim_ok = _probe_head(Q, K, KV_INDEX, batch_head, heads, stride_qb, stride_qh,
                                                      stride_kb, stride_kh, probe_offset, HEAD_DIM, D_PAD)
    out_rows = (batch_head.to(tl.int64) * chunks + chunk) * probe_rows
    for row_start in range(0, probe_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < probe_rows
        q = _probe_rows(q_rows, rows, row_ok, dims, dim_ok, stride_qs, stride_qd)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for column_start in range(0, CHUNK_KEYS, BLOCK_N):                # a loop, not unrolled: compile time
            keys = chunk * CHUNK_KEYS + column_start + tl.arange(0, BLOCK_N)
            scores = _key_tile_scores(q, K, k_rows, VALID, batch, stride_ks, stride_kd, stride_valid, keys, dims,
                                      dim_ok, row_ok, k_len, base + rows, qk_scale, CAUSAL, HAS_VALID, IEEE)
            row_max, row_sum = _running_exp2_sum(row_max, row_sum, scores)
        tl.store(ROW_MAX + out_rows + rows, row_max, mask=row_ok)
        tl.store(ROW_SUM + out_rows + rows, row_sum, mask=row_ok)


@triton.jit
def _probe_split_kernel(Q, K, KV_INDEX, VALID, ROW_MAX, ROW_SUM, SPLIT,
                        stride_qb, stride_qh, stride_qs, stride_qd,
                        stride_kb, stride_kh, stride_ks, stride_kd, stride_valid,
                        heads, probe_offset, k_len, k_blocks, probe_rows, base, shift, qk_scale,
                        CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                        CLASSES: tl.constexpr, CLASSES_PAD: tl.constexpr):
    # Pass 2: each row's total over every chunk (pass 1's partials), then the probabilities of this chunk's keys
    # summed over the probe rows per key block and offset class: the split itself, one writer per element.
    batch_head = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    batch, q_rows, k_rows, dims, dim_ok = _probe_head(Q, K, KV_INDEX, batch_head, heads, stride_qb, stride_qh,
                                                      stride_kb, stride_kh, probe_offset, HEAD_DIM, D_PAD)
    stats = batch_head.to(tl.int64) * chunks * probe_rows
    block_index = tl.arange(0, CHUNK_BLOCKS)
    class_index = tl.arange(0, CLASSES_PAD)
    column_offsets = tl.arange(0, BLOCK_N)
    split = tl.zeros([CHUNK_BLOCKS, CLASSES_PAD], dtype=tl.float32)
    for row_start in range(0, probe_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < probe_rows
        total_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for other in range(0, chunks):
            part_max = tl.load(ROW_MAX + stats + other * probe_rows + rows, mask=row_ok, other=float("-inf"))
            part_sum = tl.load(ROW_SUM + stats + other * probe_rows + rows, mask=row_ok, other=0.0)
            new_max = tl.maximum(total_max, part_max)
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            total_sum = total_sum * tl.exp2(total_max - safe_max) + part_sum * tl.exp2(part_max - safe_max)
            total_max = new_max
        # log2 of each row's total; a row that sees nothing gets +inf (its probabilities are 0).
        seen = total_sum > 0
        total = tl.where(seen, total_max + tl.log2(tl.where(seen, total_sum, 1.0)), float("inf"))
        q = _probe_rows(q_rows, rows, row_ok, dims, dim_ok, stride_qs, stride_qd)
        for block in range(CHUNK_BLOCKS):                                   # a loop, not unrolled: compile time
            key_block = chunk * CHUNK_BLOCKS + block
            for column_start in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
                keys = key_block * BLOCK_SIZE + column_start + column_offsets
                scores = _key_tile_scores(q, K, k_rows, VALID, batch, stride_ks, stride_kd, stride_valid, keys, dims,
                                          dim_ok, row_ok, k_len, base + rows, qk_scale, CAUSAL, HAS_VALID, IEEE)
                probabilities = tl.exp2(scores - total[:, None])               # hidden pairs, blind rows: 0
                # Offset class of (row r, key c of the block): floor((shift + r - c) / block) + 1, here >= 0.
                offset_class = (shift + rows[:, None] - (column_start + column_offsets)[None, :] + BLOCK_SIZE) \
                    // BLOCK_SIZE
                lowest = (shift + row_start - (column_start + BLOCK_N - 1) + BLOCK_SIZE) // BLOCK_SIZE
                for step in tl.static_range(3):      # a tile of at most block x block pairs spans 3 classes
                    mass = tl.sum(tl.sum(tl.where(offset_class == lowest + step, probabilities, 0.0), 1), 0)
                    split += tl.where((block_index[:, None] == block) & (class_index[None, :] == lowest + step),
                                      mass, 0.0)
    blocks = chunk * CHUNK_BLOCKS + block_index
    tl.store(SPLIT + (batch_head.to(tl.int64) * k_blocks + blocks[:, None]) * CLASSES + class_index[None, :], split,
             mask=(blocks < k_blocks)[:, None] & (class_index[None, :] < CLASSES))


#: The most programs a CUDA grid's second dimension takes (the probe's chunks of key blocks).
MAX_GRID_CHUNKS = 65535


def _chunk_blocks(k_blocks: int, programs_per_chunk: int) -> int:
    """Key blocks per program of the probe: a power of two up to 16, fewer while the grid would drop below ~2K programs
    (more than 16 only where the chunks would overflow the grid's second dimension)."""
    chunk = 1
    while chunk < 16 and (k_blocks // (2 * chunk)) * programs_per_chunk >= 2048:
        chunk *= 2
    while -(-k_blocks // chunk) > MAX_GRID_CHUNKS:
        chunk *= 2
    return chunk


def probe_block_split(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                      probe_rows: int, scale: float, causal: bool, q_offset: int,
                      key_valid: torch.Tensor | None, chunk_blocks: int | None = None) -> torch.Tensor:
    """``float32 [B, H, k_blocks, classes]``: the probe rows' softmax mass in each key block, split by offset class.

    Row ``r`` of the probe is query ``q_len - probe_rows + r``, at absolute position ``base + r``
    (``base = q_offset + q_len - probe_rows``); the pair (row ``r``, key ``J * block + c``) falls in
    class ``floor((base % block + r - c) / block) + 1`` of key block ``J``, and
    ``classes = (base % block + probe_rows - 1) // block + 2``. What `sparsify.estimators`'s
    torch path computes, with float32 scores instead of the inputs' dtype.

    Two launches over a grid of (batch x head, chunk of key blocks): the first writes, per probe
    row and chunk, the scores' maximum and sum of exponentials; the second combines them into each
    row's total, recomputes the chunk's scores and writes the split itself (no per-row tensor of
    key-block size, no torch ops after). ``chunk_blocks`` (a power of two; default: by the grid's
    size) sets the key blocks per program. The heads vary fastest in the grid, so the query heads
    of one key/value head read each chunk of keys at about the same time (from L2 after the first),
    and a program holds all its probe rows in one tile where they fit (<= 128 rows, head dim <= 128;
    float32 tiles of more than 64 dims keep 64 rows):
    each pass reads its keys once per head, not once per tile of rows.

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
    # Every probe row in one tile where it fits (<= 128 rows of <= 128 dims): each pass then reads its keys once;
    # <= block: a tile spans 3 offset classes.
    # (float32 tiles of more than 64 dims stay at 64 rows: 128 would outgrow an A100's shared memory.)
    row_cap = 128 if head_dim <= 64 or (head_dim <= 128 and q.dtype != torch.float32) else 64
    block_m = max(16, min(row_cap, block_size, triton.next_power_of_2(probe_rows)))
    warps = 8 if block_m * max(16, triton.next_power_of_2(head_dim)) >= 8192 else 4
    chunk_blocks = chunk_blocks or _chunk_blocks(k_blocks, batch * heads)
    chunks = -(-k_blocks // chunk_blocks)
    if chunks > MAX_GRID_CHUNKS:
        raise ValueError(f"probe_block_split: {k_blocks} key blocks in chunks of {chunk_blocks} make {chunks} programs "
                         f"along the grid's second dimension, more than CUDA's {MAX_GRID_CHUNKS}; pass a larger "
                         f"chunk_blocks (or none: the default grows with the keys)")
    row_max = torch.empty(batch * heads, chunks, probe_rows, device=device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    split = torch.empty(batch, heads, k_blocks, classes, device=device, dtype=torch.float32)
    common = (*q.stride(), *k.stride(), valid.stride(0) if key_valid is not None else 0, heads,
              (q_len - probe_rows) * q.stride(2), k_len)
    flags = dict(CAUSAL=bool(causal), HAS_VALID=key_valid is not None, IEEE=q.dtype == torch.float32,
                 BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)))
    grid = (batch * heads, chunks)
    _probe_stats_kernel[grid](q, k, kv_index, valid, row_max, row_sum, *common, probe_rows, base, scale * LOG2E,
                              CHUNK_KEYS=chunk_blocks * block_size, num_warps=warps, **flags)
    _probe_split_kernel[grid](q, k, kv_index, valid, row_max, row_sum, split, *common, k_blocks, probe_rows, base,
                              shift, scale * LOG2E, BLOCK_SIZE=block_size, CHUNK_BLOCKS=chunk_blocks, CLASSES=classes,
                              CLASSES_PAD=max(2, triton.next_power_of_2(classes)), num_warps=warps, **flags)
    return split


#: Lines (key blocks + block diagonals) the top-lines kernel sorts in registers (256K tokens at block 128).
MAX_LINES = 4096


def supports_lines(k_blocks: int, total_blocks: int) -> bool:
    """Whether the top-lines kernel takes ``k_blocks`` key blocks and ``k_blocks + total_blocks`` diagonals.

    Example:
        >>> supports_lines(1024, 1024), supports_lines(4096, 4096)
        (True, False)
    """
    return 1 <= k_blocks and k_blocks + total_blocks <= MAX_LINES


@triton.jit
def _top_of(mass, index, count, n, OUT, LIMIT, PAD: tl.constexpr):
    """Store the indices of the ``count`` largest of ``mass[:n]`` (ties: lower index first), -1 up to ``LIMIT``."""
    bits = tl.where(index < n, mass, 0.0).to(tl.int32, bitcast=True).to(tl.int64)       # masses >= 0: ordered
    key = tl.where(index < n, (bits << 32) + (n - 1 - index), -1)
    ordered = tl.sort(key, descending=True)
    top = (n - 1) - (ordered & tl.full([PAD], 0xFFFFFFFF, tl.int64))
    tl.store(OUT + index, tl.where(index < count, top, -1), mask=index < LIMIT)


@triton.jit
def _top_lines_kernel(SPLIT, COLUMN_COUNT, SLASH_COUNT, COLUMNS, DIAGONALS,
                      heads, k_blocks, diagonals, first_block, column_limit, slash_limit,
                      CLASSES: tl.constexpr, PAD: tl.constexpr):
    batch_head = tl.program_id(0)
    head = batch_head % heads
    index = tl.arange(0, PAD)
    rows = SPLIT + batch_head.to(tl.int64) * k_blocks * CLASSES
    column_mass = tl.zeros([PAD], dtype=tl.float32)
    tile = tl.zeros([PAD], dtype=tl.float32)        # offset tile d: the split's class c of key block Kb-1+m+c-d
    next_tile = tl.zeros([PAD], dtype=tl.float32)   # offset tile d + 1
    for offset_class in tl.static_range(CLASSES):
        column_mass += tl.load(rows + index * CLASSES + offset_class, mask=index < k_blocks, other=0.0)
        block = k_blocks - 1 + first_block + offset_class - index
        tile += tl.load(rows + block * CLASSES + offset_class, mask=(block >= 0) & (block < k_blocks), other=0.0)
        block = block - 1
        next_tile += tl.load(rows + block * CLASSES + offset_class, mask=(block >= 0) & (block < k_blocks), other=0.0)
    out = batch_head.to(tl.int64)
    _top_of(column_mass, index, tl.load(COLUMN_COUNT + head), k_blocks, COLUMNS + out * column_limit, column_limit,
            PAD)
    _top_of(tile + next_tile, index, tl.load(SLASH_COUNT + head), diagonals, DIAGONALS + out * slash_limit,
            slash_limit, PAD)


def top_lines_of_split(split: torch.Tensor, *, first_block: int, total_blocks: int, column_count: torch.Tensor,
                       slash_count: torch.Tensor, column_limit: int, slash_limit: int) -> tuple[torch.Tensor, ...]:
    """``(columns [B, H, column_limit], diagonals [B, H, slash_limit])`` (int64, ``-1`` past a head's count) of a probe split.

    From `probe_block_split`'s ``[B, H, Kb, classes]``: each key block's mass (vertical lines) and
    each block diagonal's (slash lines, slots as `sparsify.estimators.vertical_slash_line_mass`
    lays them out), then per head the ``column_count[h]`` / ``slash_count[h]`` best of each (int32
    tensors on the split's device; ties to the lower index) — what `sparsify.estimators`' masses and
    top-k compute in some twenty torch ops, here one launch of one program per (batch, head) that
    sorts in registers. Up to `MAX_LINES` lines (`supports_lines`).

    Example:
        >>> split = torch.rand(1, 1, 4, 2, device="cuda")                                      # doctest: +SKIP
        >>> one = torch.ones(1, dtype=torch.int32, device="cuda")                              # doctest: +SKIP
        >>> top_lines_of_split(split, first_block=3, total_blocks=4, column_count=one, slash_count=one,
        ...                    column_limit=1, slash_limit=1)[0].shape                          # doctest: +SKIP
        torch.Size([1, 1, 1])
    """
    batch, heads, k_blocks, classes = split.shape
    diagonals = k_blocks + total_blocks
    columns = torch.empty(batch, heads, column_limit, device=split.device, dtype=torch.int64)
    slashes = torch.empty(batch, heads, slash_limit, device=split.device, dtype=torch.int64)
    pad = triton.next_power_of_2(max(diagonals, column_limit, slash_limit, 16))
    _top_lines_kernel[(batch * heads,)](split.contiguous(), column_count, slash_count, columns, slashes, heads,
                                        k_blocks, diagonals, first_block, column_limit, slash_limit, CLASSES=classes,
                                        PAD=pad, num_warps=4 if pad <= 1024 else 8)
    return columns, slashes


@triton.jit
def _store_sink_slots(out, first_slot, row_ok, SINKS, head, sink_width, ROWS: tl.constexpr, SINK_PAD: tl.constexpr):
    """From slot ``first_slot`` of every row (``out``: the rows' first slots), the head's first ``SINKS[head]`` key
    blocks, ``-1`` up to ``sink_width`` slots."""
    sink = tl.arange(0, SINK_PAD)
    sinks = tl.where(sink < tl.load(SINKS + head), sink, -1).to(tl.int64)
    tl.store(out[:, None] + first_slot + sink[None, :], tl.zeros([ROWS, SINK_PAD], dtype=tl.int64) + sinks[None, :],
             mask=row_ok[:, None] & (sink < sink_width)[None, :])


@triton.jit
def _vertical_slash_lists_kernel(COLUMNS, DIAGONALS, SINKS, LISTS, heads, q_blocks, k_blocks, q_offset, column_width,
                                 slash_width, sink_width, slots, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                 ROWS: tl.constexpr, COLUMN_PAD: tl.constexpr, SLASH_PAD: tl.constexpr,
                                 SINK_PAD: tl.constexpr):
    row_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    head = batch_head % heads
    rows = row_tile * ROWS + tl.arange(0, ROWS)
    row_ok = rows < q_blocks
    query_block = (rows * BLOCK_SIZE + q_offset) // BLOCK_SIZE             # each row's absolute block
    row_start = LISTS + (batch_head.to(tl.int64) * q_blocks + rows) * slots
    out = row_start[:, None]
    column = tl.arange(0, COLUMN_PAD)
    columns = tl.load(COLUMNS + batch_head.to(tl.int64) * column_width + column, mask=column < column_width, other=-1)
    tl.store(out + column[None, :], tl.zeros([ROWS, COLUMN_PAD], dtype=tl.int64) + columns[None, :],
             mask=row_ok[:, None] & (column < column_width)[None, :])
    slash = tl.arange(0, SLASH_PAD)
    diagonals = tl.load(DIAGONALS + batch_head.to(tl.int64) * slash_width + slash, mask=slash < slash_width, other=-1)
    # Slot d holds block diagonal d - (Kb - 1): the key block a - (d - (Kb - 1)) of absolute query block a.
    on_slash = tl.where(diagonals[None, :] >= 0, query_block[:, None] + (k_blocks - 1) - diagonals[None, :], -1)
    tl.store(out + column_width + slash[None, :], on_slash, mask=row_ok[:, None] & (slash < slash_width)[None, :])
    next_slot = column_width + slash_width
    if CAUSAL:   # every row keeps its own diagonal block (the probe's top lines may miss the first rows' keys)
        tl.store(row_start + next_slot, query_block.to(tl.int64), mask=row_ok)
        next_slot += 1
    _store_sink_slots(row_start, next_slot, row_ok, SINKS, head, sink_width, ROWS, SINK_PAD)


def vertical_slash_lists_of_lines(columns: torch.Tensor, diagonals: torch.Tensor, sink_count: torch.Tensor, *,
                                  sink_width: int, q_blocks: int, k_blocks: int, q_offset: int, block_size: int,
                                  causal: bool) -> torch.Tensor:
    """Block lists ``int64 [B, H, Qb, slots]`` of vertical-slash lines: the columns, each diagonal's block, the own block, sinks.

    Per row (query block ``i`` at absolute block ``a``): the ``columns [B, H, V]`` as they are,
    ``a + Kb - 1 - d`` for each diagonal slot ``d`` of ``diagonals [B, H, S]`` (``-1`` stays
    ``-1``), ``a`` itself when causal, then the first ``sink_count[h]`` key blocks (an int32 tensor
    on the lists' device; ``sink_width`` slots). The slots of
    `sparsify.estimators.vertical_slash_block_lists`' torch path, in one launch.

    Example:
        >>> one = torch.ones(1, 1, 1, dtype=torch.int64, device="cuda")                        # doctest: +SKIP
        >>> vertical_slash_lists_of_lines(one, one, one[0, 0].int(), sink_width=1, q_blocks=2, k_blocks=2,
        ...                               q_offset=0, block_size=16, causal=True).shape       # doctest: +SKIP
        torch.Size([1, 1, 2, 4])
    """
    batch, heads, column_width = columns.shape
    slash_width = diagonals.shape[-1]
    slots = column_width + slash_width + int(causal) + sink_width
    lists = torch.empty(batch, heads, q_blocks, slots, device=columns.device, dtype=torch.int64)
    rows = 16
    _vertical_slash_lists_kernel[(triton.cdiv(q_blocks, rows), batch * heads)](
        columns.contiguous(), diagonals.contiguous(), sink_count, lists, heads, q_blocks, k_blocks, q_offset,
        column_width, slash_width, sink_width, slots, CAUSAL=bool(causal), BLOCK_SIZE=block_size, ROWS=rows,
        COLUMN_PAD=triton.next_power_of_2(max(column_width, 1)), SLASH_PAD=triton.next_power_of_2(max(slash_width, 1)),
        SINK_PAD=triton.next_power_of_2(max(sink_width, 1)), num_warps=4)
    return lists


@triton.jit
def _block_means_kernel(X, VALID, MEANS, COUNTS, heads, length, stride_b, stride_h, stride_s, stride_d, stride_valid,
                        HAS_VALID: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIM: tl.constexpr, D_PAD: tl.constexpr):
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    blocks = tl.num_programs(0)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    rows = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < length
    if HAS_VALID:
        row_ok = row_ok & (tl.load(VALID + batch * stride_valid + rows, mask=rows < length, other=0) != 0)
    offsets = batch * stride_b + head * stride_h + rows.to(tl.int64)[:, None] * stride_s + dims[None, :] * stride_d
    x = tl.load(X + offsets, mask=row_ok[:, None] & (dims < DIM)[None, :], other=0.0).to(tl.float32)
    count = tl.sum(row_ok.to(tl.float32), 0)
    tl.store(MEANS + (batch_head.to(tl.int64) * blocks + block) * DIM + dims, tl.sum(x, 0) / tl.maximum(count, 1.0),
             mask=dims < DIM)
    if head == 0:
        tl.store(COUNTS + batch * blocks + block, count)


def block_means(x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means float32 [B, H, blocks, D], counts float32 [B, 1, blocks])`` of ``x [B, H, S, D]``'s valid rows per block, one launch.

    What `sparsify.estimators`' torch block mean computes (``valid [B, S]``: rows that count;
    a block without one has mean 0), summed in float32 straight from ``x``.

    Example:
        >>> means, counts = block_means(torch.randn(1, 2, 40, 8, device="cuda"), 16)           # doctest: +SKIP
        >>> means.shape, counts.flatten().tolist()                                            # doctest: +SKIP
        (torch.Size([1, 2, 3, 8]), [16.0, 16.0, 8.0])
    """
    batch, heads, length, dim = x.shape
    blocks = -(-length // block_size)
    means = torch.empty(batch, heads, blocks, dim, device=x.device, dtype=torch.float32)
    counts = torch.empty(batch, 1, blocks, device=x.device, dtype=torch.float32)
    flags = valid.to(torch.uint8).contiguous() if valid is not None else counts
    if blocks and heads:
        _block_means_kernel[(blocks, batch * heads)](
            x, flags, means, counts, heads, length, *x.stride(), flags.stride(0) if valid is not None else 0,
            HAS_VALID=valid is not None, BLOCK_SIZE=block_size, DIM=dim, D_PAD=max(16, triton.next_power_of_2(dim)),
            num_warps=8 if block_size * dim >= 8192 else 4)
    return means, counts


@triton.jit
def _query_mean_logits_kernel(MEANS, K, KV_INDEX, VALID, LOGITS,
                              stride_mb, stride_mh, stride_mq, stride_md,
                              stride_kb, stride_kh, stride_ks, stride_kd, stride_valid,
                              heads, q_blocks, k_blocks, q_len, k_len, q_offset, row_tiles, chunks,
                              CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, ROWS: tl.constexpr,
                              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    # Row tiles vary fastest, then heads: the programs reading one chunk of keys run together (L2 serves the rest).
    tile_head = tl.program_id(0)
    row_tile = tile_head % row_tiles
    head = tile_head // row_tiles
    batch_chunk = tl.program_id(1)
    batch = (batch_chunk // chunks).to(tl.int64)
    chunk = batch_chunk % chunks
    kv = tl.load(KV_INDEX + head).to(tl.int64)
    rows = row_tile * ROWS + tl.arange(0, ROWS)                          # query blocks
    row_ok = rows < q_blocks
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(MEANS + batch * stride_mb + head.to(tl.int64) * stride_mh + rows.to(tl.int64)[:, None] * stride_mq
                + dims[None, :] * stride_md, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_rows = K + batch * stride_kb + kv * stride_kh
    if not IEEE:
        q = q.to(K.dtype.element_ty)                                     # 16-bit keys: a 16-bit product, float32 sums
    last_query = q_offset + tl.minimum((rows + 1) * BLOCK_SIZE, q_len) - 1    # the last query of each block
    tile_last = q_offset + tl.minimum((row_tile * ROWS + ROWS) * BLOCK_SIZE, q_len) - 1
    out = LOGITS + ((batch * heads + head) * q_blocks + rows.to(tl.int64)) * k_blocks
    for block in range(CHUNK_BLOCKS):                                    # a loop, not unrolled: compile time
        key_block = chunk * CHUNK_BLOCKS + block
        block_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        block_sum = tl.zeros([ROWS], dtype=tl.float32)
        seen = key_block < k_blocks
        if CAUSAL:
            seen = seen & (key_block * BLOCK_SIZE <= tile_last)          # a block after every query: -inf, no read
        if seen:
            for column_start in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
                keys = key_block * BLOCK_SIZE + column_start + tl.arange(0, BLOCK_N)
                scores = _key_tile_scores(q, K, k_rows, VALID, batch, stride_ks, stride_kd, stride_valid, keys, dims,
                                          dim_ok, row_ok, k_len, last_query, 1.4426950408889634,   # base 2
                                          CAUSAL, HAS_VALID, IEEE)
                block_max, block_sum = _running_exp2_sum(block_max, block_sum, scores)
        filled = block_sum > 0
        logit = tl.where(filled, (block_max + tl.log2(tl.where(filled, block_sum, 1.0))) * 0.6931471805599453,
                         float("-inf"))                                    # natural log
        tl.store(out + key_block, logit, mask=row_ok & (key_block < k_blocks))


def query_mean_logits(means: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                      q_len: int, causal: bool, q_offset: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """``float32 [B, H, Qb, Kb]``: per query block and key block, ``log Σ exp(mean query · key)`` over the block's keys.

    ``means`` ``[B, H, Qb, D]`` are the query blocks' means with the scale (and any temperature)
    already in; a key block's keys after the query block's last query (causal), past ``k_len``
    or invalid (``key_valid [B, Sk]``) are left out, and a block with none gets ``-inf``. Their
    softmax over a row is `sparsify.estimators.query_mean_block_mass`'s; `coverage_lists_of_scores`
    takes them as scores (key bias 0). One launch over (row tile x head, batch x chunk of key
    blocks), reading every visible key once per row tile (from L2 for all but the first tile
    and head of a chunk); blocks after a tile's last query are not read.

    Example:
        >>> means = torch.randn(1, 2, 4, 16, device="cuda")                                  # doctest: +SKIP
        >>> query_mean_logits(means, torch.randn(1, 1, 64, 16, device="cuda"), block_size=16,  # doctest: +SKIP
        ...                   kv_head_index=torch.tensor([0, 0]), q_len=64, causal=True, q_offset=0,
        ...                   key_valid=None).shape
        torch.Size([1, 2, 4, 4])
    """
    batch, heads, q_blocks, head_dim = means.shape
    k_len = k.shape[2]
    device = means.device
    k_blocks = -(-k_len // block_size)
    kv_index = kv_head_index.to(device, torch.int64, non_blocking=True)
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else kv_index
    ieee = k.dtype == torch.float32
    d_pad = max(16, triton.next_power_of_2(head_dim))
    rows = max(16, min(64, triton.next_power_of_2(q_blocks)))
    row_tiles = triton.cdiv(q_blocks, rows)
    chunk_blocks = _chunk_blocks(k_blocks, row_tiles * heads)
    chunks = -(-k_blocks // chunk_blocks)
    if batch * chunks > MAX_GRID_CHUNKS:
        raise ValueError(f"query_mean_logits: {batch} inputs x {chunks} chunks of {chunk_blocks} key blocks exceed "
                         f"CUDA's {MAX_GRID_CHUNKS} programs along the grid's second dimension; estimate fewer inputs "
                         f"at once")
    logits = torch.empty(batch, heads, q_blocks, k_blocks, device=device, dtype=torch.float32)
    _query_mean_logits_kernel[(row_tiles * heads, batch * chunks)](
        means, k, kv_index, valid, logits, *means.stride(), *k.stride(),
        valid.stride(0) if key_valid is not None else 0, heads, q_blocks, k_blocks, q_len, k_len, q_offset,
        row_tiles, chunks, CAUSAL=bool(causal), HAS_VALID=key_valid is not None, IEEE=ieee, BLOCK_SIZE=block_size,
        CHUNK_BLOCKS=chunk_blocks, ROWS=rows, BLOCK_N=min(block_size, 64), HEAD_DIM=head_dim, D_PAD=d_pad,
        num_warps=8 if rows * d_pad >= 8192 else 4)
    return logits


def supports_coverage(k_blocks: int) -> bool:
    """Whether the coverage kernel takes rows of ``k_blocks`` key blocks (else the caller uses the torch path).

    Example:
        >>> supports_coverage(1024), supports_coverage(4096)
        (True, False)
    """
    return 1 <= k_blocks <= MAX_COVERAGE_BLOCKS


@triton.jit
def _preselect(mass, columns, rows, row_ok, CANDIDATE_MASS, CANDIDATE_INDEX, batch_head, q_blocks, limit,
               LIMIT_PAD: tl.constexpr):
    """Per row the ``limit`` largest masses (ties: lower block) with their blocks, in block order, as ``[ROWS, LIMIT_PAD]``
    tiles (the rest ``-1``): a radix select over the masses' bits, then a compaction through the scratch rows."""
    keys = tl.where(mass >= 0, mass.to(tl.int32, bitcast=True), -1)      # masses >= +0: bits in float order
    threshold = tl.zeros_like(rows)                                      # the limit-th largest key, bit by bit
    for round_ in tl.static_range(31):
        candidate = threshold | (1 << (30 - round_))
        above = tl.sum((keys >= candidate[:, None]).to(tl.int32), 1)
        threshold = tl.where(above >= limit, candidate, threshold)
    greater = keys > threshold[:, None]
    equal = keys == threshold[:, None]
    ties_taken = limit - tl.sum(greater.to(tl.int32), 1)
    take = (greater | (equal & (tl.cumsum(equal.to(tl.int32), 1) <= ties_taken[:, None]))) & row_ok[:, None]
    slot = tl.cumsum(take.to(tl.int32), 1) - 1
    scratch = (batch_head.to(tl.int64) * q_blocks + rows) * LIMIT_PAD
    tl.store(CANDIDATE_MASS + scratch[:, None] + slot, mass, mask=take)
    tl.store(CANDIDATE_INDEX + scratch[:, None] + slot, tl.broadcast_to(columns[None, :], mass.shape), mask=take)
    tl.debug_barrier()                                                   # the block's stores, seen by all its threads
    lanes = tl.arange(0, LIMIT_PAD)
    filled = (lanes[None, :] < tl.sum(take.to(tl.int32), 1)[:, None]) & row_ok[:, None]
    return (tl.load(CANDIDATE_MASS + scratch[:, None] + lanes[None, :], mask=filled, other=-1.0),
            tl.load(CANDIDATE_INDEX + scratch[:, None] + lanes[None, :], mask=filled, other=0), lanes)


@triton.jit
def _coverage_kernel(SCORES, KEY_BIAS, COVERAGE, MIN_BLOCKS, MAX_BLOCKS, SINKS, LISTS, CANDIDATE_MASS, CANDIDATE_INDEX,
                     heads, q_blocks, k_blocks, q_len, q_offset, limit, sink_width,
                     CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, K_PAD: tl.constexpr,
                     SINK_PAD: tl.constexpr, PRESELECT: tl.constexpr, LIMIT_PAD: tl.constexpr):
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
    slots = limit + sink_width
    out = LISTS + (batch_head.to(tl.int64) * q_blocks + rows) * slots
    # Every ranked slot starts empty (-1); after them, the head's first sink blocks.
    tl.store(out[:, None] + columns[None, :], tl.full([ROWS, K_PAD], -1, tl.int64),
             mask=row_ok[:, None] & (columns < limit)[None, :])
    _store_sink_slots(out, limit, row_ok, SINKS, head, sink_width, ROWS, SINK_PAD)
    # Only the `limit` best blocks of a row can be kept: with rows much wider than that, they are selected first
    # (31 counting rounds) and the ranking below runs over them alone (in block order: ties still go to the
    # lower block), instead of over the whole row once per rank.
    if PRESELECT:
        mass, blocks, lanes = _preselect(mass, columns, rows, row_ok, CANDIDATE_MASS, CANDIDATE_INDEX, batch_head,
                                         q_blocks, limit, LIMIT_PAD)
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
        if PRESELECT:
            mass = tl.where(lanes[None, :] == best[:, None], -1.0, mass)
            best = tl.sum(tl.where(lanes[None, :] == best[:, None], blocks, 0), 1)   # the lane's block
        else:
            mass = tl.where(columns[None, :] == best[:, None], -1.0, mass)
        tl.store(out + rank, best.to(tl.int64), mask=keep)
        rank += 1
        going = (rank < limit) & (tl.max(keep.to(tl.int32), 0) > 0)


def coverage_lists_of_scores(scores: torch.Tensor, key_bias: torch.Tensor, *, coverage: torch.Tensor,
                             min_blocks: torch.Tensor, max_blocks: torch.Tensor, limit: int, block_size: int,
                             q_len: int, causal: bool, q_offset: int, sink_count: torch.Tensor | None = None,
                             sink_width: int = 0) -> torch.Tensor:
    """Block lists ``int64 [B, H, Qb, limit + sink_width]`` of pooled coverage from pooled scores ``float32 [B, H, Qb, Kb]``.

    The logits are ``scores + key_bias[b]`` (``key_bias [B, Kb]``: log of each key block's valid
    keys, ``-inf`` for none), with causal blocks hidden; per row the softmax mass is ranked and
    kept as `sparsify.estimators.coverage_block_lists` keeps it (``coverage``, ``min_blocks``,
    ``max_blocks``: per-head tensors on the scores' device; ``limit`` >= every ``max_blocks``). The
    last ``sink_width`` slots hold the first ``sink_count[h]`` key blocks (an int32 tensor on the
    device), so the sinks need no list of their own.

    Example:
        >>> scores = torch.randn(1, 1, 4, 4, device="cuda")                                   # doctest: +SKIP
        >>> one = torch.ones(1, dtype=torch.int64, device="cuda")                             # doctest: +SKIP
        >>> coverage_lists_of_scores(scores, torch.zeros(1, 4, device="cuda"), coverage=torch.tensor([0.9]).cuda(),
        ...                          min_blocks=one, max_blocks=2 * one, limit=2, block_size=16, q_len=64,
        ...                          causal=True, q_offset=0).shape                              # doctest: +SKIP
        torch.Size([1, 1, 4, 2])
    """
    batch, heads, q_blocks, k_blocks = scores.shape
    lists = torch.empty(batch, heads, q_blocks, limit + sink_width, device=scores.device, dtype=torch.int64)
    pad = triton.next_power_of_2(max(k_blocks, limit))
    if sink_count is None:
        sink_count, sink_width = min_blocks, 0                          # any int tensor: no sink slot is read
    rows = max(1, min(4, 4096 // pad))                                   # about 4K logits per program
    grid = (triton.cdiv(q_blocks, rows), batch * heads)
    limit_pad = triton.next_power_of_2(limit)
    preselect = PRESELECT_WIDTH_RATIO * limit_pad <= pad                 # rows much wider than the ranks kept
    if preselect:   # scratch rows for the compaction of each row's candidates (one writer each, read back at once)
        candidate_mass = torch.empty(batch * heads * q_blocks * limit_pad, device=scores.device, dtype=torch.float32)
        candidate_index = torch.empty(batch * heads * q_blocks * limit_pad, device=scores.device, dtype=torch.int32)
    else:
        candidate_mass, candidate_index = lists, lists                     # never read
    _coverage_kernel[grid](scores.contiguous(), key_bias.to(torch.float32).contiguous(),
                           coverage.to(torch.float32).contiguous(), min_blocks.to(torch.int32).contiguous(),
                           max_blocks.to(torch.int32).contiguous(), sink_count.to(torch.int32).contiguous(), lists,
                           candidate_mass, candidate_index,
                           heads, q_blocks, k_blocks, q_len, q_offset, limit, sink_width, CAUSAL=bool(causal),
                           BLOCK_SIZE=block_size, ROWS=rows, K_PAD=pad,
                           SINK_PAD=triton.next_power_of_2(max(sink_width, 1)), PRESELECT=preselect,
                           LIMIT_PAD=limit_pad, num_warps=4 if pad < 1024 or (pad == 1024 and not preselect) else 8)
    return lists
