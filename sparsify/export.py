"""ONNX export of a compiled model: sparse attention in standard ONNX ops, run by any ONNX runtime.

`export_onnx(compiled, example_inputs, path)` writes the rewritten graph of a `SparsifiedModule`
as an ONNX model that onnxruntime (or any runtime) runs *sparse*, not masked:

* every `SparseAttention` site becomes a block gather. Rows are (sparse head, query block)
  pairs; rows are grouped by how many key blocks they keep (at most 4 groups, chosen to
  minimise padded work) and cut into cache-sized chunks. Per chunk: one ``Gather`` of the kept
  key blocks on a constant index tensor into ``[batch, rows, kept * block, head_dim]``, then
  ``MatMul → (Add bias) → Softmax → MatMul`` with the ``Gather``-ed value blocks. Block tables
  are initializers; the bias (``-inf`` on padding slots of rows narrower than their group, keys
  past the end in the partial last block, the causal triangle of diagonal blocks) exists only
  where needed and is built in the graph from small boolean constants, so the file stays small
  and the runtime folds it once at session start. Dense heads of a site run plain
  ``MatMul → Softmax → MatMul``. The work per call is proportional to the kept blocks, which is
  where the speedup comes from (about 0.9 of ``1 / density`` on one CPU thread, see
  ``benchmarks/onnx_bench.py``).
* canonical dense sites (``torch.ops.sparsify.attention``) become ``MatMul → Softmax → MatMul``.

The graph holds standard ONNX domains only (checked after export), so nothing custom needs to
be registered in the runtime.

Sequence length is fixed at export, batch is dynamic. The block tables are a function of the
sequence length computed by pattern code (unions, static top-k tables from a profile, ...), not
by a closed formula, so computing them in-graph would mean an ONNX lowering per pattern and
data-dependent shapes (``NonZero``) that the runtime re-plans at every call; as constants they
cost nothing at run time. The exported inputs therefore carry static sequence dimensions and
onnxruntime refuses another length with "Got invalid dimensions for input ...". Export once per
deployed length (typical for DiT/video models, whose token count is fixed by the resolution).
``dynamic_seq=True`` is accepted only for models whose sites are all dense.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (it needs ``onnxscript``): the
TorchScript exporter bakes the captured graph's symbolic sizes (``sym_size``) into constants,
so batch would not stay dynamic.

Example:
    >>> compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)  # doctest: +SKIP
    >>> sparsify.export_onnx(compiled, inputs, "model.onnx")                        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from sparsify.capture import normalize_inputs
from sparsify.errors import SparsifyError, UnsupportedError
from sparsify.io import atomic_paths

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_OPSET",
    "BlockGatherAttention",
    "OnnxExport",
    "dense_attention_lowering",
    "export_onnx",
    "onnx_lowerings",
    "register_onnx_lowering",
]

#: Oldest opset the export supports: the dynamo exporter's ONNX function library (onnxscript's
#: torchlib) emits opset-18 forms (``Split`` with ``num_outputs``, ``ReduceMax`` with axes as an
#: input); at opset 17 the exported model fails the checker.
MIN_OPSET = 18
_CANONICAL = "sparsify.attention"
_STANDARD_DOMAINS = ("", "ai.onnx")


# ----------------------------------------------------------------------------------------------
# Lowerings: export-friendly attention in plain torch ops


def dense_attention_lowering(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                             is_causal: bool, scale: float | None) -> torch.Tensor:
    """``torch.ops.sparsify.attention`` as ``MatMul → (mask) → Softmax → MatMul`` (exports to plain ONNX).

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
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    visible = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        visible = causal if visible is None else visible & causal
    if visible is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    scores = scores.masked_fill(~visible, float("-inf"))
    output = torch.matmul(torch.softmax(scores, dim=-1), v)
    # As F.scaled_dot_product_attention: a query that sees no key gives zeros (softmax gave NaN).
    return torch.where(visible.any(-1, keepdim=True), output, 0.0)


