"""The `torch` backend: block-sparse attention in plain torch ops — the CPU path and the reference of every other backend.

Nothing of size ``q_len x k_len`` is ever built: query blocks are processed a chunk at a time,
and for each chunk the kept key/value blocks of every (head, query block) row are gathered into
a dense ``[rows, kept * block, head_dim]`` tensor, so one batched matmul computes the scores,
a softmax in fp32 normalises them and a second batched matmul applies them to the values.

`prepare` derives a plan from the `RuntimeBlockMask`, once:

* a mask shared by the batch (``mask.batch == 1``, built once per length) gets a *host plan*:
  rows of (head, query block) with no kept block get zeros, the other rows are cut into chunks
  (in mask order, or regrouped by width when that saves >5% work), each chunk knows its gather
  indices, its padding slots and its partial slots — each partial slot with an index into a few
  precomputed ``[block, block]`` bias tiles (keys past ``k_len``, the causal triangle at the
  mask's query offset). Full slots are never masked.
* a mask estimated per input (``mask.per_input`` or ``mask.batch > 1``) gets a *device plan*: no
  host work and no device-to-host read per call; every row of a chunk of query blocks takes all
  ``full_width + partial_width`` slots, and visibility (slot in use, key inside ``k_len``, causal)
  is computed on the device.

Per call: ``q * scale``, ``k`` and ``v`` are converted once to the compute dtype (fp32 for
fp32/fp16/bf16; fp64 stays fp64) and zero-padded to whole blocks; per chunk: gather, ``bmm``,
softcap, structural masks, the user's ``attn_mask`` gathered tile by tile (an additive bias),
softmax, ``bmm``, the sink correction, write back. Rows that see no key are set to zero.

Memory. Let ``S_c`` be one chunk's scores, ``batch * rows * block * (kept * block)`` elements of
the compute dtype. Chunks are cut so that ``S_c <= chunk_bytes`` (default 1 MiB on CPU, where a
chunk that stays in cache runs several times faster, and 64 MiB on other devices), except that
a chunk keeps at least 8 rows while ``S_c <= 4 * chunk_bytes`` (tiny batched matmuls
parallelise badly) and at least one row. The working set of a chunk is about
``S_c * (2 + 2 * head_dim / block)``, plus ``S_c`` when a mask varies along queries. An
``expand()``-ed mask is never materialised. Nothing is quadratic in the sequence length except
what the caller passes in. Autograd works through ``run`` (every op is differentiable).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sparsify.backends.base import Backend, BackendFeatures, BackendPlan, register_backend
from sparsify.errors import UnsupportedError
from sparsify.block_mask import RuntimeBlockMask

__all__ = ["TorchBackend", "TorchPlan", "CPU_CHUNK_BYTES", "DEVICE_CHUNK_BYTES"]

#: Scores bytes per chunk on CPU: a chunk that stays in L2 cache is several times faster than
#: one that does not (measured on a 2-core AMD EPYC: 1-4 MiB is the sweet spot).
CPU_CHUNK_BYTES = 1 << 20
#: Scores bytes per chunk on accelerators, where launches, not caches, are what costs.
DEVICE_CHUNK_BYTES = 64 << 20

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MIN_CHUNK_ROWS = 8
_NEG_INF = float("-inf")


@register_backend("torch")
class TorchBackend(Backend):
    """Block-gather sparse attention in plain torch ops; CPU and CUDA, fp32/fp16/bf16/fp64, differentiable.

    ``chunk_bytes`` caps the compute-dtype scores of one chunk of query blocks (default: 1 MiB on
    CPU, 64 MiB elsewhere); see the module docstring for the full memory bound.

    Example:
        >>> kept = torch.ones(2, 2, 2, dtype=torch.bool)
        >>> mask = RuntimeBlockMask.from_block_masks(kept, block_size=16, q_len=32, k_len=32, causal=False,
        ...                                          kv_head_index=torch.tensor([0, 0]))
        >>> q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
        >>> TorchBackend().attention(q, k, v, mask).shape
        torch.Size([1, 2, 32, 8])
    """

    features = BackendFeatures(devices=("cpu", "cuda"), dtypes=_SUPPORTED_DTYPES, max_head_dim=1 << 16,
                               training=True)
    auto_priority = 100  # the fallback: always there, rarely the fastest on a GPU

    def __init__(self, chunk_bytes: int | None = None) -> None:
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes

    def prepare(self, mask: RuntimeBlockMask, *, q_shape, k_shape, v_shape, dtype, device) -> "TorchPlan":
        device = torch.device(device)
        problem = _shape_problem(mask, q_shape, k_shape, v_shape, dtype)
        if problem is not None:
            raise UnsupportedError(f"torch backend: {problem} ({_describe(mask, q_shape, k_shape, v_shape, dtype)})")
        chunk_bytes = self.chunk_bytes
        if chunk_bytes is None:
            chunk_bytes = CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        mask = mask.to(device)
        batch, kv_heads = q_shape[0], k_shape[1]
        if mask.batch > 1 and mask.batch != batch:
            raise UnsupportedError(f"torch backend: the mask holds {mask.batch} batch elements, the call {batch}")
        common = dict(mask=mask, q_shape=tuple(q_shape), k_shape=tuple(k_shape), v_shape=tuple(v_shape), dtype=dtype,
                      device=device, compute_dtype=compute_dtype)
        if (mask.per_input or mask.batch > 1) and device.type == "cpu":
            # On the CPU a host read costs nothing: one compact host plan per batch element beats
            # fixed-width rows (which do the work of every key block).
            elements = [mask.batch_element(index) for index in range(mask.batch)]
            shapes = ((1, *q_shape[1:]), (1, *k_shape[1:]), (1, *v_shape[1:]))
            parts = [self.prepare(element, q_shape=shapes[0], k_shape=shapes[1], v_shape=shapes[2], dtype=dtype,
                                  device=device) for element in elements]
            return TorchPlan(**common, per_input=True, batch_plans=parts)
        if mask.per_input or mask.batch > 1:
            return TorchPlan(**common, chunks=_device_chunks(mask, batch, chunk_bytes, compute_dtype.itemsize),
                             per_input=True, bias_tiles=None, all_rows_covered=False)
        chunks, tiles, covered = _host_chunks(mask, batch, kv_heads, device, chunk_bytes, compute_dtype)
        return TorchPlan(**common, chunks=chunks, per_input=False, bias_tiles=tiles, all_rows_covered=covered)

    def run(self, plan: "TorchPlan", q, k, v, *, attn_mask=None, scale=None, softcap=None, sinks=None) -> torch.Tensor:
        plan.check_call(q, k, v, self.name)
        problem = _call_problem(q, k, v, attn_mask, sinks, plan.mask.num_heads)
        if problem is not None:
            raise UnsupportedError(f"torch backend: {problem}")
        batch, heads, q_len, _ = q.shape
        if q_len == 0:
            return q.new_zeros(batch, heads, 0, v.shape[-1])
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        if plan.batch_plans is not None:
            if batch != len(plan.batch_plans):
                raise UnsupportedError(f"torch backend: the mask holds {len(plan.batch_plans)} batch elements, "
                                       f"the call {batch}")
            outputs = []
            for index, part in enumerate(plan.batch_plans):
                element_mask = None
                if attn_mask is not None:
                    full = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
                    element_mask = full[index:index + 1] if full.shape[0] > 1 else full
                outputs.append(_run(part, q[index:index + 1], k[index:index + 1], v[index:index + 1], element_mask,
                                    float(scale), softcap, sinks))
            return torch.cat(outputs, 0)
        return _run(plan, q, k, v, attn_mask, float(scale), softcap, sinks)


@dataclasses.dataclass
class _Chunk:
    rows: torch.Tensor          # long [R]: row ids (head * q_blocks + q_block), on the device
    row0: int | None            # rows == range(row0, row0 + R): plain slices instead of gathers
    width: int                  # slots per row in this chunk
    kv_rows: torch.Tensor | None    # host plan: long [B * R * width] flat K/V block ids (batch offsets in)
    key_blocks: torch.Tensor    # host plan: long [R, width]; device plan: long [Bm, R, width]
    heads: torch.Tensor         # long [R]: query head of each row
    q_blocks: torch.Tensor      # long [R]: query block of each row
    padding: tuple[torch.Tensor, torch.Tensor] | None = None     # host plan: (row, slot) of unused slots
    partial: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # host: (row, slot, bias tile)
    may_have_dead_rows: bool = True     # some query of the chunk may see no key of its kept blocks
    valid: torch.Tensor | None = None   # device plan: bool [Bm, R, width] slot in use


@dataclasses.dataclass
class TorchPlan(BackendPlan):
    """The torch backend's plan: chunks of rows with their gather indices and masked slots."""

    compute_dtype: torch.dtype = torch.float32
    chunks: list = dataclasses.field(default_factory=list)
    per_input: bool = False
    bias_tiles: torch.Tensor | None = None      # [tiles, block, block] of 0 / -inf (host plan)
    all_rows_covered: bool = False              # every row keeps a visible block (outputs all written)
    batch_plans: list | None = None             # per batch element (per-input masks on the CPU)


