"""Attention in plain torch ops that export to standard ONNX: what `sparsify.export` puts in the graph.

* `dense_attention_lowering`: ``MatMul → (mask) → Softmax → MatMul``, any opset.
* `attention_op_lowering`: ONNX's ``Attention`` (opset >= 23), which runtimes fuse; it goes
  through ``F.scaled_dot_product_attention``, which the exporter writes as that op.
* `BlockGatherAttention`: one `SparseAttention` site. Rows are (sparse head, query block)
  pairs; each row gathers its kept key/value blocks into ``W`` slots, then
  ``MatMul → bias → Softmax → MatMul`` runs over the slots only, so the work is proportional to
  the kept blocks. The slots come from one of three *block tables*:

  - ``"fixed"``: constants from the site's `RuntimeBlockMask` at the example length (rows
    grouped by width and cut into cache-sized chunks); the file serves that length only.
  - ``"any"``: computed in the graph from the run-time length — every head pattern lowers its
    kept blocks with `Pattern.traced_block_mask` (``Range``, comparisons, ``TopK``), the slot
    count is the widest row of that call — so one file serves every length.
  - ``"listed"``: constants for each of a declared list of lengths, picked in the graph by the
    run-time length (for patterns that only exist as tables, e.g. `block_top_k`).

Slot layout, shared by all three: the kept blocks that need no element mask, plus the partial
last key block (keys past ``k_len`` are hidden by a query-independent key bias), ascending; at
causal sites the last slot holds the row's diagonal block, whose causal triangle is one
``[block, W * block]`` bias shared by every row. With the export's query offset of 0 these are
all the partial blocks a runtime mask holds (the fixed tables check it). Padding slots are
hidden by the key bias.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from sparsify.errors import SparsifyError, UnsupportedError
from sparsify.patterns import DEFAULT_MAX_TRACED_LEN, Pattern, TracedBlockGrid
from sparsify.block_mask import RuntimeBlockMask, causal_boundary_blocks

__all__ = [
    "BlockGatherAttention",
    "LoweringRequest",
    "TracedBlockTables",
    "attention_op_lowering",
    "dense_attention_lowering",
    "ATTENTION_OPSET",
    "CHUNK_BYTES",
    "TABLE_MODES",
]

#: First ONNX opset with the standard ``Attention`` op.
ATTENTION_OPSET = 23
#: How a sparse site's block tables reach the graph (see the module docstring).
TABLE_MODES = ("fixed", "any", "listed")
#: Scores bytes (per batch item) of one chunk of rows of fixed tables. onnxruntime runs the
#: chunks' ops one after the other, so a chunk's gathered K/V and scores stay in cache from op
#: to op; at S=4096 and 12% density on one CPU thread this took the sparse model from 74 to 54 ms.
CHUNK_BYTES = 2 << 20
#: Row groups per site at most (fixed tables); splitting off a group costs a gather of its
#: queries and outputs.
MAX_ROW_GROUPS = 4
_GROUP_OVERHEAD = 0.03     # fraction of the site's work one more group must save...
_GROUP_OVERHEAD_SLOTS = 256  # ...and at least this many (row, key block) slots: small sites stay whole
_PADDING_COST = 0.15       # extra cost of a group whose rows differ in width (a bias Add over its scores)
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class LoweringRequest:
    """What the export asks of a site's lowering.

    Attributes:
        q_len, k_len: the lengths of the example call (the ``"fixed"`` tables' lengths).
        dtype: the dtype attention runs in.
        tables: ``"fixed"``, ``"any"`` or ``"listed"`` (see `TABLE_MODES`).
        listed: ``(q_len, k_len)`` pairs served by ``"listed"`` tables.
        max_len: the longest query or key length the graph must serve (``"any"``).
        attention_op: dense heads as ONNX ``Attention`` (the opset has it) instead of the
            ``MatMul``/``Softmax`` chain.

    Example:
        >>> LoweringRequest(128, 128, torch.float32, tables="any").tables
        'any'
    """

    q_len: int
    k_len: int
    dtype: torch.dtype = torch.float32
    tables: str = "fixed"
    listed: tuple[tuple[int, int], ...] = ()
    max_len: int = DEFAULT_MAX_TRACED_LEN
    attention_op: bool = False

    def __post_init__(self) -> None:
        if self.tables not in TABLE_MODES:
            raise ValueError(f"unknown block tables {self.tables!r}; known: {', '.join(TABLE_MODES)}")
        if self.tables == "listed" and not self.listed:
            raise ValueError("listed block tables need at least one (q_len, k_len) pair")


# ----------------------------------------------------------------------------------------------
# Dense attention


def dense_attention_lowering(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                             is_causal: bool, scale: float | None, softcap: float | None = None,
                             sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.sparsify.attention`` as ``MatMul → (mask) → Softmax → MatMul`` (exports to plain ONNX).

    ``softcap`` bends the scaled scores (``softcap * tanh(s / softcap)``) before the mask;
    ``sinks`` (one logit per head) join each row's softmax as a key without a value. A query
    that sees no key gives zeros, as ``F.scaled_dot_product_attention`` does.

    Example:
        >>> q = torch.randn(1, 2, 8, 4)
        >>> out = dense_attention_lowering(q, q, q, None, True, None)
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-6)
        True
    """
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = _default_scale(q)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        visible = causal if visible is None else visible & causal
    if visible is not None:
        scores = scores.masked_fill(~visible, _NEG_INF)
    if sinks is not None:
        column = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.matmul(torch.softmax(torch.cat([scores, column], -1), dim=-1)[..., :-1], v)
    output = torch.matmul(torch.softmax(scores, dim=-1), v)
    if visible is None:
        return output
    # A query that sees no key: softmax gave NaN; zeros instead.
    return torch.where(visible.any(-1, keepdim=True), output, 0.0)


def attention_op_lowering(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                          is_causal: bool, scale: float | None, softcap: float | None = None,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.sparsify.attention`` as ONNX's ``Attention`` op (export at opset >= 23).

    Written as ``F.scaled_dot_product_attention`` with the mask laid out as onnxruntime's kernel
    takes it (4-D, one row per query: it broadcasts batch and heads only), the causal triangle
    folded into a given mask and grouped key/value heads left to the op; the exporter writes it
    as one ``Attention`` node. ``softcap`` and ``sinks`` (which ``Attention`` does not take
    alongside a mask the way the canonical op defines them) use `dense_attention_lowering`.

    Example:
        >>> q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
        >>> torch.allclose(attention_op_lowering(q, k, k, None, True, None),
        ...                dense_attention_lowering(q, k, k, None, True, None), atol=1e-5)
        True
    """
    if softcap is not None or sinks is not None:
        return dense_attention_lowering(q, k, v, attn_mask, is_causal, scale, softcap, sinks)
    if attn_mask is not None:
        if attn_mask.dim() < 4:
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if is_causal:
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            attn_mask = attn_mask & causal if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~causal, _NEG_INF)
            is_causal = False
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        attn_mask = attn_mask.expand(attn_mask.shape[0], attn_mask.shape[1], q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


# ----------------------------------------------------------------------------------------------
# Block tables: which key block each slot of each (sparse head, query block) row reads


@dataclasses.dataclass
class _RowGroup:
    """Rows computed together in one ``MatMul → Softmax → MatMul``, each with ``width`` slots.

    Tensors are buffers of the lowering (fixed or listed tables, folded by the runtime) or
    computed in the graph (traced tables). ``rows`` is ``None`` when the group is every row in
    order; ``valid`` is ``None`` when every slot holds a kept block.
    """

    rows: torch.Tensor | None        # long [R]: row ids (sparse head * q_blocks + query block)
    heads: torch.Tensor              # long [R]: sparse-head index of each row
    query_blocks: torch.Tensor       # long [R]
    blocks: torch.Tensor             # long [R, W]: key block of each slot (a valid index for padding)
    valid: torch.Tensor | None       # bool [R, W]
    count: Any                       # R (an int, or a symbolic size)
    width: Any                       # W
    diagonal_last: bool              # causal: slot W - 1 holds the row's diagonal block when valid
    key_bias: bool                   # some slot is padding or holds keys past k_len


def _slot_tables(kept: torch.Tensor, boundary: torch.Tensor | None, width: Any):
    """Slots of kept-block masks ``bool [H, q_blocks, k_blocks]``: ``(blocks, valid)``, both ``[H, q_blocks, W]``.

    ``boundary`` (``bool``, broadcastable to ``kept``; ``None`` at non-causal sites) marks the
    kept blocks that cross the causal boundary, as the runtime mask classifies them
    (`RuntimeBlockMask.boundary_block_masks`, `causal_boundary_blocks`); at query offset 0 they
    are diagonal blocks. The other kept blocks fill the first ``width`` slots in ascending order
    (padding after them; ``width`` is at least the widest row); at causal sites one more, last
    slot holds the row's diagonal block (valid where the row keeps a boundary block).
    """
    q_blocks, k_blocks = kept.shape[-2], kept.shape[-1]
    key = torch.arange(k_blocks).unsqueeze(0)
    inside = kept if boundary is None else kept & ~boundary
    counts = inside.sum(-1)
    # Kept columns sort first (key = column), the others after (key = k_blocks + column).
    order = torch.where(inside, key, key + k_blocks).topk(width, dim=-1, largest=False, sorted=True).values
    valid = torch.arange(width) < counts.unsqueeze(-1)
    blocks = torch.where(valid, order, 0)
    if boundary is not None:
        crossing = (kept & boundary).any(-1, keepdim=True)
        heads = kept.shape[0]
        diagonal = torch.arange(q_blocks).unsqueeze(1).clamp(max=k_blocks - 1)
        blocks = torch.cat([blocks, diagonal.unsqueeze(0).expand(heads, q_blocks, 1)], -1)
        valid = torch.cat([valid, crossing], -1)
    return blocks, valid


class TracedBlockTables(torch.nn.Module):
    """The kept blocks of a site's sparse heads as tensor ops of the run-time lengths (any-length export).

    ``kept(q_len, k_len)`` is ``bool [heads, q_blocks, k_blocks]`` — what the site's
    `RuntimeBlockMask` holds at those lengths (``to_block_masks()``), each head's pattern
    lowered with `Pattern.traced_block_mask` (heads with equal patterns share one mask).
    Under ``torch.export`` the lengths are symbolic, so the exported graph computes the tables
    per call with ``Range``, comparisons and ``TopK``; the slot count is the widest row of the
    call (a data-dependent size, so no declared bound can be too small).

    Example:
        >>> from sparsify import patterns
        >>> tables = TracedBlockTables([patterns.sliding_window(32)], block_size=32, causal=False)
        >>> tables.kept(128, 128)[0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    """

    def __init__(self, head_patterns: Sequence[Pattern], *, block_size: int, causal: bool,
                 max_len: int = DEFAULT_MAX_TRACED_LEN):
        super().__init__()
        reasons = {str(p): p.fixed_length_reason() for p in head_patterns if p.fixed_length_reason() is not None}
        if reasons:
            raise UnsupportedError("patterns without an any-length lowering: "
                                   + "; ".join(f"{name}: {reason}" for name, reason in reasons.items()))
        unique: list[Pattern] = []
        for pattern in head_patterns:
            if pattern not in unique:
                unique.append(pattern)
        self.patterns = unique
        self.block_size, self.causal, self.max_len = block_size, causal, max_len
        index = [unique.index(p) for p in head_patterns]
        self.identity = index == list(range(len(unique)))
        self.register_buffer("pattern_of_head", torch.tensor(index, dtype=torch.long), persistent=False)

    @property
    def num_heads(self) -> int:
        return self.pattern_of_head.numel()

    def kept(self, q_len: Any, k_len: Any) -> torch.Tensor:
        """``bool [heads, q_blocks, k_blocks]``: the kept blocks at these lengths (ints or symbolic sizes)."""
        grid = TracedBlockGrid(q_len, k_len, self.block_size, self.causal, self.max_len)
        masks = torch.stack([pattern.traced_block_mask(grid) for pattern in self.patterns])
        # At causal sites the patterns drop the blocks `block_geometry` calls hidden, as the
        # runtime mask does (one classification, query offset 0).
        return masks if self.identity else masks.index_select(0, self.pattern_of_head)

    def forward(self, q_len: Any, k_len: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(blocks, valid)``, ``[heads * q_blocks, W]``: the slots of every row (see `_slot_tables`)."""
        kept = self.kept(q_len, k_len)
        q_blocks = kept.shape[-2]
        boundary = causal_boundary_blocks(q_len, k_len, self.block_size) if self.causal else None
        blocks, valid = _slot_tables(kept, boundary, self.width(q_len, k_len))
        rows, slots = kept.shape[0] * q_blocks, blocks.shape[-1]
        return blocks.reshape(rows, slots), valid.reshape(rows, slots)

    def width(self, q_len: Any, k_len: Any) -> Any:
        """Slots for the kept blocks of one row besides the diagonal: the patterns' `Pattern.traced_row_bound`.

        A bound from the patterns' parameters and the lengths, not the widest row of the data:
        a data-dependent slot count would make every later shape data-dependent, which the
        exporter cannot cut into Scan chunks.
        """
        grid = TracedBlockGrid(q_len, k_len, self.block_size, self.causal, self.max_len)
        width = self.patterns[0].traced_row_bound(grid)
        for pattern in self.patterns[1:]:
            width = torch.sym_max(width, pattern.traced_row_bound(grid))
        return width


def _mask_slots(mask: RuntimeBlockMask, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A `RuntimeBlockMask`'s kept blocks in the slot layout, from its own full/partial classification.

    Returns ``(kept, blocks, valid)``: the kept masks ``[H, q_blocks, k_blocks]`` and their
    slots ``[H, q_blocks, W]`` (`_slot_tables`). The slot layout masks two kinds of partial
    block: blocks crossing the causal boundary (`RuntimeBlockMask.boundary_block_masks`), with
    the diagonal triangle — so they must be diagonal blocks, as at query offset 0, which is
    what the export builds — and the last key block past ``k_len``, with the key bias.
    """
    if mask.batch != 1:
        raise UnsupportedError("the ONNX lowering takes masks shared by the batch (static patterns); this mask has "
                               f"a batch dimension of {mask.batch}")
    full = mask.full_block_masks()[0].cpu()
    partial = mask.partial_block_masks()[0].cpu()
    boundary = mask.boundary_block_masks()[0].cpu()
    q_blocks, k_blocks = full.shape[-2], full.shape[-1]
    off_diagonal = torch.arange(q_blocks).unsqueeze(1) != torch.arange(k_blocks).unsqueeze(0)
    tail = (torch.arange(k_blocks) == k_blocks - 1) & (k_len % mask.block_size != 0)
    if bool((boundary & off_diagonal).any()) or bool((partial & ~boundary & ~tail).any()):
        raise UnsupportedError(
            f"the runtime mask (q_len={q_len}, k_len={k_len}, q_offset={mask.q_offset}) has partial blocks that are "
            f"neither the causal diagonal nor the last key block; the ONNX lowering serves query offset 0 only")
    kept = full | partial
    inside = kept & ~boundary
    width = max(int(inside.sum(-1).max()), 1)
    blocks, valid = _slot_tables(kept, boundary if mask.causal else None, width)
    return kept, blocks, valid


def _group_rows(widths: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Split rows into at most `MAX_ROW_GROUPS` groups of similar width, minimising padded work.

    Rows sorted by width (widest first) are cut into contiguous segments by dynamic
    programming; a segment costs ``rows * widest`` (padded slots are computed and masked),
    plus `_PADDING_COST` when its widths differ, plus `_GROUP_OVERHEAD` of the total (at least
    `_GROUP_OVERHEAD_SLOTS`) per extra group. Each group's rows are returned in ascending order,
    with the group's width.
    """
    distinct = torch.unique(widths).flip(0).tolist()           # widest first
    count = [int((widths == w).sum()) for w in distinct]
    n = len(distinct)
    total = sum(count) * distinct[0]

    def cost(i: int, j: int) -> float:        # segment distinct[i..j], inclusive
        work = sum(count[i:j + 1]) * distinct[i]
        return work * (1 + _PADDING_COST * (i != j))

    best = {(0, 0): (0.0, [])}                # (distinct widths used, groups) -> (cost, cuts)
    for groups in range(1, MAX_ROW_GROUPS + 1):
        for end in range(1, n + 1):
            options = [(best[(start, groups - 1)][0] + cost(start, end - 1), best[(start, groups - 1)][1] + [end])
                       for start in range(0, end) if (start, groups - 1) in best]
            if options:
                best[(end, groups)] = min(options)
    overhead = max(_GROUP_OVERHEAD * total, _GROUP_OVERHEAD_SLOTS)
    choice = min((best[(n, g)][0] + overhead * (g - 1), best[(n, g)][1])
                 for g in range(1, MAX_ROW_GROUPS + 1) if (n, g) in best)
    groups, start = [], 0
    for end in choice[1]:
        members = torch.nonzero((widths <= distinct[start]) & (widths >= distinct[end - 1])).flatten()
        groups.append((members, distinct[start]))
        start = end
    return groups


# ----------------------------------------------------------------------------------------------
# One site


class BlockGatherAttention(torch.nn.Module):
    """One `SparseAttention` site in export-friendly torch ops (see the module docstring for the layout).

    Sparse heads gather their kept key/value blocks, compute ``[batch, rows, block, W * block]``
    scores, add the key bias (padding slots, keys past ``k_len``), the causal triangle of the
    diagonal slot and the user's mask gathered tile by tile, then softmax and a second matmul.
    Dense heads run `dense_attention_lowering` (or `attention_op_lowering`), skipped heads give
    zeros. Equal to ``SparseAttention.forward`` at the lengths its tables serve (rows whose keys
    are all masked give zeros, as the torch backend does).

    Example:
        >>> from sparsify import patterns
        >>> from sparsify.runtime.sparse_attention import SparseAttention
        >>> from sparsify.site import AttentionSite
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=16, q_len=128, k_len=128)
        >>> layer = SparseAttention(site, [patterns.dense(), patterns.sliding_window(32)], block_size=32)
        >>> lowered = BlockGatherAttention(layer, LoweringRequest(128, 128, tables="any"))
        >>> q = torch.randn(1, 2, 200, 16)                          # any length
        >>> torch.allclose(lowered(q, q, q, None, False, None), layer(q, q, q, None, False, None), atol=1e-5)
        True
    """

    def __init__(self, module: torch.nn.Module, request: LoweringRequest):
        super().__init__()
        site = module.site
        self.site_name = site.name
        self.request = request
        self.tables = request.tables
        self.block = module.block_size
        self.causal = site.causal
        self.num_heads, self.num_kv_heads = site.num_heads, site.num_kv_heads
        self.dense_lowering = attention_op_lowering if request.attention_op else dense_attention_lowering
        dense = module.dense_heads.detach().cpu().long()
        sparse = module.sparse_heads.detach().cpu().long()
        skipped = module.skipped_heads.detach().cpu().long()
        self.dense_count, self.sparse_count, self.skipped_count = dense.numel(), sparse.numel(), skipped.numel()
        self.all_sparse = bool(torch.equal(sparse, torch.arange(site.num_heads)))
        self.register_buffer("dense_heads", dense.clone(), persistent=False)
        self.register_buffer("dense_kv_heads", module.dense_kv_heads.detach().cpu().long().clone(), persistent=False)
        self.register_buffer("sparse_heads", sparse.clone(), persistent=False)
        kv_head = module.mask_source.kv_head_index.detach().cpu().long()
        self.register_buffer("sparse_kv_heads", kv_head.clone(), persistent=False)
        # Output heads come as [dense..., sparse..., skipped...]; this gathers them back into head order.
        order = torch.cat([dense, sparse, skipped])
        self.identity_order = bool(torch.equal(order, torch.arange(order.numel())))
        self.register_buffer("head_order", torch.argsort(order), persistent=False)
        self.groups: list[_RowGroup] = []
        self.traced: TracedBlockTables | None = None
        self.has_dead_rows = False
        self.identity_rows = True
        if not self.sparse_count:
            return
        if request.tables == "any":
            patterns = [module.head_patterns[int(h)] for h in sparse]
            self.traced = TracedBlockTables(patterns, block_size=self.block, causal=self.causal,
                                            max_len=request.max_len)
            width = self.traced(request.q_len, request.k_len)[0].shape[1]
        elif request.tables == "listed":
            self._init_listed(module, request.listed)
            width = self.listed_blocks.shape[-1]
        if request.tables != "fixed":
            # Rows per Scan chunk: about CHUNK_BYTES of scores at the example's width (a
            # constant, so the chunk count is a size of the graph and not of the tables' data).
            itemsize = torch.empty((), dtype=request.dtype).element_size()
            self.chunk_rows = max(1, CHUNK_BYTES // (width * self.block * self.block * itemsize))
        else:
            self._init_fixed(module.runtime_mask(request.q_len, request.k_len, torch.device("cpu")))

    # --- tables --------------------------------------------------------------------------------

    def _init_fixed(self, mask) -> None:
        """Constant row groups from the runtime mask at the example lengths (grouped by width, chunked)."""
        bs, q_len, k_len = self.block, self.request.q_len, self.request.k_len
        kept, blocks, valid = _mask_slots(mask, q_len, k_len)
        heads, q_blocks, slots = blocks.shape
        k_blocks = kept.shape[-1]
        rows_total = heads * q_blocks
        blocks, valid = blocks.reshape(rows_total, slots), valid.reshape(rows_total, slots)
        diagonal = valid[:, -1] if self.causal else None
        off_counts = valid[:, : slots - 1].sum(-1) if self.causal else valid.sum(-1)
        # Row widths: off-diagonal blocks first, then (causal) the diagonal slot.
        extra = 1 if self.causal else 0
        itemsize = torch.empty((), dtype=self.request.dtype).element_size()
        tail = k_len % bs != 0
        chunks = []
        for rows, width in _group_rows(off_counts.clamp(min=1) + extra):
            per_chunk = max(1, CHUNK_BYTES // (bs * width * bs * itemsize))
            chunks += [(rows[i:i + per_chunk], width) for i in range(0, len(rows), per_chunk)]
        row_head = torch.arange(rows_total) // q_blocks
        row_query_block = torch.arange(rows_total) % q_blocks
        for index, (rows, width) in enumerate(chunks):
            off = width - extra
            group_blocks = blocks[rows, :off]
            group_valid = valid[rows, :off]
            if self.causal:
                group_blocks = torch.cat([group_blocks, blocks[rows, -1:]], -1)
                group_valid = torch.cat([group_valid, diagonal[rows].unsqueeze(-1)], -1)
            all_valid = bool(group_valid.all())
            has_tail = tail and bool((group_valid & (group_blocks == k_blocks - 1)).any())
            all_rows = len(rows) == rows_total and bool(torch.equal(rows, torch.arange(rows_total)))
            buffers = {"rows": rows, "heads": row_head[rows], "query_blocks": row_query_block[rows],
                       "blocks": group_blocks, "valid": group_valid}
            for name, value in buffers.items():
                self.register_buffer(f"group{index}_{name}", value.contiguous(), persistent=False)
            self.groups.append(_RowGroup(
                rows=None if all_rows else getattr(self, f"group{index}_rows"),
                heads=getattr(self, f"group{index}_heads"), query_blocks=getattr(self, f"group{index}_query_blocks"),
                blocks=getattr(self, f"group{index}_blocks"),
                valid=None if all_valid else getattr(self, f"group{index}_valid"),
                count=len(rows), width=width, diagonal_last=self.causal, key_bias=not all_valid or has_tail))
        row_order = torch.cat([rows for rows, _ in chunks])
        self.identity_rows = bool(torch.equal(row_order, torch.arange(rows_total)))
        self.register_buffer("row_inverse", torch.argsort(row_order), persistent=False)
        # Rows that keep no visible block at all (a mask from elsewhere than patterns) give zeros.
        alive = kept.any(-1)
        self.has_dead_rows = not bool(alive.all())
        self.register_buffer("alive_rows", alive.repeat_interleave(bs, 1)[:, :q_len].unsqueeze(-1), persistent=False)

    def _init_listed(self, module, listed: Sequence[tuple[int, int]]) -> None:
        """Constant slots for each declared length, stacked; the graph picks the run-time length's."""
        tables = []
        for q_len, k_len in listed:
            _, blocks, valid = _mask_slots(module.runtime_mask(q_len, k_len, torch.device("cpu")), q_len, k_len)
            tables.append((blocks, valid))
        heads = tables[0][0].shape[0]
        q_blocks = max(blocks.shape[1] for blocks, _ in tables)
        width = max(blocks.shape[2] for blocks, _ in tables)
        extra = 1 if self.causal else 0
        stacked_blocks = torch.zeros(len(tables), heads, q_blocks, width, dtype=torch.long)
        stacked_valid = torch.zeros(len(tables), heads, q_blocks, width, dtype=torch.bool)
        for index, (blocks, valid) in enumerate(tables):
            rows, slots = blocks.shape[1], blocks.shape[2] - extra
            stacked_blocks[index, :, :rows, :slots] = blocks[..., :slots]
            stacked_valid[index, :, :rows, :slots] = valid[..., :slots]
            if self.causal:                     # the diagonal slot stays last
                stacked_blocks[index, :, :rows, -1] = blocks[..., -1]
                stacked_valid[index, :, :rows, -1] = valid[..., -1]
        self.listed = tuple((int(q), int(k)) for q, k in listed)
        self.register_buffer("listed_lengths", torch.tensor(self.listed, dtype=torch.long), persistent=False)
        self.register_buffer("listed_blocks", stacked_blocks, persistent=False)
        self.register_buffer("listed_valid", stacked_valid, persistent=False)

    def _row_groups(self, q_len: Any, k_len: Any) -> list[_RowGroup]:
        """The row groups of one call: fixed ones, or one group of every row built for these lengths."""
        if self.tables == "fixed":
            if (q_len, k_len) != (self.request.q_len, self.request.k_len):
                raise UnsupportedError(
                    f"site {self.site_name!r}: these block tables were built for q_len={self.request.q_len}, "
                    f"k_len={self.request.k_len}, got {q_len} x {k_len}")
            return self.groups
        if self.tables == "any":
            blocks, valid = self.traced(q_len, k_len)
        else:
            blocks, valid = self._listed_slots(q_len, k_len)
        heads, q_blocks = self.sparse_count, (q_len + self.block - 1) // self.block
        # Row r is (head r // q_blocks, query block r % q_blocks), written without division by a
        # symbolic size (the exporter has no remainder of a tensor by one).
        row_heads = torch.arange(heads).unsqueeze(1).expand(heads, q_blocks).reshape(-1)
        row_query_blocks = torch.arange(q_blocks).unsqueeze(0).expand(heads, q_blocks).reshape(-1)
        return [_RowGroup(rows=None, heads=row_heads, query_blocks=row_query_blocks, blocks=blocks, valid=valid,
                          count=blocks.shape[0], width=blocks.shape[1], diagonal_last=self.causal, key_bias=True)]

    def _listed_slots(self, q_len: Any, k_len: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(q_len, int) and isinstance(k_len, int) and (q_len, k_len) not in self.listed:
            raise UnsupportedError(
                f"site {self.site_name!r}: its block tables were exported for the lengths "
                f"{', '.join(f'{q}x{k}' for q, k in self.listed)} (q x k), got {q_len}x{k_len}")
        match = (self.listed_lengths[:, 0] == q_len) & (self.listed_lengths[:, 1] == k_len)
        # An undeclared length picks index len(listed): the runtime's Gather fails instead of
        # computing with another length's tables.
        index = match.to(torch.int64).argmax() + (1 - match.any().to(torch.int64)) * len(self.listed)
        q_blocks = (q_len + self.block - 1) // self.block
        blocks = self.listed_blocks.index_select(0, index.reshape(1))[0, :, :q_blocks]
        valid = self.listed_valid.index_select(0, index.reshape(1))[0, :, :q_blocks]
        rows, slots = blocks.shape[0] * q_blocks, blocks.shape[-1]
        return blocks.reshape(rows, slots), valid.reshape(rows, slots)

    # --- forward -------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        if self.tables == "fixed":
            groups = ", ".join(f"{g.count}x{g.width}" for g in self.groups) or "-"
            tables = f"q_len={self.request.q_len}, k_len={self.request.k_len}, row groups (rows x slots)=[{groups}]"
        elif self.tables == "listed":
            tables = f"lengths={', '.join(f'{q}x{k}' for q, k in self.listed)}"
        else:
            tables = f"any length up to {self.request.max_len}"
        return (f"site={self.site_name!r}, block={self.block}, tables={self.tables!r}, {tables}, "
                f"heads: dense {self.dense_count}, sparse {self.sparse_count}, skipped {self.skipped_count}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, scale: float | None, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        if not self.sparse_count and not self.skipped_count:
            return self.dense_lowering(q, k, v, attn_mask, is_causal, scale, softcap, sinks)
        if is_causal and not self.causal:
            raise UnsupportedError(f"site {self.site_name!r} was compiled as non-causal but is called with "
                                   f"is_causal=True")
        if attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        outputs = []
        if self.dense_count:
            dense_mask = attn_mask
            if attn_mask is not None and attn_mask.shape[1] > 1:
                dense_mask = attn_mask.index_select(1, self.dense_heads)
            outputs.append(self.dense_lowering(
                q.index_select(1, self.dense_heads), k.index_select(1, self.dense_kv_heads),
                v.index_select(1, self.dense_kv_heads), dense_mask, is_causal, scale, softcap,
                sinks.index_select(0, self.dense_heads) if sinks is not None else None))
        if self.sparse_count:
            outputs.append(self._sparse(q, k, v, attn_mask, scale, softcap, sinks))
        if self.skipped_count:  # a skipped head contributes zeros
            outputs.append(torch.zeros((q.shape[0], self.skipped_count, q.shape[2], v.shape[-1]), dtype=q.dtype,
                                       device=q.device))
        output = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if not self.identity_order:
            output = output.index_select(1, self.head_order)
        return output

    def _sparse(self, q, k, v, attn_mask, scale, softcap, sinks) -> torch.Tensor:
        heads, bs = self.sparse_count, self.block
        q_len, k_len = q.shape[2], k.shape[2]
        q_blocks, k_blocks = (q_len + bs - 1) // bs, (k_len + bs - 1) // bs
        head_dim, value_dim = q.shape[-1], v.shape[-1]
        if scale is None:
            scale = _default_scale(q)
        if self.tables != "fixed":
            return self._sparse_computed(q, k, v, attn_mask, scale, softcap, sinks)
        groups = self._row_groups(q_len, k_len)
        qs = q if self.all_sparse else q.index_select(1, self.sparse_heads)
        qs = _pad_to_blocks(qs, q_len, q_blocks * bs).reshape(-1, heads * q_blocks, bs, head_dim)
        kb = _pad_to_blocks(k, k_len, k_blocks * bs).reshape(-1, self.num_kv_heads * k_blocks, bs, head_dim)
        vb = _pad_to_blocks(v, k_len, k_blocks * bs).reshape(-1, self.num_kv_heads * k_blocks, bs, value_dim)
        mask = self._prepare_mask(attn_mask, q.dtype, q_len, k_len) if attn_mask is not None else None
        sink_logits = sinks.index_select(0, self.sparse_heads).to(q.dtype) if sinks is not None else None
        outputs = [self._attend(group, qs, kb, vb, mask, k_len, k_blocks, scale, softcap, sink_logits)
                   for group in groups]
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if not self.identity_rows:
            out = out.index_select(1, self.row_inverse)
        out = out.reshape(-1, heads, q_blocks * bs, value_dim)[:, :, :q_len]
        if self.has_dead_rows:
            out = torch.where(self.alive_rows, out, 0.0)
        return out

    def _attend(self, group: _RowGroup, qs, kb, vb, mask, k_len, k_blocks, scale, softcap, sinks) -> torch.Tensor:
        """Attention of one row group: ``[B, rows, block, Dv]``.

        Per-row inputs (gather indices, key bias, mask indices, sink logits) are computed for the
        whole group; fixed groups are cache-sized already, the one group of computed tables is
        cut into cache-sized chunks by an ONNX ``Scan`` (`_attend_in_chunks`).
        """
        bs = self.block
        kv = self.sparse_kv_heads.index_select(0, group.heads).unsqueeze(-1) * k_blocks + group.blocks   # [R, W]
        dtype = qs.dtype
        inputs = {"kv": kv}
        if group.key_bias:
            inputs["key_bias"] = self._key_bias(group, k_len, dtype)                          # [R, 1, W*bs]
        if mask is not None and self._mask_index(mask, group) is not None:
            inputs["mask_index"] = self._mask_index(mask, group)
        if sinks is not None:
            inputs["sinks"] = sinks.index_select(0, group.heads)                               # [R]
        triangle = _causal_triangle(bs, dtype) if group.diagonal_last else None
        q_rows = qs if group.rows is None else qs.index_select(1, group.rows)
        attend = _RowAttention(bs, scale, softcap, mask is not None and mask[1:4], sinks is not None)
        return attend(q_rows, inputs, kb, vb, triangle, mask[0] if mask is not None else None)

    def _sparse_computed(self, q, k, v, attn_mask, scale, softcap, sinks) -> torch.Tensor:
        """The sparse heads with block tables computed for this call (``"any"`` / ``"listed"``).

        Rows are (batch element, sparse head, query block) triples, run as chunks of
        `chunk_rows` rows in an ONNX ``Scan`` so that each chunk's gathered blocks, scores and
        probabilities stay in cache. Query rows are contiguous blocks of the padded queries, so
        the Scan slices them (no gather); a chunk gathers its key and value blocks (keys and
        values padded once to whole blocks: a gather per block, not per token, keeps the gathers
        cheap) and adds the key bias (padding slots, keys past ``k_len``). Rows whose slots need no
        bias cannot be split off as fixed tables are: that needs a Scan over a data-dependent
        number of chunks, which torch 2.13's exporter cannot decompose; the bias add costs about
        one pass over the scores. (Hiding those keys inside the MatMul instead — an extra key
        column of ``0``/``-inf`` against a column of ones — measured slower on onnxruntime's CPU
        provider: the extra copies of q, k and v cost more than the add.)
        """
        heads, bs = self.sparse_count, self.block
        batch, q_len, k_len = q.shape[0], q.shape[2], k.shape[2]
        q_blocks, k_blocks = (q_len + bs - 1) // bs, (k_len + bs - 1) // bs
        value_dim = v.shape[-1]
        (group,) = self._row_groups(q_len, k_len)
        dtype = q.dtype
        qs = q if self.all_sparse else q.index_select(1, self.sparse_heads)
        kp = _pad_to_blocks(k, k_len, k_blocks * bs)
        vp = _pad_to_blocks(v, k_len, k_blocks * bs)
        head_dim = qs.shape[-1]
        rows = group.count                                      # per batch element
        total = batch * rows
        chunks = (total + self.chunk_rows - 1) // self.chunk_rows
        # Batch folded into the rows: queries as [chunks * chunk_rows, bs, D] (row order b, h,
        # query block: the tables' order), gathered in one copy that also pads each (b, h) to
        # whole blocks and the rows to whole chunks (a padded query repeats the last token of
        # its head, a padded row reads token 0; their outputs are dropped); keys and values as
        # [1, B * kv_heads * k_blocks, bs, D].
        row_token = (torch.arange(q_blocks * bs).clamp(max=q_len - 1).unsqueeze(0)
                     + (torch.arange(batch * heads) * q_len).unsqueeze(1)).reshape(-1)
        row_token = _pad_to_blocks(row_token, total * bs, chunks * self.chunk_rows * bs, dim=0)
        q_rows = qs.reshape(batch * heads * q_len, head_dim).index_select(0, row_token)
        q_rows = q_rows.reshape(chunks * self.chunk_rows, bs, head_dim)
        kv_blocks = self.num_kv_heads * k_blocks
        kb = kp.reshape(1, batch * kv_blocks, bs, head_dim)
        vb = vp.reshape(1, batch * kv_blocks, bs, value_dim)
        batch_index = torch.arange(batch).unsqueeze(1)

        def per_row(tensor: torch.Tensor, stride: Any = 0) -> torch.Tensor:
            """A per-row tensor of one batch element, for every row (``+ b * stride`` for element b)."""
            tensor = tensor.unsqueeze(0)
            if stride:
                tensor = tensor + (batch_index * stride).reshape(batch, *([1] * (tensor.dim() - 1)))
            return tensor.expand(batch, *tensor.shape[1:]).reshape(total, *tensor.shape[2:])

        kv_local = self.sparse_kv_heads.index_select(0, group.heads).unsqueeze(-1) * k_blocks + group.blocks
        inputs = {"kv": per_row(kv_local, kv_blocks)}
        mask = self._prepare_mask(attn_mask, dtype, q_len, k_len) if attn_mask is not None else None
        user_mask = None
        if mask is not None:
            tiles = mask[0]
            index = self._mask_index(mask, group)
            per_batch = bool(tiles.shape[0] > 1)
            user_mask = tiles.reshape(1, -1, *tiles.shape[2:]) if per_batch else tiles
            if index is not None or per_batch:
                if index is None:
                    index = torch.zeros(rows, dtype=torch.long)
                inputs["mask_index"] = per_row(index, tiles.shape[1] if per_batch else 0)
        if sinks is not None:
            sink_rows = sinks.index_select(0, self.sparse_heads).to(dtype).index_select(0, group.heads)
            inputs["sinks"] = per_row(sink_rows)
        triangle = _causal_triangle(bs, dtype) if group.diagonal_last else None
        layout = mask[1:4] if mask is not None else None
        inputs["key_bias"] = per_row(self._key_bias(group, k_len, dtype))                      # [B*R, 1, W*bs]
        attend = _RowAttention(bs, scale, softcap, layout, sinks is not None)
        out = _attend_in_chunks(attend, inputs, kb, vb, triangle, user_mask, self.chunk_rows, {"q_rows": q_rows})
        out = out.reshape(-1, value_dim)                  # [chunks * C * bs, Dv] (the batch dim is 1)
        # Row (b, h, query block) holds tokens row * bs + t; token s of (b, h) is in row
        # (b * heads + h) * q_blocks + s // bs: at (b * heads + h) * q_blocks * bs + s. One gather
        # drops the padded queries and rows.
        tokens = (torch.arange(batch * heads) * (q_blocks * bs)).unsqueeze(1) + torch.arange(q_len)
        return out.index_select(0, tokens.reshape(-1)).reshape(batch, heads, q_len, value_dim)

    def _key_bias(self, group: _RowGroup, k_len: Any, dtype: torch.dtype) -> torch.Tensor:
        """``-inf`` on padding slots and keys past ``k_len``, else 0: ``[rows, 1, W * bs]`` (query-independent)."""
        bs = self.block
        keys = group.blocks.unsqueeze(-1) * bs + torch.arange(bs)                 # [rows, W, bs]
        visible = keys < k_len
        if group.valid is not None:
            visible = visible & group.valid.unsqueeze(-1)
        return torch.where(visible, 0.0, _NEG_INF).to(dtype).reshape(group.count, 1, group.width * bs)

    def _mask_index(self, prepared, group: _RowGroup) -> torch.Tensor | None:
        """Where the user's (tiled) mask is read for each row (``[R]``) or slot (``[R, W]``); ``None``: everywhere alike."""
        _, per_head, along_q, along_k, q_blocks, k_blocks = prepared
        head = group.heads.unsqueeze(-1) if per_head else 0
        if along_q and along_k:
            return (head * q_blocks + group.query_blocks.unsqueeze(-1)) * k_blocks + group.blocks
        if along_k:
            return head * k_blocks + group.blocks
        if along_q:
            return group.heads * q_blocks + group.query_blocks if per_head else group.query_blocks
        return group.heads if per_head else None

    def _prepare_mask(self, mask: torch.Tensor, dtype: torch.dtype, q_len: Any, k_len: Any):
        """The user's mask as an additive bias, padded to whole blocks and tiled, and how it varies."""
        bs = self.block
        q_blocks, k_blocks = (q_len + bs - 1) // bs, (k_len + bs - 1) // bs
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, _NEG_INF).to(dtype)
        else:
            mask = mask.to(dtype)
        # Layout flags as plain bools (a symbolic size > 1 is decided once, here).
        per_head = bool(mask.shape[1] > 1)
        if per_head and not self.all_sparse:
            mask = mask.index_select(1, self.sparse_heads)
        mask_heads = self.sparse_count if per_head else 1
        along_q, along_k = bool(mask.shape[2] > 1), bool(mask.shape[3] > 1)
        if along_q:
            mask = _pad_to_blocks(mask, q_len, q_blocks * bs, dim=2)
        if along_k:
            mask = _pad_to_blocks(mask, k_len, k_blocks * bs, dim=3)
        if along_q and along_k:       # tiles [B, heads * q_blocks * k_blocks, bs, bs]
            mask = mask.reshape(-1, mask_heads, q_blocks, bs, k_blocks, bs).transpose(3, 4)
            mask = mask.reshape(-1, mask_heads * q_blocks * k_blocks, bs, bs)
        elif along_k:                 # key blocks [B, heads * k_blocks, bs]
            mask = mask.reshape(-1, mask_heads * k_blocks, bs)
        elif along_q:                 # query blocks [B, heads * q_blocks, bs, 1]
            mask = mask.reshape(-1, mask_heads * q_blocks, bs, 1)
        else:                         # [B, heads, 1, 1]
            mask = mask.reshape(-1, mask_heads, 1, 1)
        return mask, per_head, along_q, along_k, q_blocks, k_blocks

class _RowAttention:
    """Attention of a run of rows from per-row inputs: the body shared by fixed groups and `Scan` chunks.

    ``inputs``: ``kv`` ``[R, W]`` (flat key/value block of each slot), optionally ``key_bias``
    ``[R, 1, W * bs]``, ``mask_index`` (``[R]`` or ``[R, W]``, where the tiled user mask is read)
    and ``sinks`` ``[R]``. Returns ``[B, R, bs, Dv]``.
    """

    def __init__(self, block: int, scale: float, softcap: float | None, mask_layout, sinks: bool):
        self.block, self.scale, self.softcap, self.sinks = block, scale, softcap, sinks
        self.mask_layout = mask_layout or None            # (per_head, along_q, along_k) of the user's mask

    def __call__(self, q_rows, inputs: dict, kb, vb, triangle, mask) -> torch.Tensor:
        bs = self.block
        kv = inputs["kv"]
        if q_rows is None:                   # a Scan chunk: its query rows are a per-row input, [R, bs, D]
            q_rows = inputs["q_rows"].unsqueeze(0)
        rows, width = kv.shape[0], kv.shape[1]
        slots = width * bs                                                         # keys per row
        head_dim, value_dim = q_rows.shape[-1], vb.shape[-1]
        flat = kv.reshape(-1)
        # Explicit sizes, no -1: inside an exported Scan the slot count is a data-dependent size.
        keys = kb.index_select(1, flat).reshape(kb.shape[0], rows, slots, head_dim)
        # The scale right before the MatMul: onnxruntime folds it in (FusedMatMul alpha).
        scores = torch.matmul(q_rows * self.scale, keys.transpose(-2, -1))          # [B, R, bs, W*bs]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if "key_bias" in inputs:
            scores = scores + inputs["key_bias"]
        if triangle is not None:           # the causal triangle on the last (diagonal) slot
            scores = scores + torch.cat([triangle.new_zeros(bs, slots - bs), triangle], -1)
        dead = None
        if mask is not None:
            scores = scores + self._mask_tiles(mask, inputs.get("mask_index"), rows, width)
            if not self.sinks:
                # Rows the user's mask leaves without a visible key give zeros (torch backend
                # semantics); their softmax is NaN, which the Where below drops.
                dead = scores.amax(-1, keepdim=True) == _NEG_INF
        values = vb.index_select(1, flat).reshape(vb.shape[0], rows, slots, value_dim)
        if self.sinks:
            # The sink joins each row's softmax as a key without a value (all mass on it: zeros).
            column = inputs["sinks"].reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values)                                          # [B, R, bs, Dv]
        if dead is not None:
            out = torch.where(dead, 0.0, out)
        return out

    def _mask_tiles(self, mask, index, rows, width) -> torch.Tensor:
        """The user's mask for these rows and slots, broadcastable to ``[B, R, bs, W*bs]``."""
        per_head, along_q, along_k = self.mask_layout[:3]
        bs = self.block
        if along_q and along_k:
            tiles = mask.index_select(1, index.reshape(-1)).reshape(mask.shape[0], rows, width, bs, bs)
            return tiles.transpose(2, 3).reshape(mask.shape[0], rows, bs, width * bs)
        if along_k:
            return mask.index_select(1, index.reshape(-1)).reshape(mask.shape[0], rows, 1, width * bs)
        if index is not None:
            return mask.index_select(1, index.reshape(-1))
        return mask


def _attend_in_chunks(attend: _RowAttention, inputs: dict, kb, vb, triangle, mask, per_chunk: int,
                      padded_inputs: dict) -> torch.Tensor:
    """`_RowAttention` over chunks of ``per_chunk`` rows: ``[chunks, 1, per_chunk, bs, Dv]``.

    ``inputs`` are per-row tensors (``[rows, ...]``); ``padded_inputs`` per-row tensors already
    padded to whole chunks (the query rows, ``q_rows``).

    Exported as one ONNX ``Scan``: onnxruntime runs its body chunk after chunk, so each chunk's
    gathered blocks, scores and probabilities stay in cache from op to op. The per-row inputs
    are padded to whole chunks (padded rows read row and block 0 and are dropped by the
    caller). Eager calls run the same chunks in a Python loop.
    """
    rows = inputs["kv"].shape[0]
    chunks = (rows + per_chunk - 1) // per_chunk
    padded = chunks * per_chunk

    def split(tensor: torch.Tensor) -> torch.Tensor:
        tensor = _pad_to_blocks(tensor, rows, padded, dim=0)
        return tensor.reshape(chunks, per_chunk, *tensor.shape[1:])     # [chunks, per_chunk, ...]

    names = list(inputs) + list(padded_inputs)
    xs = [split(inputs[name]) for name in inputs]
    xs += [tensor.reshape(chunks, per_chunk, *tensor.shape[1:]) for tensor in padded_inputs.values()]

    def body(carry, chunk):
        # Queries, keys, values, triangle and mask are read by every chunk: the exporter lifts
        # them into the Scan body's outer scope (no copy per chunk).
        return carry.clone(), attend(None, dict(zip(names, chunk)), kb, vb, triangle, mask)

    if torch.compiler.is_exporting():
        from torch._higher_order_ops.scan import scan

        _, out = scan(body, torch.zeros(()), xs)
    else:                       # eager (tests, the export's checks): the same chunks, one by one
        out = torch.stack([attend(None, {name: x[index] for name, x in zip(names, xs)}, kb, vb, triangle, mask)
                           for index in range(chunks)])
    return out                                                        # [chunks, B, per_chunk, bs, Dv]


def _default_scale(q: torch.Tensor) -> float:
    """``1 / sqrt(head_dim)``; a symbolic head size is made static (the scale must be a constant of the graph)."""
    return 1.0 / math.sqrt(int(q.shape[-1]))


def _pad_to_blocks(tensor: torch.Tensor, length: Any, padded: Any, dim: int = 2) -> torch.Tensor:
    """Zero-pad ``dim`` from ``length`` to ``padded``; always a pad when the lengths are symbolic (no guard).

    Written as a ``Concat`` with zeros: onnxruntime's ``Pad`` copies several times slower (41 ms
    against a few for q, k and v of 8 x 4096 x 64 on one CPU thread).
    """
    if isinstance(length, int) and isinstance(padded, int) and length == padded:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = padded - length
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)


def _causal_triangle(block: int, dtype: torch.dtype) -> torch.Tensor:
    """``[block, block]``: ``-inf`` above the diagonal (keys after the query), else 0."""
    hidden = torch.ones(block, block, dtype=torch.bool).triu(1)
    return torch.where(hidden, _NEG_INF, 0.0).to(dtype)


def check_traced_tables(module: torch.nn.Module, tables: TracedBlockTables, lengths: Sequence[tuple[int, int]]) -> None:
    """Raise `SparsifyError` unless ``tables`` keeps the blocks of ``module``'s runtime masks at every ``(q_len, k_len)``.

    What an any-length export checks before writing a file: each head pattern's
    `Pattern.traced_block_mask` against the runtime's `RuntimeBlockMask` (`Pattern.block_mask`).

    Example:
        >>> check_traced_tables(layer, TracedBlockTables(...), [(100, 100), (257, 257)])   # doctest: +SKIP
    """
    for q_len, k_len in lengths:
        expected = module.runtime_mask(q_len, k_len, torch.device("cpu")).to_block_masks()[0].cpu()
        got = tables.kept(q_len, k_len)
        grid = TracedBlockGrid(q_len, k_len, tables.block_size, tables.causal, tables.max_len)
        widest = expected.sum(-1).amax(-1)              # per head
        for head, pattern_index in enumerate(tables.pattern_of_head.tolist()):
            pattern = tables.patterns[pattern_index]
            if int(widest[head]) > pattern.traced_row_bound(grid):
                raise SparsifyError(
                    f"site {module.site.name!r}: pattern {pattern} keeps {int(widest[head])} key blocks in one query "
                    f"block at q_len={q_len}, k_len={k_len}, more than its _traced_row_bound "
                    f"{pattern.traced_row_bound(grid)}. Export with lengths='fixed', or fix the pattern's "
                    f"_traced_row_bound")
        if not torch.equal(got, expected):
            head = int((got != expected).flatten(1).any(1).nonzero()[0])
            raise SparsifyError(
                f"site {module.site.name!r}: the any-length lowering of pattern {tables.patterns[int(tables.pattern_of_head[head])]} "
                f"keeps other blocks than the runtime at q_len={q_len}, k_len={k_len} (its _traced_block_mask "
                f"disagrees with _block_mask). Export with lengths='fixed', or fix the pattern's _traced_block_mask")
