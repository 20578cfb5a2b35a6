"""Attention statistics the search needs, computed chunk by chunk: block-pooled mass and candidate errors.

Everything here works on one site's ``q``, ``k``, ``v`` of one calibration batch and never holds a
``seq × seq`` tensor: query rows are processed in chunks, probabilities are pooled into key blocks
on the fly. The key identity is that for a block mask ``m`` (constant over a key block ``J``) the
masked attention output of a query row ``r`` is ::

    out_r = Σ_J m[J] · N[r, J] / Σ_J m[J] · Z[r, J]
    with Z[r, J] = Σ_{j ∈ J} p[r, j] and N[r, J] = Σ_{j ∈ J} p[r, j] · v_j

where ``p`` are the dense probabilities. With learned sinks (one extra logit per head that joins
every row's softmax and has no value) the denominator gains the sink's probability ``P_sink[r]``,
which no block mask removes. So the output of *any* candidate block mask costs
``rows × key_blocks × head_dim`` instead of ``rows × keys × head_dim``: the search scores many
candidates per head for about the price of one dense attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch

from sparsify.block_mask import blocks_for

# Scores of one chunk are kept under this many bytes (the chunk holds rows × keys per head).
CHUNK_BYTES = 64 * 2**20


@dataclasses.dataclass
class ProbabilityChunk:
    """Dense attention of a block of query rows: probabilities pooled per key block, and the output."""

    row_start: int
    row_end: int
    pooled: torch.Tensor  # Z: [batch, heads, rows, key_blocks] probability mass per key block
    block_values: torch.Tensor | None  # N: [batch, heads, key_blocks, rows, value_dim] or None
    output: torch.Tensor | None  # dense attention output [batch, heads, rows, value_dim] (when asked)
    sink_mass: torch.Tensor | None = None  # [batch, heads, rows]: probability the sink takes (sites with sinks)


def probability_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
    scale: float | None, block_size: int, *, with_block_values: bool, with_output: bool = True,
    chunk_bytes: int = CHUNK_BYTES, row_offsets: torch.Tensor | None = None,
    softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> Iterator[ProbabilityChunk]:
    """Dense attention in chunks of whole query blocks, pooled over key blocks.

    ``q`` ``[B, H, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` (query head h reads kv head
    ``h // (H // Hkv)``), ``attn_mask`` bool/additive broadcastable to ``[B, H, Sq, Sk]``.
    ``softcap`` and ``sinks`` are those of ``torch.ops.sparsify.attention``: the probabilities
    are exactly the model's (scores soft-capped before the mask; each row's softmax includes
    the head's sink logit, whose probability is returned as ``sink_mass``).
    Computes in float32 (float64 inputs stay float64). With ``row_offsets`` (sorted offsets in
    ``[0, block_size)``), only those rows of every query block are computed — a cheaper,
    unbiased estimate of block-pooled mass; ``row_start``/``row_end`` then index sampled rows.

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
    k_blocks = blocks_for(k_len, block_size)
    padded_keys = k_blocks * block_size
    value_blocks = None
    if with_block_values:
        padded_values = v if padded_keys == k_len else torch.nn.functional.pad(v, (0, 0, 0, padded_keys - k_len))
        value_blocks = padded_values.view(batch, heads, k_blocks, block_size, -1)
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    bytes_per_row = batch * heads * padded_keys * 4 * (3 if with_block_values else 2)
    if with_block_values:
        bytes_per_row += batch * heads * k_blocks * v.shape[-1] * 4
    rows = max(block_size, (chunk_bytes // max(bytes_per_row, 1)) // block_size * block_size)
    if row_offsets is not None:
        q_blocks = blocks_for(q_len, block_size)
        positions = (torch.arange(q_blocks, device=q.device).unsqueeze(1) * block_size + row_offsets.to(q.device)).flatten()
        positions = positions[positions < q_len]
        q = q.index_select(2, positions)
        q_len = positions.numel()
        rows = max(row_offsets.numel(), rows // block_size * row_offsets.numel())
    else:
        positions = None
    for row_start in range(0, q_len, rows):
        row_end = min(q_len, row_start + rows)
        scores = (q[:, :, row_start:row_end].to(compute_dtype) * scale) @ k.transpose(-2, -1)
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        if attn_mask is not None:
            if attn_mask.shape[-2] == 1:
                mask = attn_mask
            elif positions is not None:
                mask = attn_mask.index_select(-2, positions[row_start:row_end])
            else:
                mask = attn_mask[..., row_start:row_end, :]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(compute_dtype)
        if is_causal:
            query_positions = (positions[row_start:row_end] if positions is not None
                               else torch.arange(row_start, row_end, device=q.device)).unsqueeze(-1)
            future = torch.arange(k_len, device=q.device) > query_positions
            scores = scores.masked_fill(future, float("-inf"))
        sink_mass = None
        if sinks is not None:
            sink_column = sinks.to(compute_dtype).view(1, -1, 1, 1).expand(batch, heads, row_end - row_start, 1)
            probabilities = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)
            sink_mass = probabilities[..., -1]
            probabilities = probabilities[..., :-1]
        else:
            probabilities = torch.softmax(scores, dim=-1)
        del scores
        if attn_mask is not None:
            probabilities = probabilities.nan_to_num_(0.0)  # rows the mask hides entirely
        padded = probabilities if padded_keys == k_len else torch.nn.functional.pad(probabilities, (0, padded_keys - k_len))
        blocked = padded.view(batch, heads, row_end - row_start, k_blocks, block_size)
        pooled = blocked.sum(-1)
        block_values = None
        output = None
        if with_block_values:
            # N[b, h, J, r, :] = p[b, h, r, J-block] @ v[b, h, J-block]; the dense output is Σ_J N.
            block_values = blocked.permute(0, 1, 3, 2, 4) @ value_blocks
            if with_output:
                output = block_values.sum(2)
        elif with_output:
            output = probabilities @ v
        yield ProbabilityChunk(row_start, row_end, pooled, block_values, output, sink_mass)


# An additive mask entry at or below this hides its key (HF uses the dtype's minimum, older code -10000).
HIDDEN_BELOW = -1e4


def padded_query_rows(attn_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """Query rows that are padding, read off a self-attention mask: bool ``[batch, q_len]``, or ``None``.

    A key position hidden from every query row and every head of a batch element is padding
    (a key-padding mask; with a causal mask the same holds, since row ``i`` sees key ``i`` unless
    ``i`` is padding). At self-attention (``q_len == k_len``) the query row at that position is
    padding too: its output is meaningless and downstream code ignores it, so its error must not
    count. ``None`` when there is no mask, the site is not self-attention, or nothing is padded.

    Example:
        >>> mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)   # last token is padding
        >>> padded_query_rows(mask, 1, 3, 3).tolist()
        [[False, False, True]]
    """
    if attn_mask is None or q_len != k_len or attn_mask.shape[-1] != k_len:
        return None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() < 4 else attn_mask
    hidden = ~mask if mask.dtype == torch.bool else mask <= HIDDEN_BELOW
    padded = hidden.all(dim=-2).all(dim=1)  # [batch or 1, k_len]
    if not bool(padded.any()):
        return None
    return padded.expand(batch, k_len).cpu()


def pool_query_blocks(pooled: torch.Tensor, row_start: int, block_size: int) -> torch.Tensor:
    """Sum ``[B, H, rows, key_blocks]`` over batch and the rows of each query block → ``[H, q_blocks_in_chunk, key_blocks]``."""
    batch, heads, rows, k_blocks = pooled.shape
    padded_rows = blocks_for(rows, block_size) * block_size
    padded = torch.nn.functional.pad(pooled, (0, 0, 0, padded_rows - rows))
    return padded.view(batch, heads, padded_rows // block_size, block_size, k_blocks).sum((0, 3))


@dataclasses.dataclass
class BlockMassProfile:
    """Block-pooled attention probability mass of one site, per head, at one sequence length.

    ``mass[h, I, J]`` is the probability that query rows of block ``I`` give to keys of block
    ``J``, summed over rows and calibration batches; ``rows`` counts the rows summed (so
    ``mass[h].sum() == rows`` up to fully masked rows and, at sites with sinks, the mass the
    sinks take).
    """

    q_len: int
    k_len: int
    block_size: int
    mass: torch.Tensor  # float64 [heads, q_blocks, k_blocks]
    rows: int = 0

    @classmethod
    def empty(cls, heads: int, q_len: int, k_len: int, block_size: int) -> "BlockMassProfile":
        q_blocks, k_blocks = blocks_for(q_len, block_size), blocks_for(k_len, block_size)
        return cls(q_len, k_len, block_size, torch.zeros(heads, q_blocks, k_blocks, dtype=torch.float64))

    def add(self, q, k, v, attn_mask, is_causal, scale, rows_per_block: int | None = None,
            generator: torch.Generator | None = None, *, softcap: float | None = None,
            sinks: torch.Tensor | None = None) -> None:
        """Accumulate one batch of a site's inputs (the canonical op's arguments).

        ``rows_per_block`` samples that many query rows of every block (the same offsets in
        each block, drawn from ``generator``) and scales their mass up: an unbiased estimate at a
        ``block_size / rows_per_block`` times lower cost. ``None`` uses every row.
        """
        offsets = None
        if rows_per_block is not None and rows_per_block < self.block_size:
            offsets = torch.randperm(self.block_size, generator=generator)[:rows_per_block].sort().values
        sampled = offsets.numel() if offsets is not None else self.block_size
        for chunk in probability_chunks(q, k, v, attn_mask, is_causal, scale, self.block_size, with_block_values=False,
                                        with_output=False, row_offsets=offsets, softcap=softcap, sinks=sinks):
            first_block = chunk.row_start // sampled
            pooled = pool_query_blocks(chunk.pooled, chunk.row_start, sampled).to(torch.float64)
            self.mass[:, first_block:first_block + pooled.shape[1]] += pooled.cpu() * (self.block_size / sampled)
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
    # Input-adaptive candidates: Σ and Σ² over batch elements of the work their masks kept (0 for static ones),
    # and how many batch elements were summed.
    work_sum: list[torch.Tensor] = dataclasses.field(default_factory=list)
    work_square_sum: list[torch.Tensor] = dataclasses.field(default_factory=list)
    work_count: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    # Per `add` call (one per batch): the padded query rows left out of the sums (`padded_query_rows`).
    padded_rows: list[torch.Tensor | None] = dataclasses.field(default_factory=list)

    @classmethod
    def empty(cls, candidates_per_head: list[int]) -> "CandidateErrors":
        heads = len(candidates_per_head)
        zeros = lambda: [torch.zeros(c, dtype=torch.float64) for c in candidates_per_head]  # noqa: E731
        return cls(zeros(), zeros(), torch.zeros(heads, dtype=torch.float64), torch.zeros(heads, dtype=torch.float64),
                   zeros(), zeros())

    def add_work(self, work: torch.Tensor, first: list[int]) -> None:
        """Record the work ``[candidates, batch, heads]`` of the per-batch candidates; head ``h``'s start at ``first[h]``."""
        work = work.to(torch.float64).cpu()
        for head in range(work.shape[2]):
            self.work_sum[head][first[head]:] += work[:, :, head].sum(1)
            self.work_square_sum[head][first[head]:] += work[:, :, head].pow(2).sum(1)
        self.work_count += work.shape[1]

    def mean_work(self, head: int) -> torch.Tensor:
        """Mean work per batch element of each per-batch candidate (0 for the others)."""
        return self.work_sum[head] / self.work_count.clamp_min(1)

    def work_spread(self, head: int) -> torch.Tensor:
        """Standard deviation over batch elements of each per-batch candidate's work."""
        mean = self.mean_work(head)
        return (self.work_square_sum[head] / self.work_count.clamp_min(1) - mean.pow(2)).clamp_min(0).sqrt()

    def add(self, q, k, v, attn_mask, is_causal, scale, block_size: int, head_masks: list[torch.Tensor],
            skip_candidates: list[torch.Tensor] | None = None, rows_per_block: int | None = None,
            generator: torch.Generator | None = None, *, softcap: float | None = None,
            sinks: torch.Tensor | None = None, batch_masks: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """Score every candidate of every head on one batch (``softcap``/``sinks`` as the site has them).

        With ``rows_per_block``, that many query rows of every block (the same random offsets in
        each block) are scored — an unbiased estimate of the errors at a fraction of the cost —
        and None is returned; otherwise every row is scored and the dense output is returned.

        ``head_masks[h]`` is ``bool [candidates, q_blocks, k_blocks]`` at this batch's lengths;
        ``skip_candidates[h]`` (bool ``[candidates]``) marks candidates that drop the head (output 0).
        ``batch_masks[h]`` (bool ``[more, batch, q_blocks, k_blocks]``) are further candidates whose
        mask differs per batch element (input-adaptive ones, estimated on this batch); they are
        scored after the ``head_masks`` candidates, with the same identity per batch element.
        Query rows that are padding (`padded_query_rows`) count neither in the errors nor in the
        norms and masses.
        """
        offsets = None
        if rows_per_block is not None and rows_per_block < block_size:
            offsets = torch.randperm(block_size, generator=generator)[:rows_per_block].sort().values
        sampled = block_size if offsets is None else offsets.numel()
        padded_rows = padded_query_rows(attn_mask, q.shape[0], q.shape[2], k.shape[2])
        self.padded_rows.append(padded_rows)
        row_weight = None
        if padded_rows is not None:
            positions = torch.arange(q.shape[2])
            if offsets is not None:
                positions = (torch.arange(blocks_for(q.shape[2], block_size)).unsqueeze(1) * block_size + offsets).flatten()
                positions = positions[positions < q.shape[2]]
            row_weight = (~padded_rows[:, positions]).to(q.device)  # [batch, scored rows]
        outputs = []
        for chunk in probability_chunks(q, k, v, attn_mask, is_causal, scale, block_size, with_block_values=True,
                                        row_offsets=offsets, softcap=softcap, sinks=sinks):
            outputs.append(chunk.output)
            rows = chunk.row_end - chunk.row_start
            padded_rows = blocks_for(rows, sampled) * sampled
            first_block = chunk.row_start // sampled
            query_blocks = padded_rows // sampled
            batch, _, k_blocks, _, value_dim = chunk.block_values.shape
            pad = padded_rows - rows
            # Rows of one query block share a mask: one batched matmul per chunk and head, over query blocks.
            values = torch.nn.functional.pad(chunk.block_values, (0, 0, 0, pad))  # [B, H, kb, rows', D]
            values = values.view(batch, -1, k_blocks, query_blocks, sampled, value_dim)
            pooled = torch.nn.functional.pad(chunk.pooled, (0, 0, 0, pad))  # [B, H, rows', kb]
            pooled = pooled.view(batch, -1, query_blocks, sampled, k_blocks)
            dense = torch.nn.functional.pad(chunk.output, (0, 0, 0, pad)).view(batch, -1, query_blocks, sampled, value_dim)
            sink_mass = None
            if chunk.sink_mass is not None:
                sink_mass = torch.nn.functional.pad(chunk.sink_mass, (0, pad)).view(batch, -1, query_blocks, sampled)
            weight = None
            if row_weight is not None:  # [nq, 1, bs*B], laid out like the rows below
                rows_weight = torch.nn.functional.pad(row_weight[:, chunk.row_start:chunk.row_end], (0, pad))
                weight = rows_weight.view(batch, query_blocks, sampled).permute(1, 2, 0).reshape(query_blocks, 1, -1)
            for head, masks in enumerate(head_masks):
                candidates = masks.shape[0]
                block_masks = masks[:, first_block:first_block + query_blocks].to(values.dtype).transpose(0, 1)  # [nq, C, kb]
                head_values = values[:, head].permute(2, 1, 3, 0, 4).reshape(query_blocks, k_blocks, -1)  # [nq, kb, bs*B*D]
                head_pooled = pooled[:, head].permute(1, 3, 2, 0).reshape(query_blocks, k_blocks, -1)  # [nq, kb, bs*B]
                numerator = (block_masks @ head_values).view(query_blocks, candidates, sampled * batch, value_dim)
                kept = block_masks @ head_pooled  # [nq, C, bs*B]
                denominator = kept
                if sink_mass is not None:
                    # The sink stays in every candidate's softmax: it is not a key block.
                    denominator = kept + sink_mass[:, head].permute(1, 2, 0).reshape(query_blocks, 1, -1)
                # Where a candidate keeps no mass the numerator is 0 too, so the output is 0.
                output = numerator / denominator.unsqueeze(-1).clamp_min(1e-30)
                if skip_candidates is not None and bool(skip_candidates[head].any()):
                    output[:, skip_candidates[head]] = 0
                reference = dense[:, head].permute(1, 2, 0, 3).reshape(query_blocks, 1, sampled * batch, value_dim)
                if weight is not None:
                    keep = weight.to(output.dtype)
                    output, reference = output * keep.unsqueeze(-1), reference * keep.unsqueeze(-1)
                    denominator = denominator * keep
                    head_pooled = head_pooled * keep
                error = (output - reference).pow(2).sum((0, 2, 3))
                self.squared_error[head][:candidates] += error.to(torch.float64).cpu()
                self.kept_mass[head][:candidates] += kept.sum((0, 2)).to(torch.float64).cpu()
                if batch_masks is not None and batch_masks[head].shape[0]:
                    per_batch = batch_masks[head][:, :, first_block:first_block + query_blocks].to(values.dtype)
                    numerator = torch.einsum("cbqk,bkqsd->cbqsd", per_batch, values[:, head])
                    kept = torch.einsum("cbqk,bqsk->cbqs", per_batch, pooled[:, head])     # [C', B, nq, bs]
                    denominator = kept if sink_mass is None else kept + sink_mass[:, head]
                    output = numerator / denominator.unsqueeze(-1).clamp_min(1e-30)
                    difference = output - dense[:, head]
                    if row_weight is not None:           # padded query rows do not count (as above)
                        batch_weight = torch.nn.functional.pad(row_weight[:, chunk.row_start:chunk.row_end], (0, pad))
                        batch_weight = batch_weight.view(batch, query_blocks, sampled).to(difference.dtype)
                        difference = difference * batch_weight.unsqueeze(-1)
                        kept = kept * batch_weight
                    error = difference.pow(2).sum((1, 2, 3, 4))
                    self.squared_error[head][candidates:] += error.to(torch.float64).cpu()
                    self.kept_mass[head][candidates:] += kept.sum((1, 2, 3)).to(torch.float64).cpu()
                self.output_norm[head] += float(reference.pow(2).sum())
                self.total_mass[head] += float(head_pooled.sum())
        if offsets is not None:
            return None
        return torch.cat(outputs, dim=2).to(q.dtype)

    def relative_error(self, head: int) -> torch.Tensor:
        return (self.squared_error[head] / self.output_norm[head].clamp_min(1e-30)).sqrt()

    def recall(self, head: int) -> torch.Tensor:
        return self.kept_mass[head] / self.total_mass[head].clamp_min(1e-30)