# ----------------------------------------------------------------------------------------------
# Validation


def _describe(mask: RuntimeBlockMask, q_shape, k_shape, v_shape, dtype) -> str:
    return (f"q {tuple(q_shape)} {dtype}, k {tuple(k_shape)}, v {tuple(v_shape)}; mask: heads={mask.num_heads}, "
            f"batch={mask.batch}, q_len={mask.q_len}, k_len={mask.k_len}, block_size={mask.block_size}")


def _shape_problem(mask: RuntimeBlockMask, q_shape, k_shape, v_shape, dtype) -> str | None:
    """What makes a plan for these shapes impossible, or ``None``."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            return f"{name} must be a 4-D tensor [batch, heads, seq, head_dim]"
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported; supported: float32, float16, bfloat16, float64"
    if not (q_shape[0] == k_shape[0] == v_shape[0]):
        return f"batch sizes differ: q {q_shape[0]}, k {k_shape[0]}, v {v_shape[0]}"
    if q_shape[-1] != k_shape[-1]:
        return f"head_dim of q ({q_shape[-1]}) and k ({k_shape[-1]}) differ"
    if k_shape[1] != v_shape[1] or k_shape[2] != v_shape[2]:
        return f"k {tuple(k_shape)} and v {tuple(v_shape)} must share heads and positions"
    if q_shape[1] != mask.num_heads:
        return f"q has {q_shape[1]} heads but the mask describes {mask.num_heads}"
    if q_shape[2] != mask.q_len:
        return f"q has {q_shape[2]} positions but the mask was built for q_len={mask.q_len}"
    if k_shape[2] != mask.k_len:
        return f"k has {k_shape[2]} positions but the mask was built for k_len={mask.k_len}"
    if k_shape[2] == 0 and q_shape[2] > 0:
        return "k has no positions"
    kv_head = mask.kv_head_index
    if kv_head.numel() and (int(kv_head.min()) < 0 or int(kv_head.max()) >= k_shape[1]):
        return f"kv_head_index {kv_head.tolist()} points outside the {k_shape[1]} key/value heads of k"
    return None


def _call_problem(q, k, v, attn_mask, sinks, heads: int) -> str | None:
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.device != q.device or v.device != q.device:
        return f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
    if sinks is not None and tuple(sinks.shape) != (heads,):
        return f"sinks must be [{heads}] (one logit per head), got {tuple(sinks.shape)}"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return f"attn_mask must be a tensor, got {type(attn_mask).__name__}"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}"
        if attn_mask.device != q.device:
            return f"attn_mask is on {attn_mask.device} but q is on {q.device}"
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if attn_mask.dim() > 4 or any(size not in (1, want) for size, want in zip(attn_mask.shape[::-1], target[::-1])):
            return f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [batch, heads, q_len, k_len] = {target}"
    return None


# ----------------------------------------------------------------------------------------------
# Host plan: the mask's rows compacted and cut into chunks, with their masked slots


def _host_chunks(mask: RuntimeBlockMask, batch: int, kv_heads: int, device: torch.device, chunk_bytes: int,
                 compute_dtype: torch.dtype) -> tuple[list[_Chunk], torch.Tensor | None, bool]:
    bs, q_len, k_len = mask.block_size, mask.q_len, mask.k_len
    heads, q_blocks, k_blocks = mask.num_heads, mask.q_blocks, mask.k_blocks
    rows_total = heads * q_blocks
    full_counts = mask.full_kv_num_blocks[0].detach().to("cpu", torch.int64).reshape(rows_total)
    part_counts = mask.kv_num_blocks[0].detach().to("cpu", torch.int64).reshape(rows_total)
    full_idx = mask.full_kv_indices[0].detach().to("cpu", torch.int64).reshape(rows_total, -1)
    part_idx = mask.kv_indices[0].detach().to("cpu", torch.int64).reshape(rows_total, -1)
    kv_head = mask.kv_head_index.detach().to("cpu", torch.int64)
    # One list per row: full blocks first, then partial ones.
    indices = torch.cat([full_idx, part_idx], 1)
    in_use = torch.cat([torch.arange(full_idx.shape[1]) < full_counts.unsqueeze(1),
                        torch.arange(part_idx.shape[1]) < part_counts.unsqueeze(1)], 1)
    is_partial = torch.cat([torch.zeros_like(full_idx, dtype=torch.bool), torch.ones_like(part_idx, dtype=torch.bool)], 1)
    if bool(((indices < 0) | (indices >= k_blocks))[in_use].any()):
        raise UnsupportedError(f"torch backend: the mask's block indices point outside the {k_blocks} key blocks "
                               f"of k_len={k_len} at block_size={bs}")
    kept = full_counts + part_counts
    width = int(kept.max()) if kept.numel() else 0
    order = torch.sort((~in_use).to(torch.int8), dim=1, stable=True).indices[:, :max(width, 1)]
    compact = indices.gather(1, order)
    compact_partial = is_partial.gather(1, order)

    # Bias tiles of partial blocks, by (first query - first key, keys left in the block).
    row_q_block = torch.arange(rows_total) % q_blocks
    query_first = mask.q_offset + row_q_block.unsqueeze(1) * bs                  # [rows, 1]
    key_first = compact * bs                                                    # [rows, width]
    delta = (query_first - key_first).clamp(-bs, bs) if mask.causal else torch.zeros_like(key_first)
    tail = (k_len - key_first).clamp(0, bs)
    tile_keys = delta * (bs + 1) + tail                                         # unique per (delta, tail)
    slot_live = torch.arange(compact.shape[1]) < kept.unsqueeze(1)
    partial_slots = slot_live & compact_partial
    tiles = None
    tile_of_slot = torch.zeros_like(compact)
    if bool(partial_slots.any()):
        unique_keys, inverse = torch.unique(tile_keys[partial_slots], return_inverse=True)
        tile_of_slot[partial_slots] = inverse
        tile_delta = torch.div(unique_keys + bs * (bs + 1), bs + 1, rounding_mode="floor") - bs
        tile_tail = unique_keys - tile_delta * (bs + 1)
        column = torch.arange(bs).view(1, 1, bs)
        visible = column < tile_tail.view(-1, 1, 1)
        if mask.causal:
            visible = visible & (column <= torch.arange(bs).view(1, bs, 1) + tile_delta.view(-1, 1, 1))
        visible = visible.expand(-1, bs, bs)
        tiles = torch.where(visible, 0.0, _NEG_INF).to(compute_dtype)        # [T, bs, bs]
        # A query that sees nothing in its partial blocks and has no full block is dead there.
        tile_rows_alive = visible.any(-1)                                       # [T, bs]
    live = torch.nonzero(kept > 0).flatten()
    chunks: list[_Chunk] = []
    if not live.numel():
        return chunks, tiles.to(device) if tiles is not None else None, False
    by_width = live[torch.sort(kept[live], descending=True, stable=True).indices]
    budget_slots = max(1, chunk_bytes // (batch * bs * bs * compute_dtype.itemsize))
    best = None
    for row_order in (live, by_width):
        spans = _chunk_spans(kept[row_order].tolist(), budget_slots)
        work = sum((end - start) * w for start, end, w in spans)
        # Regrouping rows by width costs a gather of Q and a scatter of the output.
        if best is None or work < 0.95 * best[0]:
            best = (work, row_order, spans)
    _, row_order, spans = best
    batch_offset = (torch.arange(batch) * (kv_heads * k_blocks)).view(batch, 1)

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
        partial = None
        chunk_partial = slot_valid & compact_partial[rows, :w]
        dead_possible = False
        if bool(chunk_partial.any()):
            row, slot = chunk_partial.nonzero(as_tuple=True)
            partial = (row.to(device), slot.to(device), tile_of_slot[rows, :w][row, slot].to(device))
            has_full = (slot_valid & ~compact_partial[rows, :w]).any(-1)          # [R]
            alive = torch.zeros(len(rows), bs, dtype=torch.int32)
            alive.index_add_(0, row, tile_rows_alive[tile_of_slot[rows, :w][row, slot]].int())
            alive = (alive > 0) | has_full.unsqueeze(-1)
            # Query rows past q_len in the last query block do not count.
            valid_queries = (row_q_blocks.unsqueeze(-1) * bs + torch.arange(bs)) < q_len
            dead_possible = bool((~alive & valid_queries).any())
        row0 = int(rows[0])
        contiguous = bool(torch.equal(rows, torch.arange(row0, row0 + len(rows))))
        chunks.append(_Chunk(
            rows=rows.to(device), row0=row0 if contiguous else None, width=w,
            kv_rows=kv_rows.reshape(-1).to(device), key_blocks=blocks.to(device),
            heads=row_heads.to(device), q_blocks=row_q_blocks.to(device),
            padding=pairs(~slot_valid), partial=partial, may_have_dead_rows=dead_possible,
        ))
    covered = int(live.numel()) == rows_total
    return chunks, tiles.to(device) if tiles is not None else None, covered


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
# Device plan: fixed-width rows, visibility computed per call on the device


def _device_chunks(mask: RuntimeBlockMask, batch: int, chunk_bytes: int, itemsize: int) -> list[_Chunk]:
    heads, q_blocks, bs = mask.num_heads, mask.q_blocks, mask.block_size
    width = mask.full_width + mask.partial_width
    per_query_block = max(1, batch * heads * bs * width * bs * itemsize)
    step = max(1, chunk_bytes // per_query_block)
    device = mask.device
    indices = torch.cat([mask.full_kv_indices, mask.kv_indices], -1).long()          # [Bm, H, Qb, W]
    in_use = torch.cat([torch.arange(mask.full_width, device=device) < mask.full_kv_num_blocks.unsqueeze(-1),
                        torch.arange(mask.partial_width, device=device) < mask.kv_num_blocks.unsqueeze(-1)], -1)
    chunks = []
    for first in range(0, q_blocks, step):
        last = min(q_blocks, first + step)
        count = last - first
        rows = (torch.arange(heads, device=device).unsqueeze(1) * q_blocks
                + torch.arange(first, last, device=device).unsqueeze(0)).reshape(-1)
        chunks.append(_Chunk(
            rows=rows, row0=None, width=width, kv_rows=None,
            key_blocks=indices[:, :, first:last].reshape(mask.batch, heads * count, width),
            heads=rows // q_blocks, q_blocks=rows % q_blocks, valid=in_use[:, :, first:last].reshape(
                mask.batch, heads * count, width),
        ))
    return chunks


# ----------------------------------------------------------------------------------------------
# Execution


def _blocked(x: torch.Tensor, length: int, padded: int, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """``x`` [B, H, length, D] (times ``scale``) as a contiguous ``dtype`` tensor zero-padded to ``padded`` positions."""
    x = x.to(dtype)
    if scale is not None:
        x = x * scale
    if padded != length:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))
    return x.contiguous()


def _tiled_mask(mask: torch.Tensor, geometry) -> torch.Tensor:
    """The user's mask as 6-D tiles ``[B|1, H|1, q_blocks|1, bs|1, k_blocks|1, bs|1]``.

    ``geometry`` has ``block``, ``q_blocks`` and ``k_blocks``. Expanded (stride-0) dimensions
    are cut back to size 1 first, so an ``expand()``-ed mask is never materialised; a mask whose
    lengths are not whole blocks is padded once (padding only meets padded queries or keys).
    """
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    for dim in range(4):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    bs = geometry.block
    pad_q = geometry.q_blocks * bs - mask.shape[2] if mask.shape[2] > 1 else 0
    pad_k = geometry.k_blocks * bs - mask.shape[3] if mask.shape[3] > 1 else 0
    if pad_q or pad_k:
        mask = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q), value=mask.dtype == torch.bool)
    q_tiles = (geometry.q_blocks, bs) if mask.shape[2] > 1 else (1, 1)
    k_tiles = (geometry.k_blocks, bs) if mask.shape[3] > 1 else (1, 1)
    return mask.unflatten(3, k_tiles).unflatten(2, q_tiles)


def _gather_mask(tiles: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """The mask tiles of this chunk's (row, slot) blocks: ``[B|1, R|1, W|1, bs|1, bs|1]``."""
    rows, width = len(chunk.rows), chunk.width
    zero = torch.zeros(1, 1, 1, dtype=torch.long, device=tiles.device)
    mb, mh, mq, _, mk, _ = tiles.shape
    b_idx = torch.arange(mb, device=tiles.device).view(mb, 1, 1) if mb > 1 else zero
    h_idx = chunk.heads.view(1, rows, 1) if mh > 1 else zero
    q_idx = chunk.q_blocks.view(1, rows, 1) if mq > 1 else zero
    k_idx = chunk.key_blocks.view(-1, rows, width) if mk > 1 else zero
    return tiles[b_idx, h_idx, q_idx, :, k_idx, :]


