"""Input-adaptive block masks estimated on the device, per call: pooled block scores and estimated vertical-slash lines.

Every function here works on a batch of heads at once, keeps everything on the inputs' device and
never reads a device value on the host, so a compiled model can estimate its masks per input
without a synchronisation. Heads may carry different parameters (one value per head in a
tensor). Shapes: ``q`` ``[B, H, Sq, D]``; ``k`` ``[B, Hkv, Sk, D]`` with query head ``h`` reading
key head ``kv_head_index[h]``; masks come out as ``bool [B, H, q_blocks, k_blocks]``.

Nothing of size ``Sq x Sk`` is built: pooled scoring costs ``q_blocks x k_blocks x D`` per head
(about ``1 / block²`` of dense attention), antidiagonal scoring ``1 / stride`` of it, and the
vertical-slash probe ``probe_rows x Sk x D``.
"""

from __future__ import annotations

import math

import torch

from sparsify.block_mask import block_geometry, block_token_bounds, blocks_for

__all__ = [
    "antidiagonal_block_mass",
    "coverage_block_mask",
    "key_validity",
    "pooled_block_mass",
    "self_blocks",
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
    """Mean of ``x [B, H, S, D]`` over each block of rows (valid rows only) and the valid-row count ``[B, H|1, n]``."""
    batch, heads, length, dim = x.shape
    blocks = blocks_for(length, block_size)
    padded = blocks * block_size
    weights = torch.ones(batch, 1, length, 1, device=x.device, dtype=torch.float32)
    if valid is not None:
        weights = valid.to(torch.float32).view(batch, 1, length, 1)
    x = x.float() * weights
    if padded != length:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))
        weights = torch.nn.functional.pad(weights, (0, 0, 0, padded - length))
    sums = x.view(batch, heads, blocks, block_size, dim).sum(3)
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
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    query_means, _ = _blocked_mean(q, block_size)
    key_means, key_counts = _blocked_mean(k, block_size, key_valid)
    key_means = key_means.index_select(1, kv_head_index.to(k.device))
    logits = ((query_means @ key_means.transpose(-1, -2)) * scale * temperature
              + key_counts.clamp_min(1e-30).log().unsqueeze(2))
    logits = _hide(logits, key_counts, q.shape[2], k.shape[2], block_size, causal, q_offset)
    return _softmax_rows(logits)


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
    ks = torch.nn.functional.pad(k.float(), (0, 0, 0, k_pad - k_len)).index_select(1, kv_head_index.to(k.device))
    # Tile rows: queries t = 0..stride-1 of a tile against keys stride-1-t (the antidiagonal).
    q_tiles = qs.view(batch, heads, q_pad // stride, stride * dim)
    k_tiles = ks.view(batch, heads, k_pad // stride, stride, dim).flip(3).reshape(batch, heads, k_pad // stride,
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


def _hide(logits, key_counts, q_len, k_len, block_size, causal, q_offset):
    visible, _ = block_geometry(q_len, k_len, block_size, causal, q_offset, logits.device)
    logits = logits.masked_fill(~visible, _NEG_INF)
    return logits.masked_fill((key_counts == 0).unsqueeze(2), _NEG_INF)


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; rows that are all ``-inf`` give zeros (not NaN)."""
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def coverage_block_mask(mass: torch.Tensor, coverage: torch.Tensor, min_blocks: torch.Tensor,
                        max_blocks: torch.Tensor) -> torch.Tensor:
    """``bool [B, H, Qb, Kb]``: per row the fewest blocks (largest mass first) whose mass reaches ``coverage``.

    ``coverage``, ``min_blocks`` and ``max_blocks`` are per-head tensors ``[H]``; the count is held
    between them (blocks with no mass are never kept beyond ``min_blocks``).

    Example:
        >>> mass = torch.tensor([[[[0.6, 0.3, 0.1]]]])
        >>> one = torch.ones(1, dtype=torch.long)
        >>> coverage_block_mask(mass, torch.tensor([0.8]), one, 3 * one).int().tolist()
        [[[[1, 1, 0]]]]
    """
    heads = mass.shape[1]
    ordered, order = mass.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered                                       # mass of the better blocks
    rank = torch.arange(mass.shape[-1], device=mass.device)
    view = (1, heads, 1, 1)
    keep = before < coverage.to(mass.device, mass.dtype).view(view)
    keep = keep & (ordered > 0)
    keep = keep | (rank < min_blocks.to(mass.device).view(view))
    keep = keep & (rank < max_blocks.to(mass.device).view(view))
    return torch.zeros_like(keep).scatter(-1, order, keep)


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
                             key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column_mass [B, H, Kb], diagonal_mass [B, H, Kb + total_blocks])`` of the last ``probe_rows`` queries.

    The probe queries attend to every key they may see; ``column_mass[J]`` is their probability mass
    in key block ``J`` (vertical lines), ``diagonal_mass[o + Kb - 1]`` the mass on block diagonal
    ``o`` = (absolute query block) - (key block), ``o`` from ``-(Kb - 1)`` to ``total_blocks``, which
    holds the token offsets ``query - key`` in ``[(o - 1) * block, (o + 1) * block)`` (slash lines).

    Cost: one ``probe x Sk x D`` matmul in the inputs' dtype (grouped query heads share their key
    head: no GQA copy of the keys), one softmax, and one pass over the probabilities that splits each
    (probe rows x key block) tile by offset class with a small matmul — no per-element scatter.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    device = q.device
    k_blocks = blocks_for(k_len, block_size)
    total_blocks = blocks_for(q_offset + q_len, block_size)
    probe_rows = max(1, min(probe_rows, q_len))
    probe = q[:, :, q_len - probe_rows:] * scale
    group = heads // kv_heads if heads % kv_heads == 0 else 0
    regular = (kv_head_index.device.type == "cpu" and group > 0
               and torch.equal(kv_head_index.long(), torch.arange(kv_heads).repeat_interleave(group)))
    if regular:   # query head h reads key head h // group: the group's probe rows are rows of one matmul
        scores = (probe.reshape(batch, kv_heads, group * probe_rows, dim) @ k.transpose(-1, -2)).view(
            batch, heads, probe_rows, k_len)
    else:
        scores = probe @ k.index_select(1, kv_head_index.to(k.device)).transpose(-1, -2)     # [B, H, P, Sk]
    base = q_offset + q_len - probe_rows                                   # absolute position of the first probe row
    if causal and base + 1 < k_len:                                        # keys after a row's own position
        width = k_len - base - 1
        later = torch.arange(width, device=device).unsqueeze(0) >= torch.arange(probe_rows, device=device).unsqueeze(1)
        scores[..., base + 1:].masked_fill_(later, _NEG_INF)
    if key_valid is not None:
        scores.masked_fill_(~key_valid.view(batch, 1, 1, k_len), _NEG_INF)
    probabilities = torch.softmax(scores, dim=-1).nan_to_num_(0.0)       # rows that see nothing: zeros
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
    column_mass = split.sum(-1)
    # Tile index (offset tile + Kb, as offsets run from -Kb * block): m - J + (class - 1) + Kb.
    tile_index = (first_block + k_blocks - 1 - torch.arange(k_blocks, device=device).view(-1, 1)
                  + torch.arange(classes, device=device).view(1, -1))                       # [Kb, classes]
    tiles = torch.zeros(batch, heads, k_blocks + total_blocks + 1, device=device, dtype=torch.float32)
    tiles.scatter_add_(2, tile_index.reshape(1, 1, -1).expand(batch, heads, -1), split.reshape(batch, heads, -1))
    diagonals = torch.arange(-(k_blocks - 1), total_blocks + 1, device=device)
    diagonal_mass = tiles[..., diagonals - 1 + k_blocks] + tiles[..., diagonals + k_blocks]
    return column_mass, diagonal_mass


def vertical_slash_block_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int, kv_head_index: torch.Tensor,
                              vertical: torch.Tensor, slash: torch.Tensor, probe_rows: int,
                              scale: float | None = None, causal: bool = False, q_offset: int = 0,
                              key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``bool [B, H, Qb, Kb]``: MInference's vertical-slash lines, estimated from the last ``probe_rows`` queries.

    The probe queries attend to every key (`vertical_slash_line_mass`); per head the top
    ``ceil(vertical[h] * k_blocks)`` key blocks and ``ceil(slash[h] * diagonals)`` block diagonals
    are kept (at least one of each).

    Example:
        >>> q = torch.randn(1, 1, 64, 8)
        >>> mask = vertical_slash_block_mask(q, q, block_size=16, kv_head_index=torch.tensor([0]),
        ...                                  vertical=torch.tensor([0.25]), slash=torch.tensor([0.25]),
        ...                                  probe_rows=16, causal=True)
        >>> mask.shape
        torch.Size([1, 1, 4, 4])
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
    device = q.device
    column_mass, diagonal_mass = vertical_slash_line_mass(
        q, k, block_size=block_size, kv_head_index=kv_head_index, probe_rows=probe_rows, scale=scale, causal=causal,
        q_offset=q_offset, key_valid=key_valid)
    vertical_keep = _top_fraction(column_mass, vertical, heads)
    slash_keep = _top_fraction(diagonal_mass, slash, heads)
    # Block (I, J) lies on block diagonal (absolute query block of I) - J.
    query_first = block_token_bounds(q_len, k_len, block_size, q_offset, device)[0]
    diagonal_of = query_first // block_size - torch.arange(k_blocks, device=device).unsqueeze(0)
    diagonal_index = (diagonal_of + (k_blocks - 1)).clamp(0, diagonal_mass.shape[-1] - 1)      # [Qb, Kb]
    on_slash = slash_keep.gather(2, diagonal_index.reshape(1, 1, -1).expand(batch, heads, -1))
    return vertical_keep.unsqueeze(2) | on_slash.view(batch, heads, q_blocks, k_blocks)


def _top_fraction(scores: torch.Tensor, fraction: torch.Tensor, heads: int) -> torch.Tensor:
    """``bool`` like ``scores [B, H, n]``: its ``ceil(fraction[h] * n)`` largest entries per head (at least one)."""
    count = torch.ceil(fraction.to(scores.device, torch.float32) * scores.shape[-1]).clamp(min=1).long()
    order = scores.argsort(dim=-1, descending=True, stable=True)
    keep_sorted = (torch.arange(scores.shape[-1], device=scores.device) < count.view(1, heads, 1)).expand_as(order)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
