"""Attention statistics the search needs, computed chunk by chunk: block-pooled mass and candidate errors.

Everything here works on one site's ``q``, ``k``, ``v`` of one calibration batch and never holds a
``seq × seq`` tensor: query rows are processed in chunks, probabilities are pooled into key blocks
on the fly. The key identity is that for a block mask ``m`` (constant over a key block ``J``) the
masked attention output of a query row ``r`` is ::

    out_r = Σ_J m[J] · N[r, J] / Σ_J m[J] · Z[r, J]
    with Z[r, J] = Σ_{j ∈ J} p[r, j] and N[r, J] = Σ_{j ∈ J} p[r, j] · v_j

where ``p`` are the dense probabilities. So the output of *any* candidate block mask costs
``rows × key_blocks × head_dim`` instead of ``rows × keys × head_dim``: the search scores many
candidates per head for about the price of one dense attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch

# Scores of one chunk are kept under this many bytes (the chunk holds rows × keys per head).
CHUNK_BYTES = 64 * 2**20


@dataclasses.dataclass
class ProbabilityChunk:
    """Dense attention of a block of query rows: probabilities pooled per key block, and the output."""

    row_start: int
    row_end: int
    pooled: torch.Tensor  # Z: [batch, heads, rows, key_blocks] probability mass per key block
    block_values: torch.Tensor | None  # N: [batch, heads, key_blocks, rows, value_dim] or None
    output: torch.Tensor  # dense attention output [batch, heads, rows, value_dim]


def probability_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
    scale: float | None, block_size: int, *, with_block_values: bool, chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[ProbabilityChunk]:
    """Dense attention in chunks of whole query blocks, pooled over key blocks.

    ``q`` ``[B, H, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` (query head h reads kv head
    ``h // (H // Hkv)``), ``attn_mask`` bool/additive broadcastable to ``[B, H, Sq, Sk]``.
    Computes in float32 (float64 inputs stay float64).

    Example:
        >>> q = torch.randn(1, 2, 100, 8)
        >>> chunks = list(probability_chunks(q, q, q, None, True, None, 32, with_block_values=False))
        >>> sum(c.row_end - c.row_start for c in chunks), chunks[0].pooled.shape[-1]
        (100, 4)
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[-2]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = heads // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, 1)
        v = v.repeat_interleave(group, 1)
    k = k.to(compute_dtype)
    v = v.to(compute_dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k_blocks = -(-k_len // block_size)
    padded_keys = k_blocks * block_size
    value_blocks = torch.nn.functional.pad(v, (0, 0, 0, padded_keys - k_len)).view(batch, heads, k_blocks, block_size, -1)
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    bytes_per_row = batch * heads * padded_keys * 4 * (3 if with_block_values else 2)
    if with_block_values:
        bytes_per_row += batch * heads * k_blocks * v.shape[-1] * 4
    rows = max(block_size, (chunk_bytes // max(bytes_per_row, 1)) // block_size * block_size)
    for row_start in range(0, q_len, rows):
        row_end = min(q_len, row_start + rows)
        scores = (q[:, :, row_start:row_end].to(compute_dtype) @ k.transpose(-2, -1)) * scale
        if attn_mask is not None:
            mask = attn_mask[..., row_start:row_end, :] if attn_mask.shape[-2] > 1 else attn_mask
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(compute_dtype)
        if is_causal:
            query_positions = torch.arange(row_start, row_end, device=q.device).unsqueeze(-1)
            future = torch.arange(k_len, device=q.device) > query_positions
            scores = scores.masked_fill(future, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
        del scores
        output = probabilities @ v
        padded = torch.nn.functional.pad(probabilities, (0, padded_keys - k_len))
        blocked = padded.view(batch, heads, row_end - row_start, k_blocks, block_size)
        pooled = blocked.sum(-1)
        block_values = None
        if with_block_values:
            # N[b, h, J, r, :] = p[b, h, r, J-block] @ v[b, h, J-block]
            block_values = blocked.permute(0, 1, 3, 2, 4) @ value_blocks
        yield ProbabilityChunk(row_start, row_end, pooled, block_values, output)


def pool_query_blocks(pooled: torch.Tensor, row_start: int, block_size: int) -> torch.Tensor:
    """Sum ``[B, H, rows, key_blocks]`` over batch and the rows of each query block → ``[H, q_blocks_in_chunk, key_blocks]``."""
    batch, heads, rows, k_blocks = pooled.shape
    padded_rows = -(-rows // block_size) * block_size
    padded = torch.nn.functional.pad(pooled, (0, 0, 0, padded_rows - rows))
    return padded.view(batch, heads, padded_rows // block_size, block_size, k_blocks).sum((0, 3))


@dataclasses.dataclass
class BlockMassProfile:
    """Block-pooled attention probability mass of one site, per head, at one sequence length.

    ``mass[h, I, J]`` is the probability that query rows of block ``I`` give to keys of block
    ``J``, summed over rows and calibration batches; ``rows`` counts the rows summed (so
    ``mass[h].sum() == rows`` up to fully masked rows).
    """

    q_len: int
    k_len: int
    block_size: int
    mass: torch.Tensor  # float64 [heads, q_blocks, k_blocks]
    rows: int = 0

    @classmethod
    def empty(cls, heads: int, q_len: int, k_len: int, block_size: int) -> "BlockMassProfile":
        q_blocks, k_blocks = -(-q_len // block_size), -(-k_len // block_size)
        return cls(q_len, k_len, block_size, torch.zeros(heads, q_blocks, k_blocks, dtype=torch.float64))

    def add(self, q, k, v, attn_mask, is_causal, scale) -> None:
        """Accumulate one batch of a site's inputs."""
        for chunk in probability_chunks(q, k, v, attn_mask, is_causal, scale, self.block_size, with_block_values=False):
            first_block = chunk.row_start // self.block_size
            pooled = pool_query_blocks(chunk.pooled, chunk.row_start, self.block_size).to(torch.float64)
            self.mass[:, first_block:first_block + pooled.shape[1]] += pooled.cpu()
        self.rows += q.shape[0] * q.shape[2]

    def normalized(self) -> torch.Tensor:
        """Mass per head scaled to sum to 1 (the attention map at block resolution)."""
        total = self.mass.sum((-2, -1), keepdim=True).clamp_min(1e-30)
        return self.mass / total

    def recall(self, masks: torch.Tensor) -> torch.Tensor:
        """Fraction of each head's mass inside ``masks`` (``[heads, C, q_blocks, k_blocks]`` → ``[heads, C]``)."""
        kept = (self.mass.unsqueeze(1) * masks.to(torch.float64)).sum((-2, -1))
        return kept / self.mass.sum((-2, -1)).unsqueeze(1).clamp_min(1e-30)


@dataclasses.dataclass
class CandidateErrors:
    """Per head and candidate: squared output error and kept mass, summed over held-out batches.

    ``relative_error(h)`` is ``sqrt(squared_error / output_norm²)`` of head ``h``'s output,
    ``recall(h)`` the kept share of its attention mass.
    """

    squared_error: list[torch.Tensor]  # per head: float64 [candidates]
    kept_mass: list[torch.Tensor]  # per head: float64 [candidates]
    output_norm: torch.Tensor  # float64 [heads]: Σ ||dense output||²
    total_mass: torch.Tensor  # float64 [heads]

    @classmethod
    def empty(cls, candidates_per_head: list[int]) -> "CandidateErrors":
        heads = len(candidates_per_head)
        return cls([torch.zeros(c, dtype=torch.float64) for c in candidates_per_head],
                   [torch.zeros(c, dtype=torch.float64) for c in candidates_per_head],
                   torch.zeros(heads, dtype=torch.float64), torch.zeros(heads, dtype=torch.float64))

    def add(self, q, k, v, attn_mask, is_causal, scale, block_size: int, head_masks: list[torch.Tensor],
            skip_candidates: list[torch.Tensor] | None = None) -> None:
        """Score every candidate of every head on one batch.

        ``head_masks[h]`` is ``bool [candidates, q_blocks, k_blocks]`` at this batch's lengths;
        ``skip_candidates[h]`` (bool ``[candidates]``) marks candidates that drop the head (output 0).
        """
        for chunk in probability_chunks(q, k, v, attn_mask, is_causal, scale, block_size, with_block_values=True):
            rows = chunk.row_end - chunk.row_start
            row_blocks = torch.arange(chunk.row_start, chunk.row_end, device=q.device) // block_size
            batch = chunk.output.shape[0]
            for head, masks in enumerate(head_masks):
                candidates = masks.shape[0]
                dense = chunk.output[:, head].permute(1, 0, 2)  # [rows, B, D]
                row_masks = masks.to(chunk.pooled.dtype)[:, row_blocks, :].permute(1, 0, 2)  # [rows, C, kb]
                pooled = chunk.pooled[:, head].permute(1, 2, 0)  # [rows, kb, B]
                values = chunk.block_values[:, head].permute(2, 1, 0, 3).reshape(rows, -1, batch * dense.shape[-1])
                numerator = (row_masks @ values).view(rows, candidates, batch, -1)
                denominator = row_masks @ pooled  # [rows, C, B]
                output = numerator / denominator.unsqueeze(-1).clamp_min(1e-30)
                output = torch.where(denominator.unsqueeze(-1) > 0, output, torch.zeros_like(output))
                if skip_candidates is not None and bool(skip_candidates[head].any()):
                    output[:, skip_candidates[head]] = 0
                error = (output - dense.unsqueeze(1)).pow(2).sum((0, 2, 3))
                self.squared_error[head] += error.to(torch.float64).cpu()
                self.kept_mass[head] += denominator.sum((0, 2)).to(torch.float64).cpu()
                self.output_norm[head] += float(dense.pow(2).sum())
                self.total_mass[head] += float(pooled.sum())

    def relative_error(self, head: int) -> torch.Tensor:
        return (self.squared_error[head] / self.output_norm[head].clamp_min(1e-30)).sqrt()

    def recall(self, head: int) -> torch.Tensor:
        return self.kept_mass[head] / self.total_mass[head].clamp_min(1e-30)