class BlockGatherAttention(torch.nn.Module):
    """One `SparseAttention` site on fixed lengths, in export-friendly torch ops.

    Sparse heads gather their kept key/value blocks (constant indices), compute
    ``[batch, heads, q_blocks, block, width * block]`` scores against them, add a constant
    structural bias (padding slots, partial last block, causal diagonal) and the user's mask
    gathered tile by tile, then softmax and a second matmul. ``width`` is the widest row of
    the site after dropping blocks a causal mask hides; narrower rows are padded and masked.
    Dense heads run `dense_attention_lowering`. Equal to ``SparseAttention.forward`` on inputs
    of these lengths (rows whose keys are all masked give zeros, as the torch backend does).

    Example:
        >>> from sparsify import patterns
        >>> from sparsify.runtime.site import SparseAttention
        >>> from sparsify.site import AttentionSite
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=16, q_len=128, k_len=128)
        >>> layer = SparseAttention(site, [patterns.dense(), patterns.sliding_window(32)], block_size=32)
        >>> lowered = BlockGatherAttention(layer, 128, 128)
        >>> q = torch.randn(1, 2, 128, 16)
        >>> torch.allclose(lowered(q, q, q, None, False, None), layer(q, q, q, None, False, None), atol=1e-5)
        True
    """

    def __init__(self, module: torch.nn.Module, q_len: int, k_len: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        site = module.site
        bs = module.block_size
        self.site_name = site.name
        self.q_len, self.k_len, self.block = q_len, k_len, bs
        self.q_blocks, self.k_blocks = -(-q_len // bs), -(-k_len // bs)
        self.num_heads, self.num_kv_heads = site.num_heads, site.num_kv_heads
        dense = module.dense_heads.detach().cpu().long()
        sparse = module.sparse_heads.detach().cpu().long()
        skipped = getattr(module, "skipped_heads", torch.zeros(0, dtype=torch.long)).detach().cpu().long()
        self.skipped_count = skipped.numel()
        self.has_dense = dense.numel() > 0
        self.has_sparse = sparse.numel() > 0
        self.all_sparse = bool(torch.equal(sparse, torch.arange(site.num_heads)))
        self.register_buffer("dense_heads", dense.clone(), persistent=False)
        self.register_buffer("dense_kv_heads", module.dense_kv_heads.detach().cpu().long().clone(), persistent=False)
        self.register_buffer("sparse_heads", sparse.clone(), persistent=False)
        # Output heads come as [dense..., sparse..., skipped...]; this gathers them back into head order.
        order = torch.cat([dense, sparse, skipped])
        self.identity_order = bool(torch.equal(order, torch.arange(order.numel())))
        self.register_buffer("head_order", torch.argsort(order), persistent=False)
        self.width = 1
        if self.has_sparse:
            self._init_tables(module.runtime_mask(q_len, k_len, torch.device("cpu")), dtype)

    def _init_tables(self, mask, dtype: torch.dtype) -> None:
        bs, q_blocks, k_blocks = self.block, self.q_blocks, self.k_blocks
        counts, indices = mask.merged()     # kept blocks (causal-hidden ones already dropped), ascending
        indices, counts = indices[0].long(), counts[0].long()
        kv_head = mask.kv_head_index.detach().cpu().long()
        heads, _, max_kept = indices.shape
        valid = torch.arange(max_kept) < counts.unsqueeze(-1)
        # Rows are (sparse head, query block) pairs, flattened; real slots first, ascending.
        rows_total = heads * q_blocks
        kept = valid.sum(-1).reshape(rows_total)
        width = max(int(kept.max()), 1)
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        blocks = indices.gather(-1, order).reshape(rows_total, width)
        slot_valid = torch.arange(width) < kept.unsqueeze(-1)                  # [R, W]
        blocks = torch.where(slot_valid, blocks, blocks[:, :1]).clamp(0, k_blocks - 1)
        row_head = torch.arange(rows_total) // q_blocks
        row_query_block = torch.arange(rows_total) % q_blocks
        tail = self.k_len - (k_blocks - 1) * bs                 # keys in the last key block
        self.width = width
        self.sparse_count = heads
        self.groups: list[_RowGroup] = []
        chunks = []
        for rows, group_width in _group_rows(kept.clamp(min=1)):
            # Chunks of rows whose scores fit in cache (per batch item): the runtime runs them one
            # after the other, so gathered K/V and scores of a chunk stay in cache between ops.
            per_chunk = max(1, CHUNK_BYTES // (bs * group_width * bs * 4))
            chunks += [(rows[i:i + per_chunk], group_width) for i in range(0, len(rows), per_chunk)]
        for index, (rows, group_width) in enumerate(chunks):
            b = blocks[rows, :group_width]
            valid_g = slot_valid[rows, :group_width]
            head, query_block = row_head[rows], row_query_block[rows]
            partial = valid_g & (b == k_blocks - 1) if tail < bs else torch.zeros_like(valid_g)
            diagonal = valid_g & (b == query_block.unsqueeze(-1)) if mask.causal else torch.zeros_like(valid_g)
            group = _RowGroup(index=index, rows=len(rows), width=group_width,
                              all_rows=len(rows) == rows_total and bool(torch.equal(rows, torch.arange(rows_total))),
                              has_padding=not bool(valid_g.all()), has_partial=bool(partial.any()),
                              has_diagonal=bool(diagonal.any()))
            self.groups.append(group)
            shape = (len(rows), 1, group_width, 1)
            buffers = {
                "rows": rows,                                                   # query rows (also per-head mask rows)
                "kv": (kv_head[head].unsqueeze(-1) * k_blocks + b).reshape(-1),  # flat K/V blocks of each slot
                "mask_keys": b.reshape(-1),                                     # user-mask gathers, shared by heads
                "mask_keys_head": (head.unsqueeze(-1) * k_blocks + b).reshape(-1),   # ... or one per head
                "mask_tiles": (query_block.unsqueeze(-1) * k_blocks + b).reshape(-1),
                "mask_tiles_head": (rows.unsqueeze(-1) * k_blocks + b).reshape(-1),
                "query_blocks": query_block,
                "heads": head,
                "padding": (~valid_g).view(shape),
                "partial": partial.view(shape),
                "diagonal": diagonal.view(shape),
            }
            for name, value in buffers.items():
                self.register_buffer(f"group{index}_{name}", value.contiguous(), persistent=False)
        row_order = torch.cat([getattr(self, f"group{g.index}_rows") for g in self.groups])
        self.identity_rows = bool(torch.equal(row_order, torch.arange(rows_total)))
        self.register_buffer("row_inverse", torch.argsort(row_order), persistent=False)
        self.register_buffer("tail_columns", (torch.arange(bs) >= tail).view(1, 1, bs), persistent=False)
        self.register_buffer("upper_triangle", torch.ones(bs, bs, dtype=torch.bool).triu(1).view(bs, 1, bs),
                             persistent=False)
        # Rows that keep no visible block at all (possible only under causal) give zeros.
        alive = (kept > 0).view(heads, q_blocks)
        self.has_dead_rows = not bool(alive.all())
        self.register_buffer("alive_rows", alive.repeat_interleave(bs, 1)[:, : self.q_len].unsqueeze(-1),
                             persistent=False)

    def _buffer(self, group: "_RowGroup", name: str) -> torch.Tensor:
        return getattr(self, f"group{group.index}_{name}")

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g.rows}x{g.width}" for g in self.groups)
        return (f"site={self.site_name!r}, q_len={self.q_len}, k_len={self.k_len}, block={self.block}, "
                f"row groups (rows x kept blocks)=[{groups}], sparse_heads={self.sparse_heads.numel()}, "
                f"dense_heads={self.dense_heads.numel()}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, scale: float | None) -> torch.Tensor:
        if not self.has_sparse and not self.skipped_count:
            return dense_attention_lowering(q, k, v, attn_mask, is_causal, scale)
        if attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        outputs = []
        if self.has_dense:
            dense_mask = attn_mask
            if attn_mask is not None and attn_mask.shape[1] > 1:
                dense_mask = attn_mask.index_select(1, self.dense_heads)
            outputs.append(dense_attention_lowering(q.index_select(1, self.dense_heads),
                                                    k.index_select(1, self.dense_kv_heads),
                                                    v.index_select(1, self.dense_kv_heads), dense_mask, is_causal, scale))
        if self.has_sparse:
            outputs.append(self._sparse(q, k, v, attn_mask, scale))
        if self.skipped_count:  # a skipped head contributes zeros
            outputs.append(torch.zeros((q.shape[0], self.skipped_count, q.shape[2], v.shape[-1]), dtype=q.dtype,
                                       device=q.device))
        output = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if not self.identity_order:
            output = output.index_select(1, self.head_order)
        return output

    def _structural_bias(self, group: "_RowGroup", dtype: torch.dtype) -> torch.Tensor | None:
        """``-inf`` where the tables hide a key, else 0: ``[rows, bs|1, W * bs]`` (``None``: nothing hidden).

        Built in the graph from small boolean factors (padding slots | keys past ``k_len`` in the
        partial last block | the causal triangle of diagonal blocks), so the file stays small;
        the runtime folds it into one constant at session start.
        """
        masked = None
        for present, term in ((group.has_padding, lambda: self._buffer(group, "padding")),
                              (group.has_partial, lambda: self._buffer(group, "partial") & self.tail_columns),
                              (group.has_diagonal, lambda: self._buffer(group, "diagonal") & self.upper_triangle)):
            if present:
                masked = term() if masked is None else masked | term()
        if masked is None:
            return None
        bs = self.block
        # Without the causal triangle the mask does not vary along a block's queries.
        query_rows = bs if group.has_diagonal else 1
        masked = masked.expand(group.rows, query_rows, group.width, bs).reshape(group.rows, query_rows, group.width * bs)
        return torch.where(masked, float("-inf"), 0.0).to(dtype)

    def _sparse(self, q, k, v, attn_mask, scale) -> torch.Tensor:
        heads, bs = self.sparse_count, self.block
        q_blocks, k_blocks = self.q_blocks, self.k_blocks
        head_dim, value_dim = q.shape[-1], v.shape[-1]
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        qs = q if self.all_sparse else q.index_select(1, self.sparse_heads)
        if q_blocks * bs != self.q_len:
            qs = F.pad(qs, (0, 0, 0, q_blocks * bs - self.q_len))
        qs = qs.reshape(-1, heads * q_blocks, bs, head_dim)
        if k_blocks * bs != self.k_len:
            k = F.pad(k, (0, 0, 0, k_blocks * bs - self.k_len))
            v = F.pad(v, (0, 0, 0, k_blocks * bs - self.k_len))
        kb = k.reshape(-1, self.num_kv_heads * k_blocks, bs, head_dim)
        vb = v.reshape(-1, self.num_kv_heads * k_blocks, bs, value_dim)
        mask = self._prepare_mask(attn_mask, q.dtype) if attn_mask is not None else None
        outputs = []
        for group in self.groups:
            kv = self._buffer(group, "kv")
            q_group = qs if group.all_rows else qs.index_select(1, self._buffer(group, "rows"))
            keys = kb.index_select(1, kv).reshape(-1, group.rows, group.width * bs, head_dim)
            # The scale right before the MatMul: onnxruntime folds it in (FusedMatMul alpha).
            scores = torch.matmul(q_group * scale, keys.transpose(-2, -1))       # [B, rows, bs, W*bs]
            bias = self._structural_bias(group, scores.dtype)
            if bias is not None:
                scores = scores + bias
            dead = None
            if mask is not None:
                scores = scores + self._mask_tiles(mask, group)
                # Rows the user's mask leaves without a visible key give zeros (torch backend
                # semantics); their softmax is NaN, which the Where below drops.
                dead = scores.amax(-1, keepdim=True) == float("-inf")
            probs = torch.softmax(scores, dim=-1)
            values = vb.index_select(1, kv).reshape(-1, group.rows, group.width * bs, value_dim)
            out = torch.matmul(probs, values)                                      # [B, rows, bs, Dv]
            if dead is not None:
                out = torch.where(dead, 0.0, out)
            outputs.append(out)
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if not self.identity_rows:
            out = out.index_select(1, self.row_inverse)
        out = out.reshape(-1, heads, q_blocks * bs, value_dim)
        if q_blocks * bs != self.q_len:
            out = out[:, :, : self.q_len]
        if self.has_dead_rows:
            out = torch.where(self.alive_rows, out, 0.0)
        return out

    def _prepare_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool, bool, bool]:
        """The user's mask as an additive bias, padded to whole blocks, and how it varies."""
        bs, q_blocks, k_blocks = self.block, self.q_blocks, self.k_blocks
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, float("-inf")).to(dtype)
        else:
            mask = mask.to(dtype)
        per_head = mask.shape[1] > 1
        if per_head and not self.all_sparse:
            mask = mask.index_select(1, self.sparse_heads)
        mask_heads = self.sparse_count if per_head else 1
        along_q, along_k = mask.shape[2] > 1, mask.shape[3] > 1
        if along_q and q_blocks * bs != self.q_len:
            mask = F.pad(mask, (0, 0, 0, q_blocks * bs - self.q_len))
        if along_k and k_blocks * bs != self.k_len:
            mask = F.pad(mask, (0, k_blocks * bs - self.k_len))
        if along_q and along_k:       # tiles [B, heads * q_blocks * k_blocks, bs, bs]
            mask = mask.reshape(-1, mask_heads, q_blocks, bs, k_blocks, bs).transpose(3, 4)
            mask = mask.reshape(-1, mask_heads * q_blocks * k_blocks, bs, bs)
        elif along_k:                 # key blocks [B, heads * k_blocks, bs]
            mask = mask.reshape(-1, mask_heads * k_blocks, bs)
        elif along_q:                 # query blocks [B, heads * q_blocks, bs, 1]
            mask = mask.reshape(-1, mask_heads * q_blocks, bs, 1)
        else:                         # [B, heads, 1, 1]
            mask = mask.reshape(-1, mask_heads, 1, 1)
        return mask, per_head, along_q, along_k

    def _mask_tiles(self, prepared, group: "_RowGroup") -> torch.Tensor:
        """The user's mask for this group's rows and slots, broadcastable to ``[B, rows, bs, W*bs]``."""
        mask, per_head, along_q, along_k = prepared
        bs = self.block
        if along_q and along_k:
            index = self._buffer(group, "mask_tiles_head" if per_head else "mask_tiles")
            tiles = mask.index_select(1, index).reshape(-1, group.rows, group.width, bs, bs)
            return tiles.transpose(2, 3).reshape(-1, group.rows, bs, group.width * bs)
        if along_k:
            index = self._buffer(group, "mask_keys_head" if per_head else "mask_keys")
            return mask.index_select(1, index).reshape(-1, group.rows, 1, group.width * bs)
        if along_q:
            return mask.index_select(1, self._buffer(group, "rows" if per_head else "query_blocks"))
        return mask.index_select(1, self._buffer(group, "heads")) if per_head else mask


@dataclasses.dataclass(frozen=True)
class _RowGroup:
    """Rows (sparse head, query block) computed together, each with ``width`` key-block slots."""

    index: int
    rows: int
    width: int
    all_rows: bool        # every row of the site, in order: no gather of queries needed
    has_padding: bool     # some rows keep fewer than ``width`` blocks
    has_partial: bool     # some slot is the partial last key block
    has_diagonal: bool    # some slot is a diagonal block under causal


#: Scores bytes (per batch item) of one chunk of rows. onnxruntime runs the chunks' ops one
#: after the other, so a chunk's gathered K/V and scores stay in cache from op to op; at S=4096
#: and 12% density on one CPU thread this took the sparse model from 74 to 54 ms.
CHUNK_BYTES = 2 << 20
#: Row groups per site at most; splitting off a group costs a gather of its queries and outputs.
MAX_ROW_GROUPS = 4
_GROUP_OVERHEAD = 0.03     # fraction of the site's work one more group must save...
_GROUP_OVERHEAD_SLOTS = 256  # ...and at least this many (row, key block) slots: small sites stay whole
_PADDING_COST = 0.15       # extra cost of a group whose rows differ in width (a bias Add over its scores)


def _group_rows(widths: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Split rows into at most `MAX_ROW_GROUPS` groups of similar width, minimising padded work.

    Rows sorted by width (widest first) are cut into contiguous segments by dynamic
    programming; a segment costs ``rows * widest`` (padded slots are computed and masked),
    plus `_PADDING_COST` when its widths differ, plus `_GROUP_OVERHEAD` of the total (at least
    `_GROUP_OVERHEAD_SLOTS`) per extra group. Each group's rows are returned in ascending order, with the group's width.
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
# Registry: ONNX lowerings by name; each backend declares the one that reproduces it

#: ``lowering(sparse_attention_module, q_len, k_len, dtype) -> nn.Module`` with the same call
#: signature as `SparseAttention`, built from plain torch ops that export to standard ONNX.
Lowering = Callable[[torch.nn.Module, int, int, torch.dtype], torch.nn.Module]
_LOWERINGS: dict[str, Lowering] = {}
#: The lowering of sites compiled with ``backend="auto"``: every auto candidate computes what the
#: runtime mask describes (each is tested against the torch reference).
AUTO_LOWERING = "block_gather"


def register_onnx_lowering(name: str) -> Callable[[Lowering], Lowering]:
    """Decorator registering an ONNX lowering under ``name`` (what a backend's ``onnx_lowering`` names).

    Example:
        >>> @register_onnx_lowering("my_kernel_lowering")        # doctest: +SKIP
        ... def lower(module, q_len, k_len, dtype):
        ...     return BlockGatherAttention(module, q_len, k_len, dtype)
    """

    def decorate(lowering: Lowering) -> Lowering:
        if name in _LOWERINGS:
            raise ValueError(f"an ONNX lowering named {name!r} is registered twice")
        _LOWERINGS[name] = lowering
        return lowering

    return decorate


def onnx_lowerings() -> list[str]:
    """Names of the registered ONNX lowerings."""
    return sorted(_LOWERINGS)


def lowering_name(backend: str) -> str | None:
    """The ONNX lowering a site compiled for ``backend`` exports with (as the backend declares), or ``None``."""
    if backend == "auto":
        return AUTO_LOWERING
    from sparsify.backends import backend_class

    return backend_class(backend).onnx_lowering


def exporting_backends() -> list[str]:
    """Backends whose declared lowering is registered."""
    from sparsify.backends import backend_names

    return ["auto"] + [name for name in backend_names() if lowering_name(name) in _LOWERINGS]


register_onnx_lowering("block_gather")(BlockGatherAttention)


# ----------------------------------------------------------------------------------------------
# Export


@dataclasses.dataclass
class OnnxExport:
    """What `export_onnx` wrote: the file, its interface and the lengths it is fixed to."""

    path: pathlib.Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool                       # False only when the compiled graph fixed the batch size
    sparse_sites: int
    dense_sites: int
    seq_lengths: dict[str, tuple[int, int]]   # per sparse site: (q_len, k_len) the tables are built for


class _ExportWrapper(torch.nn.Module):
    """Flat tensors in, flat tensors out: what the ONNX graph's inputs and outputs are."""

    def __init__(self, graph_module: torch.nn.Module, args: tuple, kwargs: dict, tensor_slots: list[tuple[str, Any]]):
        super().__init__()
        self.graph_module = graph_module
        self._args = args
        self._kwargs = kwargs
        self._slots = tensor_slots

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = list(self._args), dict(self._kwargs)
        for (kind, key), tensor in zip(self._slots, tensors):
            if kind == "arg":
                args[key] = tensor
            else:
                kwargs[key] = tensor
        output = self.graph_module(*args, **kwargs)
        return tuple(leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def export_onnx(compiled: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                opset: int | None = None, dynamic_seq: bool = False) -> OnnxExport:
    """Write ``compiled`` (a `sparsify.compile` result) as an ONNX model at ``path``.

    Sparse sites are lowered to a block gather of the kept key/value blocks (standard ONNX ops,
    block tables as initializers), dense sites to ``MatMul → Softmax → MatMul``. The batch
    dimension is dynamic; the sequence length is fixed to the one of ``example_inputs`` (see the
    module docstring for why; onnxruntime rejects other lengths). The model is checked with
    ``onnx.checker`` and must hold only standard ONNX domains.

    Args:
        compiled: the `SparsifiedModule` that `sparsify.compile` returned.
        example_inputs: inputs as the model is called (tensor, tuple of positional arguments or
            dict of keyword arguments), at the sequence length to deploy.
        path: the ``.onnx`` file to write.
        opset: ONNX opset (default: the exporter's; at least `MIN_OPSET`).
        dynamic_seq: make sequence dimensions dynamic; only for models without sparse sites.

    Returns:
        an `OnnxExport` naming the file, its input/output names and the fixed lengths.

    Example:
        >>> compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)  # doctest: +SKIP
        >>> export_onnx(compiled, inputs, "model.onnx").input_names                     # doctest: +SKIP
        ['input_ids', 'attention_mask']
    """
    from sparsify.api import SparsifiedModule
    from sparsify.runtime.site import SparseAttention

    if not isinstance(compiled, SparsifiedModule):
        raise SparsifyError(
            f"export_onnx exports a compiled model, got a plain {type(compiled).__name__}. Call sparsify.compile "
            f"first: compiled = sparsify.compile(model, strategy=..., example_inputs=...) (or with calibration data), "
            f"then sparsify.export_onnx(compiled, example_inputs, path)"
        )
    onnx = _import_onnx()
    opset = _check_opset(opset, onnx)
    graph_module = compiled.graph_module
    sparse_modules = {name: module for name, module in graph_module.named_modules()
                      if isinstance(module, SparseAttention)}
    for name, module in sparse_modules.items():
        lowering = lowering_name(module.backend)
        if lowering not in _LOWERINGS:
            declared = f"declares the lowering {lowering!r}, which is not registered" if lowering else "declares none"
            raise UnsupportedError(
                f"site {module.site.name!r} ({name}) was compiled for backend {module.backend!r}, which has no ONNX "
                f"lowering (it {declared}); backends that export: {', '.join(exporting_backends())}. Compile with "
                f"backend='torch' for export, or register one with sparsify.export.register_onnx_lowering(name)"
            )
    if dynamic_seq and sparse_modules:
        raise UnsupportedError(
            f"dynamic_seq=True: {len(sparse_modules)} site(s) run sparse, and their block tables are fixed at export "
            f"(they are initializers computed from the patterns for one length). Export once per sequence length, "
            f"with example inputs of that length"
        )

    args, kwargs = normalize_inputs(example_inputs)
    kwargs = {**compiled.fixed_kwargs, **kwargs}
    lengths, example_output = _run_example(compiled, sparse_modules, args, kwargs)

    export_module = _export_copy(graph_module, sparse_modules, lengths)
    slots, names, tensors = _tensor_inputs(graph_module, args, kwargs)
    if not tensors:
        raise SparsifyError("export_onnx: the example inputs hold no tensor")
    wrapper = _ExportWrapper(export_module, args, kwargs, slots).eval()
    trace_tensors, dynamic_shapes = _dynamic_batch(tensors, dynamic_seq)
    dynamic_batch = True
    try:
        with torch.no_grad():
            outputs = wrapper(*trace_tensors)
    except Exception as error:  # noqa: BLE001 - the captured graph fixed the batch size
        if trace_tensors[0].shape[0] == tensors[0].shape[0]:
            raise SparsifyError(f"export_onnx: the export lowering failed on the example inputs: "
                                f"{type(error).__name__}: {error}") from error
        logger.warning(
            "the compiled graph only accepts batch size %d (it was captured from batch-%d example inputs, which "
            "torch.export specialises); exporting with a fixed batch. Compile with example inputs of batch >= 2 "
            "for a dynamic batch.", tensors[0].shape[0], tensors[0].shape[0])
        dynamic_batch = False
        trace_tensors, dynamic_shapes = list(tensors), (tuple(None for _ in tensors),)
        with torch.no_grad():
            outputs = wrapper(*trace_tensors)
    output_names = _output_names(example_output, len(outputs))

    program = _run_exporter(wrapper, tuple(trace_tensors), names, output_names, dynamic_shapes, opset)
    model = program.model_proto
    _check_standard(model, onnx)
    seq_lengths = {sparse_modules[name].site.name: shape[:2] for name, shape in lengths.items()}
    metadata = {
        "sparsify.strategy": json.dumps(compiled.strategy.summary(), default=str),
        "sparsify.fixed_lengths": json.dumps({site: list(l) for site, l in seq_lengths.items()}),
        "sparsify.dynamic_axes": ("batch (dim 0 of every batched input)" if dynamic_batch else "none")
                                 + (" and sequence" if dynamic_seq else ""),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        large = model.ByteSize() > (1 << 31) - (64 << 20)
    except ValueError:                       # protobuf refuses to size messages past 2 GiB
        large = True
    # Written atomically (sparsify.io): checked before it replaces the file that was there, which a failed or
    # refused export leaves intact. A large model's external data file is replaced right before the model.
    targets = [path.with_name(path.name + ".data"), path] if large else [path]
    with atomic_paths(*targets) as temporaries:
        onnx.save_model(model, str(temporaries[-1]), save_as_external_data=large,
                        location=path.name + ".data" if large else None)
        onnx.checker.check_model(str(temporaries[-1]), full_check=not large)
    opset_used = next(o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS)
    result = OnnxExport(path=path, opset=int(opset_used),
                        input_names=names, output_names=output_names, dynamic_batch=dynamic_batch,
                        sparse_sites=len(sparse_modules),
                        dense_sites=len(compiled.sites) - len(sparse_modules), seq_lengths=seq_lengths)
    logger.info("exported %s: %d sparse / %d dense site(s), opset %d, inputs %s", path, result.sparse_sites,
                result.dense_sites, result.opset, names)
    return result


def _import_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    except ImportError as error:
        raise SparsifyError(
            f"ONNX export needs the 'onnx' extra ({error.name} is missing): pip install 'sparsify-attention[onnx]'"
        ) from None
    return onnx


def _check_opset(opset: int | None, onnx) -> int | None:
    if opset is None:
        return None
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise UnsupportedError(f"opset must be an int, got {opset!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise UnsupportedError(
            f"opset {opset} is too old: the export needs opset >= {MIN_OPSET} (the exporter's op library emits "
            f"opset-{MIN_OPSET} forms, e.g. Split with num_outputs, ReduceMax with axes as an input); "
            f"supported: {MIN_OPSET}..{newest}"
        )
    if opset > newest:
        raise UnsupportedError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                               f"(newest {newest}); supported: {MIN_OPSET}..{newest}")
    return opset


def _run_example(compiled, sparse_modules: dict, args: tuple, kwargs: dict) -> tuple[dict[str, tuple], Any]:
    """One forward on the example inputs: per sparse submodule ``(q_len, k_len, dtype)``, and the output."""
    found: dict[str, tuple] = {}
    handles = []
    for name, module in sparse_modules.items():
        def hook(_module, hook_args, _hook_kwargs, name=name):
            q, k = hook_args[0], hook_args[1]
            found[name] = (int(q.shape[2]), int(k.shape[2]), q.dtype)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            output = compiled.graph_module(*args, **kwargs)
    except SparsifyError:
        raise
    except Exception as error:  # noqa: BLE001 - reported with what to do
        raise SparsifyError(f"export_onnx: the compiled model failed on the example inputs: "
                            f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(sparse_modules) - set(found))
    if missing:
        raise SparsifyError(f"export_onnx: the example inputs did not reach {', '.join(missing)}")
    return found, output


def _export_copy(graph_module: torch.fx.GraphModule, sparse_modules: dict, lengths: dict) -> torch.fx.GraphModule:
    """A GraphModule sharing the weights of ``graph_module`` whose attentions are export lowerings."""
    graph = copy.deepcopy(graph_module.graph)
    for node in graph.nodes:
        if node.op == "call_function" and _CANONICAL in str(node.target):
            node.target = dense_attention_lowering
    export_module = torch.fx.GraphModule(graph_module, graph)
    for name, module in sparse_modules.items():
        q_len, k_len, dtype = lengths[name]
        lowering = _LOWERINGS[lowering_name(module.backend)](module, q_len, k_len, dtype)
        export_module.add_submodule(name, lowering)   # replaces the shared submodule in the copy only
    for attribute in ("_in_spec", "_out_spec"):
        if hasattr(graph_module, attribute):
            setattr(export_module, attribute, getattr(graph_module, attribute))
    export_module.recompile()
    return export_module


def _placeholder_names(graph_module: torch.fx.GraphModule) -> list[str]:
    return [node.target for node in graph_module.graph.nodes if node.op == "placeholder"]


def _tensor_inputs(graph_module, args: tuple, kwargs: dict):
    """The tensor leaves of the call, where each goes, and their ONNX input names."""
    placeholders = _placeholder_names(graph_module)
    slots, names, tensors = [], [], []
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            slots.append(("arg", index))
            names.append(str(placeholders[index]) if index < len(placeholders) else f"input_{index}")
            tensors.append(value)
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            slots.append(("kwarg", key))
            names.append(key)
            tensors.append(value)
        elif any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value)):
            raise UnsupportedError(f"export_onnx: input {key!r} nests tensors in a {type(value).__name__}; "
                                   f"pass tensors as top-level arguments")
    return slots, names, tensors


def _dynamic_batch(tensors: list[torch.Tensor], dynamic_seq: bool):
    """Example tensors to trace with (batch >= 2, so it is not specialised) and their dynamic shapes."""
    batch = tensors[0].shape[0] if tensors[0].dim() else None
    dim = torch.export.Dim("batch")
    trace, shapes = [], []
    for tensor in tensors:
        spec = {}
        if batch is not None and tensor.dim() and tensor.shape[0] == batch:
            spec[0] = dim
            if batch == 1:
                tensor = torch.cat([tensor, tensor])
        if dynamic_seq:
            spec.update({i: torch.export.Dim.AUTO for i in range(1, tensor.dim()) if tensor.shape[i] > 1})
        trace.append(tensor)
        shapes.append(spec or None)
    return trace, (tuple(shapes),)


def _output_names(output: Any, count: int) -> list[str]:
    """ONNX output names from the output's structure (``logits``, ``last_hidden_state``, ...)."""
    names = []
    try:
        flat = torch.utils._pytree.tree_flatten_with_path(output)[0]
    except ValueError:           # an output type registered without key paths: numbered names
        flat = []
    for key_path, leaf in flat:
        if isinstance(leaf, torch.Tensor):
            text = "".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) + "." for k in key_path)
            names.append(text.strip(".").replace(".", "_") or "output")
    if len(names) != count or len(set(names)) != count:
        names = [f"output_{i}" for i in range(count)]
    return [name if not name.isdigit() else f"output_{name}" for name in names]