class _Geometry:
    def __init__(self, block: int, q_blocks: int, k_blocks: int):
        self.block, self.q_blocks, self.k_blocks = block, q_blocks, k_blocks


def _run(plan: TorchPlan, q, k, v, attn_mask, scale: float, softcap, sinks) -> torch.Tensor:
    mask = plan.mask
    dtype = plan.compute_dtype
    batch, heads, q_len, head_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    bs, q_blocks, k_blocks = mask.block_size, mask.q_blocks, mask.k_blocks
    q_pad, k_pad = q_blocks * bs, k_blocks * bs
    rows_total = heads * q_blocks

    qs = _blocked(q, q_len, q_pad, dtype, scale).view(batch, rows_total, bs, head_dim)
    kb = _blocked(k, mask.k_len, k_pad, dtype).view(-1, bs, head_dim)
    vb = _blocked(v, mask.k_len, k_pad, dtype).view(-1, bs, value_dim)
    mask_tiles = _tiled_mask(attn_mask, _Geometry(bs, q_blocks, k_blocks)) if attn_mask is not None else None
    make = torch.empty if plan.all_rows_covered else torch.zeros
    out = make(batch, rows_total, bs, value_dim, dtype=dtype, device=q.device)
    sink_logits = sinks.to(device=q.device, dtype=dtype) if sinks is not None else None
    if plan.per_input:
        kv_head = mask.kv_head_index.to(q.device)
        column = torch.arange(bs, device=q.device)
        batch_offset = (torch.arange(batch, device=q.device) * (kv_heads * k_blocks)).view(batch, 1, 1)

    for chunk in plan.chunks:
        rows, width = len(chunk.rows), chunk.width
        if chunk.row0 is not None:
            q_chunk = qs[:, chunk.row0:chunk.row0 + rows]
        else:
            q_chunk = qs.index_select(1, chunk.rows)
        q_chunk = q_chunk.reshape(batch * rows, bs, head_dim)
        if plan.per_input:
            kv_rows = (kv_head[chunk.heads].view(1, rows, 1) * k_blocks + chunk.key_blocks + batch_offset).reshape(-1)
        else:
            kv_rows = chunk.kv_rows
        k_chunk = kb.index_select(0, kv_rows).view(batch * rows, width * bs, head_dim)
        scores = torch.bmm(q_chunk, k_chunk.transpose(1, 2))              # [B*R, bs, W*bs]
        del k_chunk
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        dead_possible = chunk.may_have_dead_rows
        if plan.per_input:
            # Slot in use, key inside k_len, causal at the mask's offset — on the device.
            keys = chunk.key_blocks.unsqueeze(-1) * bs + column                         # [Bm, R, W, bs]
            visible = (keys < mask.k_len) & chunk.valid.unsqueeze(-1)
            visible = visible.view(-1, rows, 1, width * bs)
            if mask.causal:
                queries = mask.q_offset + chunk.q_blocks.view(rows, 1) * bs + column      # [R, bs]
                visible = visible & (keys.view(-1, rows, 1, width * bs) <= queries.view(1, rows, bs, 1))
            scores = scores.view(batch, rows, bs, width * bs).masked_fill(~visible, _NEG_INF)
            scores = scores.view(batch * rows, bs, width * bs)
        else:
            _mask_slots(scores, chunk, plan, batch)
        if mask_tiles is not None:
            gathered = _gather_mask(mask_tiles, chunk)                 # [B|1, R|1, W|1, bs|1, bs|1]
            tiles = scores.view(batch, rows, bs, width, bs).transpose(2, 3)
            if gathered.dtype == torch.bool:       # adding a bias is ~10x faster on CPU than
                gathered = torch.where(gathered, 0.0, _NEG_INF)     # masked_fill_ with broadcasting
            tiles.add_(gathered)
            dead_possible = True
        dead = None
        if dead_possible:
            dead = scores.amax(-1, keepdim=True) == _NEG_INF             # queries with no visible key
            scores = scores.masked_fill(dead, 0.0)      # finite rows: no NaN in softmax or its gradient
        probs = torch.softmax(scores, dim=-1)
        v_chunk = vb.index_select(0, kv_rows).view(batch * rows, width * bs, value_dim)
        o = torch.bmm(probs, v_chunk)                                   # [B*R, bs, Dv]
        if sink_logits is not None:
            # softmax over [scores, sink] then dropping the sink: scale by sigmoid(lse - sink).
            lse = torch.logsumexp(scores, dim=-1).view(batch, rows, bs)
            o = o * torch.sigmoid(lse - sink_logits[chunk.heads].view(1, rows, 1)).reshape(batch * rows, bs, 1)
        if dead is not None:
            o = o.masked_fill(dead, 0.0)
        o = o.view(batch, rows, bs, value_dim)
        if chunk.row0 is not None:
            out[:, chunk.row0:chunk.row0 + rows] = o
        else:
            out.index_copy_(1, chunk.rows, o)
        del scores, probs

    out = out.view(batch, heads, q_pad, value_dim)[:, :, :q_len]
    return out.to(q.dtype).contiguous()


def _mask_slots(scores: torch.Tensor, chunk: _Chunk, plan: TorchPlan, batch: int) -> None:
    """Set unused slots of ``scores`` to -inf and add each partial slot's bias tile (host plan)."""
    if chunk.padding is None and chunk.partial is None:
        return
    bs, rows, width = plan.mask.block_size, len(chunk.rows), chunk.width
    slots = scores.view(batch, rows, bs, width, bs).permute(1, 3, 0, 2, 4)   # [R, W, B, bs_q, bs_k]
    if chunk.padding is not None:
        slots[chunk.padding] = _NEG_INF
    if chunk.partial is not None:
        row, slot, tile = chunk.partial
        slots.index_put_((row, slot), slots[row, slot] + plan.bias_tiles[tile].unsqueeze(1))
