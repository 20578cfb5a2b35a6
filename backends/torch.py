"""The `torch` backend: block-sparse attention in plain torch ops.

It is the reference every other backend is checked against and the backend that runs on CPU.
Nothing of size ``q_len x k_len`` is ever built: query blocks are processed a chunk at a time,
and for each chunk the kept key/value blocks of every (head, query block) row are gathered into
a dense ``[rows, kept * block, head_dim]`` tensor, so one batched matmul computes the scores,
a softmax in fp32 normalises them and a second batched matmul applies them to the values.

How it goes, per call:

1. A *plan* is derived from the block tables (cached on the backend instance, per tables
   tensors, batch size and device; editing the tables' tensors in place invalidates it, and the
   plans go when the tables' ``kv_indices`` tensor does): key blocks a causal mask hides
   entirely are dropped, rows of (head, query block) with no kept block get zeros, the other
   rows are cut into chunks (in table order, or regrouped by width when that saves >5% work)
   and each chunk's gather indices and masked slots are prepared.
2. ``q * scale``, ``k`` and ``v`` are converted once to the compute dtype (fp32 for
   fp32/fp16/bf16; fp64 stays fp64) and zero-padded to whole blocks.
3. For each chunk: gather Q rows and K/V blocks (``index_select``), ``bmm``, mask only where a
   mask can bite (padding slots, the partial last key block, diagonal blocks under ``causal`` —
   see ``_mask_slots`` — and the user's ``attn_mask`` gathered tile by tile, as an additive
   bias), softmax, ``bmm``, and write the rows back. Rows that the user's mask leaves without
   any visible key are set to zero (softmax would give NaN).

Memory. Let ``S_c`` be one chunk's scores, ``batch * rows * block * (kept * block)`` elements of
the compute dtype. Chunks are cut so that ``S_c <= chunk_bytes`` (default 1 MiB on CPU, where a
chunk that stays in cache runs several times faster, and 64 MiB on other devices), except that
a chunk keeps at least 8 rows while ``S_c <= 4 * chunk_bytes`` (tiny batched matmuls
parallelise badly) and at least one row (for all batch items). The working set of a chunk is
about ``S_c * (2 + 2 * head_dim / block)`` (scores and probabilities, gathered K and V), plus
``S_c`` when a mask varies along queries (``[..., q_len, k_len]``). Beyond that: compute-dtype
padded copies of q/k/v (only when a conversion or padding is needed), the ``[B, H, q_len, Dv]``
output, and — only when the mask's lengths are not whole blocks — one padded copy of the mask
as given. An ``expand()``-ed mask is never materialised. Nothing is quadratic in the sequence
length except what the caller passes in.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparsify.backends.base import Backend, register_backend
from sparsify.errors import UnsupportedError
from sparsify.site import AttentionSite
from sparsify.tables import BlockTables

__all__ = ["TorchBackend", "CPU_CHUNK_BYTES", "DEVICE_CHUNK_BYTES"]

#: Scores bytes per chunk on CPU: a chunk that stays in L2 cache is several times faster than
#: one that does not (measured on a 2-core AMD EPYC: 1-4 MiB is the sweet spot).
CPU_CHUNK_BYTES = 1 << 20
#: Scores bytes per chunk on accelerators, where launches, not caches, are what costs.
DEVICE_CHUNK_BYTES = 64 << 20

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16, float64"
_PLANS_PER_TABLES = 8          # call shapes (batch, kv heads, device, ...) kept per tables
_MIN_CHUNK_ROWS = 8


@register_backend("torch")
class TorchBackend(Backend):
    """Block-gather sparse attention in plain torch ops; any device, fp32/fp16/bf16/fp64.

    ``chunk_bytes`` caps the fp32 scores of one chunk of query blocks (default: 1 MiB on CPU,
    64 MiB elsewhere); see the module docstring for the full memory bound.

    Example:
        >>> masks = torch.ones(2, 2, 2, dtype=torch.bool)
        >>> tables = BlockTables.from_block_masks(masks, block_size=16, q_len=32, k_len=32,
        ...                                       causal=False, kv_head_index=torch.tensor([0, 0]))
        >>> q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
        >>> TorchBackend().attention(q, k, v, tables).shape
        torch.Size([1, 2, 32, 8])
    """

    def __init__(self, chunk_bytes: int | None = None) -> None:
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._init_plan_cache()

    def _init_plan_cache(self) -> None:
        # Plans per tables, keyed weakly by the tables' kv_indices tensor (by identity): they
        # live as long as both this backend and those tables do.
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._plans_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # The plan cache (weak references, a lock, device tensors) is neither copied nor pickled.
        state = self.__dict__.copy()
        state.pop("_plans", None)
        state.pop("_plans_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_plan_cache()

    def is_available(self) -> bool:
        return True

    def unsupported_reason(self, site: AttentionSite, dtype: torch.dtype, device: torch.device) -> str | None:
        if dtype not in _SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported by the torch backend; supported: {_DTYPE_NAMES}"
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
        problem = _input_problem(q, k, v, tables, attn_mask)
        if problem is not None:
            raise UnsupportedError(f"torch backend: {problem} ({_describe(q, k, v, tables, attn_mask)})")
        batch, heads, q_len, _ = q.shape
        if q_len == 0:
            return q.new_zeros(batch, heads, 0, v.shape[-1])
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        chunk_bytes = self.chunk_bytes
        if chunk_bytes is None:
            chunk_bytes = CPU_CHUNK_BYTES if q.device.type == "cpu" else DEVICE_CHUNK_BYTES
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        plan = self._plan(tables, batch, k.shape[1], q.device, chunk_bytes, compute_dtype.itemsize)
        return _run(plan, q, k, v, attn_mask, float(scale), compute_dtype)

    def _plan(self, tables: BlockTables, batch: int, kv_heads: int, device: torch.device,
              chunk_bytes: int, itemsize: int) -> _Plan:
        """The cached plan for these tables (same tensor objects, unmodified) and call shape."""
        versions = tuple(_version(t) for t in (tables.kv_indices, tables.kv_counts, tables.kv_head_index))
        key = (tables.block_size, tables.q_len, tables.k_len, bool(tables.causal), batch, kv_heads,
               str(device), chunk_bytes, itemsize)
        with self._plans_lock:
            entry = self._plans.get(tables.kv_indices)
            if entry is not None and entry.matches(tables, versions):
                plan = entry.plans.get(key)
                if plan is not None:
                    entry.plans.move_to_end(key)
                    return plan
        plan = _build_plan(tables, batch, kv_heads, device, chunk_bytes, itemsize)
        with self._plans_lock:
            entry = self._plans.get(tables.kv_indices)
            if entry is None or not entry.matches(tables, versions):
                # New tables, or tables edited in place: their old plans are all stale.
                entry = _TablesPlans(weakref.ref(tables.kv_counts), weakref.ref(tables.kv_head_index),
                                     versions)
                self._plans[tables.kv_indices] = entry
            entry.plans[key] = plan
            while len(entry.plans) > _PLANS_PER_TABLES:
                entry.plans.popitem(last=False)
        return plan


# ----------------------------------------------------------------------------------------------
# Validation


def _describe(q, k, v, tables: BlockTables, attn_mask) -> str:
    text = (f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)}; tables: "
            f"heads={tables.num_heads}, q_len={tables.q_len}, k_len={tables.k_len}, "
            f"block_size={tables.block_size}, q_blocks={tables.q_blocks}")
    if attn_mask is not None:
        text += f"; attn_mask {tuple(attn_mask.shape)} {attn_mask.dtype}"
    return text


def _input_problem(q, k, v, tables: BlockTables, attn_mask) -> str | None:
    """What makes these inputs unservable, or ``None``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor [batch, heads, seq, head_dim]"
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported; supported: {_DTYPE_NAMES}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.device != q.device or v.device != q.device:
        return f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        return f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}"
    if q.shape[-1] != k.shape[-1]:
        return f"head_dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ"
    if k.shape[1] != v.shape[1]:
        return f"k has {k.shape[1]} heads but v has {v.shape[1]}"
    if k.shape[2] != v.shape[2]:
        return f"k has {k.shape[2]} positions but v has {v.shape[2]}"
    if tables.block_size <= 0:
        return f"block_size must be positive, got {tables.block_size}"
    if q.shape[1] != tables.num_heads:
        return f"q has {q.shape[1]} heads but the tables describe {tables.num_heads}"
    if q.shape[2] != tables.q_len:
        return f"q has {q.shape[2]} positions but the tables were built for q_len={tables.q_len}"
    if k.shape[2] != tables.k_len:
        return f"k has {k.shape[2]} positions but the tables were built for k_len={tables.k_len}"
    if k.shape[2] == 0 and q.shape[2] > 0:
        return "k has no positions"
    q_blocks = -(-tables.q_len // tables.block_size)
    if tables.kv_indices.dim() != 3 or tables.q_blocks != q_blocks:
        return (f"kv_indices {tuple(tables.kv_indices.shape)} must be [heads, {q_blocks} q_blocks, "
                f"max_kept] for q_len={tables.q_len} at block_size={tables.block_size}")
    if tuple(tables.kv_counts.shape) != tuple(tables.kv_indices.shape[:2]):
        return f"kv_counts {tuple(tables.kv_counts.shape)} must be [heads, q_blocks] like kv_indices"
    if tuple(tables.kv_head_index.shape) != (tables.num_heads,):
        return f"kv_head_index {tuple(tables.kv_head_index.shape)} must be [heads={tables.num_heads}]"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return f"attn_mask must be a tensor, got {type(attn_mask).__name__}"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}"
        if attn_mask.device != q.device:
            return f"attn_mask is on {attn_mask.device} but q is on {q.device}"
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if attn_mask.dim() > 4 or any(
            size not in (1, want) for size, want in zip(attn_mask.shape[::-1], target[::-1])
        ):
            return (f"attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                    f"[batch, heads, q_len, k_len] = {target}")
    return None


# ----------------------------------------------------------------------------------------------
# Plan: what each chunk gathers and masks, derived from the tables once and cached
#
# Masks are applied per kept block ("slot"), never as a chunk-wide element mask: padding slots
# are set to -inf, slots of the partial last key block get their tail columns set to -inf, and
# under ``causal`` only diagonal blocks (key block == query block, the only partial ones: blocks
# are aligned at position 0) get the upper triangle set to -inf. Earlier key blocks are fully
# visible and later ones were dropped when planning. Scores are viewed as
# ``[rows, slots, batch, block_q, block_k]`` so each of these is one indexed write.


@dataclasses.dataclass
class _Chunk:
    rows: torch.Tensor         # long [R]: row ids (head * q_blocks + q_block), on the device
    row0: int | None           # rows == range(row0, row0 + R): plain slices instead of gathers
    width: int                 # slots per row in this chunk
    kv_rows: torch.Tensor      # long [B * R * width]: flat K/V block ids, batch offsets included
    key_blocks: torch.Tensor   # long [R, width]: key block of each slot (padding repeats slot 0)
    heads: torch.Tensor        # long [R]: query head of each row
    q_blocks: torch.Tensor     # long [R]: query block of each row
    padding: tuple[torch.Tensor, torch.Tensor] | None    # (row, slot) of padding slots
    partial: tuple[torch.Tensor, torch.Tensor] | None    # (row, slot) of the partial last key block
    diagonal: int | tuple[torch.Tensor, torch.Tensor] | None   # causal diagonal slots: one slot
                               # index shared by every row, or (row, slot) pairs


@dataclasses.dataclass
class _Plan:
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    block: int
    q_blocks: int
    k_blocks: int
    chunks: list[_Chunk]
    all_rows_covered: bool     # False when some rows keep no visible block (their output is 0)


@dataclasses.dataclass
class _TablesPlans:
    """The plans of one tables object, held weakly by its ``kv_indices`` (which it must not
    reference): valid while the other two tensors are the same objects, all unmodified (an
    inference tensor keeps no version counter: editing one in place goes unnoticed)."""
    kv_counts: weakref.ref
    kv_head_index: weakref.ref
    versions: tuple
    plans: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

    def matches(self, tables: BlockTables, versions: tuple) -> bool:
        return (self.kv_counts() is tables.kv_counts and self.kv_head_index() is tables.kv_head_index
                and self.versions == versions)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:                    # inference tensors keep no version counter
        return None


def _build_plan(tables: BlockTables, batch: int, kv_heads: int, device: torch.device,
                chunk_bytes: int, itemsize: int) -> _Plan:
    bs, q_len, k_len = tables.block_size, tables.q_len, tables.k_len
    heads, q_blocks, max_kept = tables.kv_indices.shape
    k_blocks = -(-k_len // bs)
    indices = tables.kv_indices.detach().to("cpu", torch.int64)
    counts = tables.kv_counts.detach().to("cpu", torch.int64)
    kv_head = tables.kv_head_index.detach().to("cpu", torch.int64)

    if bool(((kv_head < 0) | (kv_head >= kv_heads)).any()):
        raise UnsupportedError(f"torch backend: kv_head_index {kv_head.tolist()} points outside the "
                               f"{kv_heads} key/value heads of k")
    if bool(((counts < 0) | (counts > max_kept)).any()):
        raise UnsupportedError(f"torch backend: kv_counts must lie in [0, max_kept={max_kept}]")
    valid = torch.arange(max_kept) < counts.unsqueeze(-1)
    if bool(((indices < 0) | (indices >= k_blocks))[valid].any()):
        raise UnsupportedError(f"torch backend: kv_indices point outside the {k_blocks} key blocks "
                               f"of k_len={k_len} at block_size={bs}")
    if tables.causal:
        # Key blocks after the query block hold no key any of its queries may see.
        valid &= indices <= torch.arange(q_blocks).view(1, q_blocks, 1)
    kept = valid.sum(-1).reshape(-1)                                   # [rows]
    width = int(kept.max()) if kept.numel() else 0
    # Compact each row: real slots first, in their original (ascending) order.
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    compact = indices.gather(-1, order).reshape(heads * q_blocks, width)

    live = torch.nonzero(kept > 0).flatten()
    best = None
    if live.numel():
        by_width = live[torch.sort(kept[live], descending=True, stable=True).indices]
        budget_slots = max(1, chunk_bytes // (batch * bs * bs * itemsize))
        for row_order in (live, by_width):
            spans = _chunk_spans(kept[row_order].tolist(), budget_slots)
            work = sum((end - start) * w for start, end, w in spans)
            # Regrouping rows by width costs a gather of Q and a scatter of the output.
            if best is None or work < 0.95 * best[0]:
                best = (work, row_order, spans)

    chunks = []
    if best is not None:
        _, row_order, spans = best
        batch_offset = (torch.arange(batch) * (kv_heads * k_blocks)).view(batch, 1)
        partial_block = k_blocks - 1 if k_len % bs else -1

        def pairs(where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            if not bool(where.any()):
                return None
            row, slot = where.nonzero(as_tuple=True)
            return row.to(device), slot.to(device)

        for start, end, w in spans:
            rows = row_order[start:end]
            slot_valid = torch.arange(w) < kept[rows].unsqueeze(-1)
            blocks = torch.where(slot_valid, compact[rows, :w], compact[rows, :1])
            row_heads, row_q_blocks = rows // q_blocks, rows % q_blocks
            kv_rows = (kv_head[row_heads].unsqueeze(-1) * k_blocks + blocks).view(1, -1) + batch_offset
            diagonal = None
            if tables.causal:
                on_diagonal = slot_valid & (blocks == row_q_blocks.unsqueeze(-1))
                slot_of_row = on_diagonal.int().argmax(-1)
                if bool(on_diagonal.any(-1).all()) and bool((slot_of_row == slot_of_row[0]).all()):
                    diagonal = int(slot_of_row[0])
                else:
                    diagonal = pairs(on_diagonal)
            row0 = int(rows[0])
            contiguous = bool(torch.equal(rows, torch.arange(row0, row0 + len(rows))))
            chunks.append(_Chunk(
                rows=rows.to(device),
                row0=row0 if contiguous else None,
                width=w,
                kv_rows=kv_rows.reshape(-1).to(device),
                key_blocks=blocks.to(device),
                heads=row_heads.to(device),
                q_blocks=row_q_blocks.to(device),
                padding=pairs(~slot_valid),
                partial=pairs(slot_valid & (blocks == partial_block)),
                diagonal=diagonal,
            ))
    return _Plan(heads=heads, kv_heads=kv_heads, q_len=q_len, k_len=k_len, block=bs,
                 q_blocks=q_blocks, k_blocks=k_blocks, chunks=chunks,
                 all_rows_covered=int(live.numel()) == heads * q_blocks)


def _chunk_spans(widths: list[int], budget_slots: int) -> list[tuple[int, int, int]]:
    """Greedy split of rows into ``(start, end, width)`` with ``rows * width <= budget_slots``.

    A chunk still takes up to ``_MIN_CHUNK_ROWS`` rows while that stays within four budgets:
    batched matmuls of very few rows parallelise badly.
    """
    spans = []
    start, width = 0, 0
    for i, w in enumerate(widths):
        new_width = max(width, w)
        rows = i - start + 1
        if rows > 1 and rows * new_width > budget_slots and (
            rows > _MIN_CHUNK_ROWS or rows * new_width > 4 * budget_slots
        ):
            spans.append((start, i, width))
            start, new_width = i, w
        width = new_width
    if widths:
        spans.append((start, len(widths), width))
    return spans


# ----------------------------------------------------------------------------------------------
# Execution


def _blocked(x: torch.Tensor, length: int, padded: int, dtype: torch.dtype,
             scale: float | None = None) -> torch.Tensor:
    """``x`` [B, H, length, D] (times ``scale``) as a contiguous ``dtype`` tensor zero-padded to
    ``padded`` positions; ``x`` itself when nothing needs to change."""
    x = x.to(dtype)
    if scale is not None:
        x = x * scale
    if padded != length:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))
    return x.contiguous()


def _tiled_mask(mask: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The user's mask as 6-D tiles ``[B|1, H|1, q_blocks|1, bs|1, k_blocks|1, bs|1]``.

    Expanded (stride-0) dimensions are cut back to size 1 first, so an ``expand()``-ed mask is
    never materialised; a mask whose lengths are not whole blocks is padded once (a copy of
    the mask as given, padding that only meets padded queries or masked keys).
    """
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    for dim in range(4):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    bs = plan.block
    pad_q = plan.q_blocks * bs - mask.shape[2] if mask.shape[2] > 1 else 0
    pad_k = plan.k_blocks * bs - mask.shape[3] if mask.shape[3] > 1 else 0
    if pad_q or pad_k:
        mask = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q), value=mask.dtype == torch.bool)
    q_tiles = (plan.q_blocks, bs) if mask.shape[2] > 1 else (1, 1)
    k_tiles = (plan.k_blocks, bs) if mask.shape[3] > 1 else (1, 1)
    return mask.unflatten(3, k_tiles).unflatten(2, q_tiles)


def _gather_mask(tiles: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """The mask tiles of this chunk's (row, slot) blocks: ``[B|1, R|1, W|1, bs|1, bs|1]``."""
    rows, width = len(chunk.rows), chunk.width
    zero = torch.zeros(1, 1, 1, dtype=torch.long, device=tiles.device)
    mb, mh, mq, _, mk, _ = tiles.shape
    b_idx = torch.arange(mb, device=tiles.device).view(mb, 1, 1) if mb > 1 else zero
    h_idx = chunk.heads.view(1, rows, 1) if mh > 1 else zero
    q_idx = chunk.q_blocks.view(1, rows, 1) if mq > 1 else zero
    k_idx = chunk.key_blocks.view(1, rows, width) if mk > 1 else zero
    return tiles[b_idx, h_idx, q_idx, :, k_idx, :]


def _mask_slots(scores: torch.Tensor, chunk: _Chunk, plan: _Plan, batch: int,
                upper_bias: torch.Tensor) -> None:
    """Set padding slots, keys past ``k_len`` and causal upper triangles of ``scores`` to -inf.

    ``upper_bias`` is ``[bs, bs]``: -inf above the diagonal, 0 elsewhere.
    """
    if chunk.padding is None and chunk.partial is None and chunk.diagonal is None:
        return
    bs, rows, width = plan.block, len(chunk.rows), chunk.width
    slots = scores.view(batch, rows, bs, width, bs).permute(1, 3, 0, 2, 4)   # [R, W, B, bs_q, bs_k]
    neg_inf = float("-inf")
    if chunk.padding is not None:
        slots[chunk.padding] = neg_inf
    if chunk.partial is not None:
        row, slot = chunk.partial
        slots[row, slot, :, :, plan.k_len - (plan.k_blocks - 1) * bs:] = neg_inf
    if chunk.diagonal is not None:
        if isinstance(chunk.diagonal, int):
            slots[:, chunk.diagonal].add_(upper_bias)
        else:
            slots.index_put_(chunk.diagonal, slots[chunk.diagonal].add_(upper_bias))


def _run(plan: _Plan, q, k, v, attn_mask, scale: float, dtype: torch.dtype) -> torch.Tensor:
    batch, heads, q_len, head_dim = q.shape
    value_dim = v.shape[-1]
    bs = plan.block
    q_pad, k_pad = plan.q_blocks * bs, plan.k_blocks * bs
    rows_total = heads * plan.q_blocks

    qs = _blocked(q, q_len, q_pad, dtype, scale).view(batch, rows_total, bs, head_dim)
    kb = _blocked(k, plan.k_len, k_pad, dtype).view(-1, bs, head_dim)
    vb = _blocked(v, plan.k_len, k_pad, dtype).view(-1, bs, value_dim)
    mask_tiles = _tiled_mask(attn_mask, plan) if attn_mask is not None else None
    make = torch.empty if plan.all_rows_covered else torch.zeros
    out = make(batch, rows_total, bs, value_dim, dtype=dtype, device=q.device)
    neg_inf = float("-inf")
    upper_bias = torch.full((bs, bs), neg_inf, dtype=dtype, device=q.device).triu_(1)

    for chunk in plan.chunks:
        rows, width = len(chunk.rows), chunk.width
        if chunk.row0 is not None:
            q_chunk = qs[:, chunk.row0:chunk.row0 + rows]
        else:
            q_chunk = qs.index_select(1, chunk.rows)
        q_chunk = q_chunk.reshape(batch * rows, bs, head_dim)
        k_chunk = kb.index_select(0, chunk.kv_rows).view(batch * rows, width * bs, head_dim)
        scores = torch.bmm(q_chunk, k_chunk.transpose(1, 2))              # [B*R, bs, W*bs]
        del k_chunk
        _mask_slots(scores, chunk, plan, batch, upper_bias)
        dead = None
        if mask_tiles is not None:
            gathered = _gather_mask(mask_tiles, chunk)                 # [B|1, R|1, W|1, bs|1, bs|1]
            tiles = scores.view(batch, rows, bs, width, bs).transpose(2, 3)
            if gathered.dtype == torch.bool:       # adding a bias is ~10x faster on CPU than
                gathered = torch.where(gathered, 0.0, neg_inf)   # masked_fill_ with broadcasting
            tiles.add_(gathered)
            dead = scores.amax(-1, keepdim=True) == neg_inf             # rows with no visible key
            if scores.device.type != "cpu" or bool(dead.any()):       # (no sync on accelerators)
                scores.masked_fill_(dead, 0.0)      # finite rows: no NaN in softmax or its gradient
        probs = torch.softmax(scores, dim=-1)
        del scores
        v_chunk = vb.index_select(0, chunk.kv_rows).view(batch * rows, width * bs, value_dim)
        o = torch.bmm(probs, v_chunk)                                   # [B*R, bs, Dv]
        if dead is not None:
            o.masked_fill_(dead, 0.0)
        o = o.view(batch, rows, bs, value_dim)
        if chunk.row0 is not None:
            out[:, chunk.row0:chunk.row0 + rows] = o
        else:
            out.index_copy_(1, chunk.rows, o)

    out = out.view(batch, heads, q_pad, value_dim)[:, :, :q_len]
    return out.to(q.dtype).contiguous()