def _run_exporter(wrapper, tensors: tuple, names: list[str], output_names: list[str], dynamic_shapes, opset):
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(wrapper, tensors, dynamo=True, input_names=names, output_names=output_names,
                                     dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=False,
                                     optimize=True, verbose=False)
    except Exception as error:  # noqa: BLE001 - re-raised with what it means here
        text = str(error)
        lines = text.splitlines() or [""]
        first = next((line for line in lines if "Error" in line and "step" not in line), lines[0])
        hint = ""
        if "batch" in text and ("specializ" in text or "Constraints violated" in text or "constant" in text.lower()):
            hint = (" The captured graph fixes the batch size (its capture fell back to static shapes); "
                    "compile with dynamic=True and a model that captures with dynamic shapes.")
        elif opset is not None and ("opset" in text.lower() or "version" in text.lower()):
            hint = f" An op of the graph may not exist at opset {opset}; try the default opset."
        raise SparsifyError(f"torch.onnx.export failed: {type(error).__name__}: {first[:500]}.{hint}") from error


def _check_standard(model, onnx) -> None:
    custom = sorted({f"{node.domain}::{node.op_type}" for node in model.graph.node
                     if node.domain not in _STANDARD_DOMAINS})
    functions = sorted({f"{f.domain}::{f.name}" for f in model.functions})
    if custom or functions:
        raise UnsupportedError(f"the exported graph uses non-standard ONNX domains: {', '.join(custom + functions)}")
