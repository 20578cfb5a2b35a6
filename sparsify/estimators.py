"""Input-adaptive block masks estimated on the device, per call: pooled block scores and estimated vertical-slash lines.

Every function here works on a batch of heads at once, keeps everything on the inputs' device and
never reads a device value on the host, so a compiled model can estimate its masks per input
without a synchronisation. Heads may carry different parameters (one value per head in a
tensor). Shapes: ``q`` ``[B, H, Sq, D]``; ``k`` ``[B, Hkv, Sk, D]`` with query head ``h`` reading
key head ``kv_head_index[h]``. The runtime takes masks as *block lists*, ``int64 [B, H, q_blocks,
slots]``: per query block the key blocks it keeps (``-1``: none, repeats allowed), which
`RuntimeBlockMask.from_block_lists` compresses without a ``[q_blocks, k_blocks]`` tensor; the
``*_block_mask`` functions give the same masks as ``bool [B, H, q_blocks, k_blocks]`` (pictures, tests).

Nothing of size ``Sq x Sk`` is built: pooled scoring costs ``q_blocks x k_blocks x D`` per head
(about ``1 / block²`` of dense attention), antidiagonal scoring ``1 / stride`` of it, and the
vertical-slash probe ``probe_rows x Sk x D``. Selections are top-k of a few entries per row (ties
go to the lower block index), never a sort of whole rows. Per-head counts (kept lines, blocks)
are read from CPU tensors, so the list widths are known on the host without a device read.
"""

from __future__ import annotations

import collections
import importlib.util
import math

import torch

from sparsify.block_mask import block_geometry, block_token_bounds, blocks_for

#: Whether Triton is installed (asked once: importlib's finder is a graph break inside torch.compile).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

__all__ = [
    "DeviceCopies",
    "antidiagonal_block_mass",
    "block_lists_to_masks",
    "coverage_block_lists",
    "coverage_block_mask",
    "key_validity",
    "pooled_block_mass",
    "pooled_coverage_block_lists",
    "query_mean_block_logits",
    "query_mean_block_mass",
    "self_blocks",
    "sink_block_lists",
    "vertical_slash_block_lists",
    "vertical_slash_block_mask",
    "vertical_slash_line_mass",
]

_NEG_INF = float("-inf")


def key_validity(attn_mask: torch.Tensor | None, batch: int, k_len: int) -> torch.Tensor | None:
    """``bool [B, Sk]``: keys some query may see, read off a user mask (``None``: every key).

    A bool mask counts a key as valid when any query row of any head may see it; an additive
    mask when any entry is finite and above the dtype's minimum (HF's padding value).

    Example:
        >>> padding = torch.tensor([[True, True, False]]).view(1, 1, 1, 3)
        >>> key_validity(padding, 1, 3).tolist()
        [[True, True, False]]
    """
    if attn_mask is None:
        return None
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min / 2)
    keep = keep.any(dim=(1, 2))                                    # [B|1, Sk]
    return keep.expand(batch, k_len)


def _blocked_mean(x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x [B, H, S, D]`` over each block of rows (valid rows only) and the valid-row count ``[B, H|1, n]``.

    Sums accumulate in float32 straight from ``x`` (no float32 copy of it); only the cut last block is padded.
    CUDA inputs the Triton kernel takes run as one launch (`sparsify.estimator_kernels.block_means`).
    """
    if _triton_serves(x, block_size):
        from sparsify.estimator_kernels import block_means

        return block_means(x, block_size, valid)
    batch, heads, length, dim = x.shape
    blocks = blocks_for(length, block_size)
    whole = length // block_size
    if valid is not None:
        x = x * valid.to(x.dtype).view(batch, 1, length, 1)           # zeros and ones: exact in any dtype
        weights = valid.to(torch.float32)
    else:
        weights = torch.ones(batch, length, device=x.device, dtype=torch.float32)
    sums = x[:, :, :whole * block_size].reshape(batch, heads, whole, block_size, dim).sum(3, dtype=torch.float32)
    if whole < blocks:                                                   # the cut last block
        sums = torch.cat([sums, x[:, :, whole * block_size:].sum(2, keepdim=True, dtype=torch.float32)], 2)
    weights = torch.nn.functional.pad(weights, (0, blocks * block_size - length))
    counts = weights.view(batch, 1, blocks, block_size).sum(3)
    return sums / counts.clamp_min(1.0).unsqueeze(-1), counts


def pooled_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                      scale: float | None = None, causal: bool = False, q_offset: int = 0,
                      key_valid: torch.Tensor | None = None, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Estimated attention mass ``float32 [B, H, q_blocks, k_blocks]`` (rows sum to 1) from block-mean queries and keys.

    The score of block pair ``(I, J)`` is ``mean(q_I) · mean(k_J) * scale + log(keys in J)``
    (a block of more valid keys holds proportionally more mass), the dot product times
    ``temperature`` (per head ``[1, H, 1, 1]`` or a number); blocks hidden by the causal mask or
    holding no valid key get none.

    Example:
        >>> q = torch.randn(1, 2, 64, 8)
        >>> mass = pooled_block_mass(q, q[:, :1], block_size=16, kv_head_index=torch.tensor([0, 0]))
        >>> mass.shape, bool(torch.allclose(mass.sum(-1), torch.ones(1, 2, 4)))
        (torch.Size([1, 2, 4, 4]), True)
    """
    logits, key_bias = _pooled_scores(q, k, block_size=block_size, kv_head_index=kv_head_index, scale=scale,
                                      key_valid=key_valid, temperature=temperature)
    # [B, H, Qb, Kb] tensors are the cost here: the key bias and the causal mask are applied in place.
    logits += key_bias.view(key_bias.shape[0], 1, 1, -1)
    if causal:
        visible, _ = block_geometry(q.shape[2], k.shape[2], block_size, causal, q_offset, logits.device)
        logits.masked_fill_(~visible, _NEG_INF)
    mass = torch.softmax(logits, dim=-1)
    return mass.nan_to_num_(0.0) if key_valid is not None else mass     # rows that see no valid key: zeros


def _pooled_scores(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                   scale: float | None, key_valid: torch.Tensor | None, temperature: torch.Tensor | float,
                   copies: "DeviceCopies | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores float32 [B, H, Qb, Kb], key_bias float32 [B, Kb])``: pooled dot products (scale and temperature in),
    and per key block the log of its valid keys (``-inf``: none); the logits are their sum."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    query_means, _ = _blocked_mean(q, block_size)
    key_means, key_counts = _blocked_mean(k, block_size, key_valid)
    key_means = key_means.index_select(1, _on(kv_head_index, k.device, copies))
    # The scale goes into the (small) query means, not into the [B, H, Qb, Kb] scores.
    scores = (query_means * (scale * temperature)) @ key_means.transpose(-1, -2)
    return scores, key_counts.view(key_counts.shape[0], -1).log()       # log 0 = -inf: no valid key


def pooled_coverage_block_lists(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                                coverage: torch.Tensor, min_blocks: torch.Tensor, max_blocks: torch.Tensor,
                                scale: float | None = None, causal: bool = False, q_offset: int = 0,
                                key_valid: torch.Tensor | None = None, temperature: torch.Tensor | float = 1.0,
                                kernel: str = "auto", copies: "DeviceCopies | None" = None,
                                sink_blocks: torch.Tensor | None = None, scoring: str = "mean") -> torch.Tensor:
    """`coverage_block_lists` of `pooled_block_mass`: block lists ``int64 [B, H, Qb, max(max_blocks) (+ sinks)]``.

    ``scoring="query_mean"`` ranks by `query_mean_block_mass` instead (each query block's mean
    query against every key; on the Triton path its per-block log-sum-exp, `query_mean_block_logits`,
    feeds the same coverage kernel).

    ``kernel``: ``"triton"`` runs softmax, ranking and coverage in one fused kernel over the pooled
    scores (`sparsify.estimator_kernels`: each row read once, no ``[B, H, Qb, Kb]`` probability
    or sort-key tensor); ``"torch"`` composes `pooled_block_mass` and `coverage_block_lists`;
    ``"auto"`` takes Triton for CUDA inputs it supports. ``max_blocks`` and ``sink_blocks`` (the
    first key blocks every row of a head keeps, appended as `sink_block_lists`) are CPU tensors;
    ``copies`` (a `DeviceCopies`) keeps the per-head values' device copies across calls.

    Example:
        >>> q = torch.randn(1, 2, 64, 8)
        >>> one = torch.ones(2, dtype=torch.long)
        >>> pooled_coverage_block_lists(q, q[:, :1], block_size=16, kv_head_index=torch.tensor([0, 0]),
        ...                             coverage=torch.tensor([0.9, 0.9]), min_blocks=one, max_blocks=2 * one,
        ...                             causal=True).shape
        torch.Size([1, 2, 4, 2])
    """
    if scoring not in ("mean", "query_mean"):
        raise ValueError(f"pooled_coverage_block_lists: scoring must be 'mean' or 'query_mean', got {scoring!r}")
    k_blocks = blocks_for(k.shape[2], block_size)
    kernel = _chosen_kernel(kernel, lambda: q.device.type == "cuda" and _TRITON_INSTALLED
                            and _coverage_kernel_serves(k_blocks)
                            and (scoring == "mean" or _triton_serves(q, block_size)))
    common = dict(block_size=block_size, kv_head_index=kv_head_index, scale=scale, key_valid=key_valid,
                  temperature=temperature)
    if kernel == "torch":
        if scoring == "mean":
            mass = pooled_block_mass(q, k, causal=causal, q_offset=q_offset, **common)
        else:
            mass = query_mean_block_mass(q, k, causal=causal, q_offset=q_offset, copies=copies, **common)
        lists = coverage_block_lists(mass, coverage, min_blocks, max_blocks)
        if sink_blocks is None:
            return lists
        return torch.cat([lists, sink_block_lists(sink_blocks, lists, k_blocks, copies)], -1)
    from sparsify.estimator_kernels import coverage_lists_of_scores

    if scoring == "mean":
        scores, key_bias = _pooled_scores(q, k, copies=copies, **common)
    else:   # the blocks' log-sum-exp already holds their key counts: no bias
        scores = query_mean_block_logits(q, k, causal=causal, q_offset=q_offset, copies=copies, kernel="triton",
                                         **common)
        key_bias = torch.zeros(q.shape[0], k_blocks, device=q.device, dtype=torch.float32)
    limit = max(1, min(int(max_blocks.max()), k_blocks))
    sinks = torch.zeros(0, dtype=torch.int32) if sink_blocks is None else sink_blocks.cpu().to(torch.int32)
    sink_width = max(0, min(int(sinks.max()), k_blocks)) if sinks.numel() else 0
    return coverage_lists_of_scores(scores, key_bias, coverage=_on(coverage, q.device, copies),
                                    min_blocks=_on(min_blocks, q.device, copies),
                                    max_blocks=_on(max_blocks, q.device, copies),
                                    limit=limit, block_size=block_size, q_len=q.shape[2], causal=causal,
                                    q_offset=q_offset, sink_count=_on(sinks, q.device, copies) if sink_width else None,
                                    sink_width=sink_width)


def antidiagonal_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                            stride: int = 8, scale: float | None = None, causal: bool = False, q_offset: int = 0,
                            key_valid: torch.Tensor | None = None,
                            temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Estimated attention mass ``float32 [B, H, q_blocks, k_blocks]`` from strided antidiagonal sums (XAttention's idea).

    Inside every ``stride x stride`` tile the scores along its antidiagonal are summed (one
    matmul of queries and reversed keys regrouped by ``stride``), softmax-normalised per row of
    tiles and pooled into blocks. Costs ``1 / stride`` of dense attention; ``block_size`` must be
    a multiple of ``stride``.

    Example:
        >>> q = torch.randn(1, 1, 64, 8)
        >>> antidiagonal_block_mass(q, q, block_size=16, kv_head_index=torch.tensor([0]), stride=4).shape
        torch.Size([1, 1, 4, 4])
    """
    if block_size % stride:
        raise ValueError(f"block_size {block_size} must be a multiple of the antidiagonal stride {stride}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
    q_pad, k_pad = q_blocks * block_size, k_blocks * block_size
    qs = torch.nn.functional.pad(q.float(), (0, 0, 0, q_pad - q_len))
    ks = torch.nn.functional.pad(k.float(), (0, 0, 0, k_pad - k_len)).index_select(1, _on(kv_head_index, k.device))
    # Tile rows: queries t = 0..stride-1 of a tile against keys stride-1-t (the antidiagonal).
    q_tiles = qs.reshape(batch, heads, q_pad // stride, stride * dim)       # reshape: projections come transposed
    k_tiles = ks.reshape(batch, heads, k_pad // stride, stride, dim).flip(3).reshape(batch, heads, k_pad // stride,
                                                                                  stride * dim)
    tile_scores = (q_tiles @ k_tiles.transpose(-1, -2)) * (scale / stride) * temperature  # antidiagonal mean
    valid = torch.arange(k_pad, device=k.device) < k_len
    if key_valid is not None:
        valid = valid & torch.nn.functional.pad(key_valid, (0, k_pad - k_len))
    else:
        valid = valid.expand(batch, k_pad)
    tile_valid = valid.view(batch, k_pad // stride, stride).any(-1)            # [B, key tiles]
    tile_scores = tile_scores.masked_fill(~tile_valid.view(batch, 1, 1, -1), _NEG_INF)
    if causal:
        query_tile = q_offset + torch.arange(q_pad // stride, device=q.device).unsqueeze(1) * stride + stride - 1
        key_tile = torch.arange(k_pad // stride, device=k.device).unsqueeze(0) * stride
        tile_scores = tile_scores.masked_fill(key_tile > query_tile, _NEG_INF)
    probabilities = _softmax_rows(tile_scores)                                   # [B, H, q tiles, k tiles]
    per_block = block_size // stride
    mass = probabilities.view(batch, heads, q_blocks, per_block, k_blocks, per_block).sum((3, 5))
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)


#: Largest float32 score tile (elements) `query_mean_block_mass` builds at once: 64 Mi, 256 MiB.
QUERY_MEAN_TILE_ELEMENTS = 1 << 26


def query_mean_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                          scale: float | None = None, causal: bool = False, q_offset: int = 0,
                          key_valid: torch.Tensor | None = None, temperature: torch.Tensor | float = 1.0,
                          copies: "DeviceCopies | None" = None) -> torch.Tensor:
    """Estimated attention mass ``float32 [B, H, q_blocks, k_blocks]`` of each query block's mean query against every key.

    Only the queries are pooled: a block's mean query is scored against each key (scale and
    ``temperature`` in), softmax-normalised over the keys its last query may see, and the
    probabilities are summed per key block. A key block's mass then reflects the keys it holds,
    not their mean — a few strong keys in a block are found where pooled keys (``"mean"``
    scoring) average them away. Costs ``q_blocks x k_len x D`` per head (about ``1 / block``
    of dense attention's scores); the softmax of `query_mean_block_logits` (plain torch).

    Example:
        >>> q = torch.randn(1, 2, 64, 8)
        >>> mass = query_mean_block_mass(q, q[:, :1], block_size=16, kv_head_index=torch.tensor([0, 0]), causal=True)
        >>> mass.shape, bool(torch.allclose(mass.sum(-1), torch.ones(1, 2, 4)))
        (torch.Size([1, 2, 4, 4]), True)
    """
    return _softmax_rows(query_mean_block_logits(q, k, block_size=block_size, kv_head_index=kv_head_index, scale=scale,
                                                 causal=causal, q_offset=q_offset, key_valid=key_valid,
                                                 temperature=temperature, copies=copies, kernel="torch"))


def query_mean_block_logits(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                            scale: float | None = None, causal: bool = False, q_offset: int = 0,
                            key_valid: torch.Tensor | None = None, temperature: torch.Tensor | float = 1.0,
                            copies: "DeviceCopies | None" = None, kernel: str = "auto") -> torch.Tensor:
    """``float32 [B, H, q_blocks, k_blocks]``: ``log Σ exp(s)`` of each query block's mean-query scores ``s`` per key block.

    The scores are the block's mean query against each key, times ``scale`` and ``temperature``;
    keys after the block's last query (causal), invalid keys (``key_valid``) and padding are left
    out, and a key block with none gets ``-inf``. Their softmax over a row is
    `query_mean_block_mass`. ``kernel``: ``"triton"`` — one launch
    (`sparsify.estimator_kernels.query_mean_logits`); ``"torch"`` builds the scores in tiles of at
    most `QUERY_MEAN_TILE_ELEMENTS` (never ``[Sq, Sk]``), the query heads of one key/value head
    sharing its keys (no GQA copy); ``"auto"`` takes Triton for CUDA inputs it supports.
    ``kv_head_index`` is a CPU tensor (the torch path groups the heads on the host; ``copies``
    keeps the groups' device index tensors across calls).

    Example:
        >>> q = torch.randn(1, 2, 64, 8)
        >>> query_mean_block_logits(q, q[:, :1], block_size=16, kv_head_index=torch.tensor([0, 0]),
        ...                         causal=True)[0, 0, 0, 1].item()
        -inf
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
    kernel = _chosen_kernel(kernel, lambda: _triton_serves(q, block_size))
    query_means, _ = _blocked_mean(q, block_size)                                # float32 [B, H, Qb, D]
    if isinstance(temperature, torch.Tensor):
        query_means = query_means * (temperature.to(query_means.device, torch.float32).expand(1, heads, 1, 1) * scale)
    else:
        query_means = query_means * (float(temperature) * scale)
    if kernel == "triton":
        from sparsify.estimator_kernels import query_mean_logits

        return query_mean_logits(query_means, k, block_size=block_size, kv_head_index=_on(kv_head_index, q.device,
                                                                                           copies),
                                 q_len=q_len, causal=causal, q_offset=q_offset, key_valid=key_valid)
    # The last query of each block: the keys after it are hidden from the whole block (causal).
    last_query = q_offset + torch.clamp((torch.arange(q_blocks, device=q.device) + 1) * block_size, max=q_len) - 1
    hidden = None
    if causal:
        hidden = torch.arange(k_len, device=k.device).view(1, k_len) > last_query.view(q_blocks, 1)   # [Qb, Sk]
    invalid = None if key_valid is None else ~key_valid.view(batch, 1, k_len)
    logits = torch.empty(batch, heads, q_blocks, k_blocks, dtype=torch.float32, device=q.device)
    pad = k_blocks * block_size - k_len
    rows_per_tile = max(1, QUERY_MEAN_TILE_ELEMENTS // max(1, batch * k_len))
    grouped: dict[int, list[int]] = collections.defaultdict(list)
    for head, kv_head in enumerate(kv_head_index.tolist()):
        grouped[kv_head].append(head)
    for kv_head, members in grouped.items():
        index = _on(torch.tensor(members), q.device, copies)
        rows = query_means.index_select(1, index).reshape(batch, len(members) * q_blocks, dim)   # [B, g * Qb, D]
        keys_t = k[:, kv_head].float().transpose(-1, -2)                                         # [B, D, Sk]
        block_of_row = torch.arange(rows.shape[1], device=q.device) % q_blocks
        tiles = []
        for start in range(0, rows.shape[1], rows_per_tile):
            stop = min(rows.shape[1], start + rows_per_tile)
            scores = rows[:, start:stop] @ keys_t                                                  # [B, r, Sk]
            if hidden is not None:
                scores = scores.masked_fill(hidden.index_select(0, block_of_row[start:stop]), _NEG_INF)
            if invalid is not None:
                scores = scores.masked_fill(invalid, _NEG_INF)
            scores = torch.nn.functional.pad(scores, (0, pad), value=_NEG_INF)
            tiles.append(scores.view(batch, stop - start, k_blocks, block_size).logsumexp(-1))
        logits[:, index] = torch.cat(tiles, 1).view(batch, len(members), q_blocks, k_blocks)
    return logits


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; rows that are all ``-inf`` give zeros (not NaN)."""
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def coverage_block_lists(mass: torch.Tensor, coverage: torch.Tensor, min_blocks: torch.Tensor,
                         max_blocks: torch.Tensor) -> torch.Tensor:
    """Block lists ``int64 [B, H, Qb, max(max_blocks)]``: per row the fewest blocks (largest mass first) reaching ``coverage``.

    ``coverage``, ``min_blocks`` and ``max_blocks`` are per-head tensors ``[H]`` (``max_blocks``
    on the CPU: it fixes the width); the count is held between them (blocks with no mass are
    never kept beyond ``min_blocks``). Only the ``max_blocks`` best blocks of a row are ranked (a
    top-k; ties go to the lower block index), never the whole row. ``-1`` marks empty slots.

    Example:
        >>> mass = torch.tensor([[[[0.6, 0.3, 0.1]]]])
        >>> one = torch.ones(1, dtype=torch.long)
        >>> coverage_block_lists(mass, torch.tensor([0.8]), one, 3 * one).tolist()
        [[[[0, 1, -1]]]]
    """
    heads, k_blocks = mass.shape[1], mass.shape[-1]
    limit = max(1, min(int(max_blocks.max()), k_blocks))
    order = _top_indices(mass, limit)                                          # [B, H, Qb, limit]
    ordered = mass.gather(-1, order)
    before = ordered.cumsum(-1) - ordered                                       # mass of the better blocks
    rank = torch.arange(limit, device=mass.device)
    view = (1, heads, 1, 1)
    keep = before < _on(coverage, mass.device).to(mass.dtype).view(view)
    keep = keep & (ordered > 0)
    keep = keep | (rank < _on(min_blocks, mass.device).view(view))
    keep = keep & (rank < _on(max_blocks, mass.device).view(view))
    return torch.where(keep, order, -1)


def coverage_block_mask(mass: torch.Tensor, coverage: torch.Tensor, min_blocks: torch.Tensor,
                        max_blocks: torch.Tensor) -> torch.Tensor:
    """``bool [B, H, Qb, Kb]``: `coverage_block_lists` as a mask.

    Example:
        >>> mass = torch.tensor([[[[0.6, 0.3, 0.1]]]])
        >>> one = torch.ones(1, dtype=torch.long)
        >>> coverage_block_mask(mass, torch.tensor([0.8]), one, 3 * one).int().tolist()
        [[[[1, 1, 0]]]]
    """
    return block_lists_to_masks(coverage_block_lists(mass, coverage, min_blocks, max_blocks), mass.shape[-1])


def block_lists_to_masks(lists: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """``bool [..., k_blocks]``: the blocks named by block lists ``[..., slots]`` (entries outside ``[0, k_blocks)``: none).

    Example:
        >>> block_lists_to_masks(torch.tensor([[2, -1, 0]]), 3).int().tolist()
        [[1, 0, 1]]
    """
    target = torch.where((lists >= 0) & (lists < k_blocks), lists, k_blocks).long()
    masks = torch.zeros(*lists.shape[:-1], k_blocks + 1, dtype=torch.bool, device=lists.device)
    return masks.scatter_(-1, target, True)[..., :k_blocks]


def _top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``int64 [..., count]``: indices of the ``count`` largest of ``scores [..., n]``, largest first.

    ``scores`` are non-negative, with no ``-0.0`` or NaN (probabilities and sums of them).

    Equal scores come in ascending index order (what a stable descending sort gives): the
    top-k runs on one int64 key per entry, the score's float32 bits above the reversed index.
    """
    n = scores.shape[-1]
    bits = scores.to(torch.float32).contiguous().view(torch.int32).long()   # ordered like the scores (>= +0)
    key = torch.add(n - 1 - torch.arange(n, device=scores.device), bits, alpha=1 << 32)
    return (n - 1) - key.topk(count, dim=-1).values.bitwise_and(0xFFFFFFFF)


def self_blocks(q_len: int, k_len: int, block_size: int, q_offset: int, device) -> torch.Tensor:
    """``bool [q_blocks, k_blocks]``: the key blocks holding the queries' own positions (self attention).

    Example:
        >>> self_blocks(32, 32, 16, 0, "cpu").int().tolist()
        [[1, 0], [0, 1]]
    """
    query_first, query_last, _, _ = block_token_bounds(q_len, k_len, block_size, q_offset, device)
    key = torch.arange(blocks_for(k_len, block_size), device=device).unsqueeze(0)
    return (key >= query_first // block_size) & (key <= query_last // block_size)


def vertical_slash_line_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                             probe_rows: int, scale: float | None = None, causal: bool = False, q_offset: int = 0,
                             key_valid: torch.Tensor | None = None,
                             kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(column_mass [B, H, Kb], diagonal_mass [B, H, Kb + total_blocks])`` of the last ``probe_rows`` queries.

    The probe queries attend to every key they may see; ``column_mass[J]`` is their probability mass
    in key block ``J`` (vertical lines), ``diagonal_mass[o + Kb - 1]`` the mass on block diagonal
    ``o`` = (absolute query block) - (key block), ``o`` from ``-(Kb - 1)`` to ``total_blocks``, which
    holds the token offsets ``query - key`` in ``[(o - 1) * block, (o + 1) * block)`` (slash lines).

    Both come from one ``[B, H, Kb, classes]`` tensor: each key block's mass split by offset class
    (`_probe_split_torch`). ``kernel``: ``"triton"`` computes it with the fused kernel of
    `sparsify.estimator_kernels` (scores recomputed tile by tile in float32, no ``probe x Sk``
    tensor), ``"torch"`` with one ``probe x Sk x D`` matmul in the inputs' dtype, a softmax and
    a small matmul per tile; ``"auto"`` takes Triton for CUDA inputs it supports.
    """
    kernel = _chosen_kernel(kernel, lambda: _triton_serves(q, block_size))
    return _line_mass_of_split(*_vertical_slash_probe(
        q, k, kernel, block_size=block_size, kv_head_index=kv_head_index, probe_rows=probe_rows, scale=scale,
        causal=causal, q_offset=q_offset, key_valid=key_valid))


def _probe_split(q: torch.Tensor, k: torch.Tensor, kernel: str, **arguments) -> torch.Tensor:
    """The probe's ``[B, H, Kb, classes]`` split, by the fused kernel (``"triton"``) or in plain torch."""
    if kernel == "triton":
        from sparsify.estimator_kernels import probe_block_split

        return probe_block_split(q, k, **arguments)
    return _probe_split_torch(q, k, **arguments)


def _line_mass_of_split(split: torch.Tensor, first_block: int, total_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column_mass, diagonal_mass)`` of a probe split whose first probe row lies in (absolute) block ``first_block``."""
    batch, heads, k_blocks, _ = split.shape
    column_mass = split.sum(-1)
    # Class t of key block J is offset tile m - J + (t - 1) (m: the first probe row's block), stored at
    # m - J + t - 1 + Kb: for each class, the key blocks in reverse land on consecutive tiles (no scatter).
    tiles = torch.zeros(batch, heads, k_blocks + total_blocks + 1, device=split.device, dtype=torch.float32)
    reversed_split = split.flip(2)
    for offset_class in range(split.shape[-1]):
        start = first_block + offset_class
        tiles[..., start:start + k_blocks] += reversed_split[..., offset_class]
    # Diagonal o (from -(Kb - 1) to total_blocks) holds offset tiles o - 1 and o, stored at o - 1 + Kb and o + Kb.
    return column_mass, tiles[..., :-1] + tiles[..., 1:]


def _triton_serves(q: torch.Tensor, block_size: int) -> bool:
    """Whether the estimator kernels (probe, block means, query-mean logits) take these inputs (CUDA, Triton installed,
    a block size, head dim and dtype they support)."""
    if q.device.type != "cuda" or not _TRITON_INSTALLED:
        return False
    from sparsify.estimator_kernels import supports

    return supports(block_size, q.shape[-1], q.dtype)


def _chosen_kernel(kernel: str, triton_serves) -> str:
    """``kernel`` checked (``"auto"``, ``"torch"`` or ``"triton"``); ``"auto"`` is ``"triton"`` where ``triton_serves()``."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
    if kernel == "auto":
        return "triton" if triton_serves() else "torch"
    return kernel


def _vertical_slash_probe(q: torch.Tensor, k: torch.Tensor, kernel: str, *, block_size: int,
                          kv_head_index: torch.Tensor, probe_rows: int, scale: float | None, causal: bool,
                          q_offset: int, key_valid: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    """``(split, first_block, total_blocks)``: the probe's split (`_probe_split`) of the last ``probe_rows`` queries
    (at least one, at most ``q_len``; ``scale`` defaults to ``1/sqrt(D)``), the absolute block of its first row and
    the blocks up to the last query."""
    q_len = q.shape[2]
    probe_rows = max(1, min(probe_rows, q_len))
    split = _probe_split(q, k, kernel, block_size=block_size, kv_head_index=kv_head_index, probe_rows=probe_rows,
                         scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, causal=causal,
                         q_offset=q_offset, key_valid=key_valid)
    return split, (q_offset + q_len - probe_rows) // block_size, blocks_for(q_offset + q_len, block_size)


def _probe_split_torch(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                       probe_rows: int, scale: float, causal: bool, q_offset: int,
                       key_valid: torch.Tensor | None) -> torch.Tensor:
    """``float32 [B, H, Kb, classes]``: each key block's probe mass split by offset class, in plain torch.

    Cost: one ``probe x Sk x D`` matmul in the inputs' dtype (grouped query heads share their key
    head: no GQA copy of the keys), one softmax, and one pass over the probabilities that splits each
    (probe rows x key block) tile by offset class with a small matmul — no per-element scatter.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    device = q.device
    k_blocks = blocks_for(k_len, block_size)
    probe = q[:, :, q_len - probe_rows:] * scale
    group = heads // kv_heads if heads % kv_heads == 0 else 0
    regular = (kv_head_index.device.type == "cpu" and group > 0
               and torch.equal(kv_head_index.long(), torch.arange(kv_heads).repeat_interleave(group)))
    if regular:   # query head h reads key head h // group: the group's probe rows are rows of one matmul
        scores = (probe.reshape(batch, kv_heads, group * probe_rows, dim) @ k.transpose(-1, -2)).view(
            batch, heads, probe_rows, k_len)
    else:
        scores = probe @ k.index_select(1, _on(kv_head_index, k.device)).transpose(-1, -2)     # [B, H, P, Sk]
    base = q_offset + q_len - probe_rows                                   # absolute position of the first probe row
    if causal and base + 1 < k_len:                                        # keys after a row's own position
        width = k_len - base - 1
        later = torch.arange(width, device=device).unsqueeze(0) >= torch.arange(probe_rows, device=device).unsqueeze(1)
        scores[..., base + 1:].masked_fill_(later, _NEG_INF)
    if key_valid is not None:
        scores.masked_fill_(~key_valid.view(batch, 1, 1, k_len), _NEG_INF)
    probabilities = torch.softmax(scores, dim=-1)
    if key_valid is not None:                    # a probe row sees key 0 unless padding hides it
        probabilities.nan_to_num_(0.0)           # rows that see nothing: zeros
    # Row r, key J * block + c lies at token offset d = base + r - J * block - c; with base = m * block + shift,
    # its offset tile floor(d / block) is m - J + e, e = floor((shift + r - c) / block): a few classes per tile.
    first_block, shift = divmod(base, block_size)
    rows = torch.arange(probe_rows, device=device).view(-1, 1)
    columns = torch.arange(block_size, device=device).view(1, -1)
    offset_class = torch.div(shift + rows - columns, block_size, rounding_mode="floor") + 1   # >= 0
    classes = (shift + probe_rows - 1) // block_size + 2
    weights = torch.nn.functional.one_hot(offset_class, classes).to(probabilities.dtype)    # [P, block, classes]
    full = k_len // block_size
    parts = []
    if full:
        tiles = probabilities[..., :full * block_size].view(batch, heads, probe_rows, full, block_size)
        parts.append((tiles @ weights.unsqueeze(0).unsqueeze(0)).float().sum(2))            # [B, H, full, classes]
    if full < k_blocks:                                                                    # the partial last block
        tail = probabilities[..., full * block_size:].unsqueeze(3)                         # [B, H, P, 1, rest]
        rest = tail.shape[-1]
        parts.append((tail @ weights[:, :rest].unsqueeze(0).unsqueeze(0)).float().sum(2))
    split = torch.cat(parts, 2)                                                            # [B, H, Kb, classes]
    return split


def vertical_slash_block_lists(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                               vertical: torch.Tensor, slash: torch.Tensor, probe_rows: int,
                               scale: float | None = None, causal: bool = False, q_offset: int = 0,
                               key_valid: torch.Tensor | None = None, sink_blocks: torch.Tensor | None = None,
                               kernel: str = "auto", copies: "DeviceCopies | None" = None) -> torch.Tensor:
    """Block lists ``int64 [B, H, Qb, slots]`` of MInference's vertical-slash lines, estimated from the last ``probe_rows`` queries.

    The probe queries attend to every key (`vertical_slash_line_mass`); per head the top
    ``ceil(vertical[h] * k_blocks)`` key blocks and ``ceil(slash[h] * diagonals)`` block diagonals
    are kept (at least one of each). A vertical-slash mask is a union of columns and diagonals,
    so query block ``I`` (absolute block ``a``) keeps the top key blocks and ``a - o`` for every
    top diagonal ``o``: slots = top columns + top diagonals (+ the own block when causal, + the
    first ``sink_blocks[h]`` key blocks). ``vertical``, ``slash`` and ``sink_blocks`` are per-head
    CPU tensors (the counts fix the widths on the host). ``kernel``: ``"triton"`` runs
    the probe, the choice of lines and the lists as four Triton launches (`sparsify.estimator_kernels`),
    ``"torch"`` in plain torch, ``"auto"`` Triton for CUDA inputs it supports; ``copies`` (a
    `DeviceCopies`) keeps the per-head counts' device copies across calls.

    Example:
        >>> q = torch.randn(1, 1, 64, 8)
        >>> lists = vertical_slash_block_lists(q, q, block_size=16, kv_head_index=torch.tensor([0]),
        ...                                    vertical=torch.tensor([0.25]), slash=torch.tensor([0.25]),
        ...                                    probe_rows=16, causal=True)
        >>> lists.shape                                  # 1 column + 2 of the 8 diagonals + the own block
        torch.Size([1, 1, 4, 4])
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
    device = q.device
    total_blocks = blocks_for(q_offset + q_len, block_size)
    kernel = _chosen_kernel(
        kernel, lambda: _triton_serves(q, block_size) and _lines_kernel_serves(k_blocks, total_blocks))
    if kernel == "triton":
        # Two probe launches, one top-lines launch, one list launch (sparsify.estimator_kernels): four in all.
        from sparsify.estimator_kernels import top_lines_of_split, vertical_slash_lists_of_lines

        split, first_block, _ = _vertical_slash_probe(
            q, k, "triton", block_size=block_size, kv_head_index=_on(kv_head_index.to(torch.int64), device, copies),
            probe_rows=probe_rows, scale=scale, causal=causal, q_offset=q_offset, key_valid=key_valid)
        column_count, column_limit = _line_counts(vertical, k_blocks)
        slash_count, slash_limit = _line_counts(slash, k_blocks + total_blocks)
        columns, diagonals = top_lines_of_split(
            split, first_block=first_block, total_blocks=total_blocks,
            column_count=_on(column_count.to(torch.int32), device, copies),
            slash_count=_on(slash_count.to(torch.int32), device, copies),
            column_limit=column_limit, slash_limit=slash_limit)
        sinks = torch.zeros(heads, dtype=torch.int32) if sink_blocks is None else sink_blocks.cpu().to(torch.int32)
        return vertical_slash_lists_of_lines(columns, diagonals, _on(sinks, device, copies),
                                             sink_width=max(0, min(int(sinks.max()), k_blocks)), q_blocks=q_blocks,
                                             k_blocks=k_blocks, q_offset=q_offset, block_size=block_size, causal=causal)
    column_mass, diagonal_mass = vertical_slash_line_mass(
        q, k, block_size=block_size, kv_head_index=kv_head_index, probe_rows=probe_rows, scale=scale,
        causal=causal, q_offset=q_offset, key_valid=key_valid, kernel="torch")
    columns = _top_lines(column_mass, vertical)                                   # [B, H, V] key blocks
    diagonals = _top_lines(diagonal_mass, slash)                                  # [B, H, S] diagonal slots
    # Block (I, J) lies on block diagonal (absolute query block of I) - J; slot o + Kb - 1 holds diagonal o.
    query_block = block_token_bounds(q_len, k_len, block_size, q_offset, device)[0] // block_size    # [Qb, 1]
    diagonals = diagonals.unsqueeze(2)
    on_slash = torch.where(diagonals >= 0, query_block.view(1, 1, q_blocks, 1) + (k_blocks - 1) - diagonals, -1)
    lists = [columns.unsqueeze(2).expand(batch, heads, q_blocks, -1), on_slash]
    if causal:
        # The probe rows are the last ones: their top lines can miss everything the first query blocks may see
        # (a row of the causal triangle sees only the blocks up to its own). Every row keeps its own diagonal
        # block, so none is left empty (for self attention the mask source adds it anyway).
        lists.append(query_block.view(1, 1, q_blocks, 1).expand(batch, heads, q_blocks, 1))
    if sink_blocks is not None:
        lists.append(sink_block_lists(sink_blocks.long(), lists[0], k_blocks))
    return torch.cat(lists, -1)


def sink_block_lists(sink_blocks: torch.Tensor, like: torch.Tensor, k_blocks: int,
                     copies: "DeviceCopies | None" = None) -> torch.Tensor:
    """Block lists ``int64`` shaped like ``like [B, H, Qb, *]``: the first ``sink_blocks[h]`` (a CPU tensor) key blocks of every row.

    Example:
        >>> sink_block_lists(torch.tensor([1, 2]), torch.zeros(1, 2, 1, 0), 8).tolist()
        [[[[0, -1]], [[0, 1]]]]
    """
    batch, heads, q_blocks = like.shape[:3]
    most = max(0, min(int(sink_blocks.max()), k_blocks))
    columns = torch.arange(most, device=like.device)
    columns = torch.where(columns < _on(sink_blocks, like.device, copies).view(heads, 1), columns, -1)
    return columns.view(1, heads, 1, most).expand(batch, heads, q_blocks, most)


class DeviceCopies:
    """Device copies of small host tensors (per-head parameters, line counts), made once per content and device.

    An estimate per call would otherwise copy the same few per-head values to the device every
    time (a host-to-device copy each, on the host's clock). The owner of the estimators' inputs
    (`sparsify.runtime.mask_source.AdaptiveMaskSource`) keeps one and hands it to every estimate;
    the cache is keyed by the values themselves, so a copy is never stale. Bounded (oldest first).

    Example:
        >>> copies = DeviceCopies()
        >>> first = copies.of(torch.tensor([1, 2]), torch.device("cpu"))
        >>> first is copies.of(torch.tensor([1, 2]), torch.device("cpu"))
        True
    """

    def __init__(self, size: int = 64):
        self.size = size
        self._copies: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()

    def of(self, values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """``values`` (a small host tensor) on ``device``; a device tensor is moved as it is."""
        device = torch.device(device)
        if values.device.type != "cpu":
            return values.to(device, non_blocking=True)
        key = (values.dtype, tuple(values.shape), tuple(values.flatten().tolist()), str(device))
        copy = self._copies.get(key)
        if copy is None:
            copy = values.to(device, non_blocking=True)
            if len(self._copies) >= self.size:
                self._copies.popitem(last=False)
            self._copies[key] = copy
        return copy


def _on(values: torch.Tensor, device: torch.device, copies: DeviceCopies | None = None) -> torch.Tensor:
    """A small per-head tensor on ``device``: a cached copy (``copies``), else copied without waiting (no stream sync)."""
    if copies is not None:
        return copies.of(values, device)
    return values.to(device, non_blocking=True)


def vertical_slash_block_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                              vertical: torch.Tensor, slash: torch.Tensor, probe_rows: int,
                              scale: float | None = None, causal: bool = False, q_offset: int = 0,
                              key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``bool [B, H, Qb, Kb]``: `vertical_slash_block_lists` as a mask.

    Example:
        >>> q = torch.randn(1, 1, 64, 8)
        >>> mask = vertical_slash_block_mask(q, q, block_size=16, kv_head_index=torch.tensor([0]),
        ...                                  vertical=torch.tensor([0.25]), slash=torch.tensor([0.25]),
        ...                                  probe_rows=16, causal=True)
        >>> mask.shape
        torch.Size([1, 1, 4, 4])
    """
    lists = vertical_slash_block_lists(q, k, block_size=block_size, kv_head_index=kv_head_index, vertical=vertical,
                                       slash=slash, probe_rows=probe_rows, scale=scale, causal=causal,
                                       q_offset=q_offset, key_valid=key_valid)
    return block_lists_to_masks(lists, blocks_for(k.shape[2], block_size))


def _line_counts(fraction: torch.Tensor, lines: int) -> tuple[torch.Tensor, int]:
    """Per head ``ceil(fraction[h] * lines)`` (at least one; a CPU tensor) and the widest, at most ``lines``."""
    count = torch.ceil(fraction.cpu().to(torch.float32) * lines).clamp(min=1).long()
    return count, min(int(count.max()), lines)


def _coverage_kernel_serves(k_blocks: int) -> bool:
    from sparsify.estimator_kernels import supports_coverage

    return supports_coverage(k_blocks)


def _lines_kernel_serves(k_blocks: int, total_blocks: int) -> bool:
    from sparsify.estimator_kernels import supports_lines

    return supports_lines(k_blocks, total_blocks)


def _top_lines(scores: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """``int64 [B, H, max count]``: per head the ``ceil(fraction[h] * n)`` best of ``scores [B, H, n]`` (at least one), ``-1`` past it."""
    count, limit = _line_counts(fraction, scores.shape[-1])
    top = _top_indices(scores, limit)
    rank = torch.arange(limit, device=scores.device)
    return torch.where(rank < _on(count, scores.device).view(1, -1, 1), top, -1)
