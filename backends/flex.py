"""The `flex` backend: PyTorch FlexAttention driven by a `BlockMask` built from the block tables.

The tables become a ``BlockMask`` directly (``BlockMask.from_kv_blocks``), split into *full*
key blocks (no per-element masking: inside ``k_len`` and, when causal, wholly below the
diagonal) and *partial* ones (crossing the diagonal, or every block when an ``attn_mask`` is
given). Key blocks wholly above the diagonal are dropped. Element masking is a ``mask_mod`` /
``score_mod`` that captures tensors only (never per-call Python numbers, which FlexAttention
would compile into the kernel and recompile for); sequence ends that are not block multiples
are masked by FlexAttention itself.

One compiled ``flex_attention`` is created lazily and shared by every site and layer.
CUDA only: FlexAttention's CPU path is slow or missing depending on the torch version.
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparsify.backends.base import Backend, register_backend
from sparsify.errors import UnsupportedError
from sparsify.site import AttentionSite
from sparsify.tables import BlockTables

__all__ = ["FlexBackend"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_CACHE_SIZE = 128


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:  # torch without FlexAttention
        return None
    return module


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    """The one compiled ``flex_attention`` every call reuses (compiled on first use)."""
    return torch.compile(_flex_module().flex_attention)


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@register_backend("flex")
class FlexBackend(Backend):
    """Block-sparse attention through FlexAttention (``torch.nn.attention.flex_attention``)."""

    def is_available(self) -> bool:
        return _flex_module() is not None and torch.cuda.is_available()

    def unsupported_reason(self, site: AttentionSite, dtype: torch.dtype, device: torch.device) -> str | None:
        if _flex_module() is None:
            return f"torch {torch.__version__} has no FlexAttention"
        if torch.device(device).type != "cuda":
            return f"the flex backend runs on CUDA tensors only, got {torch.device(device).type}"
        if dtype not in _SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported; supported: float16, bfloat16, float32"
        head_dim = max(site.head_dim, site.value_head_dim or site.head_dim)
        if head_dim > _MAX_HEAD_DIM:
            return f"head dim {head_dim} is over FlexAttention's limit {_MAX_HEAD_DIM}"
        return None

    def __init__(self) -> None:
        # BlockMasks per tables object, owned by this backend instance (the rewrite keeps one per
        # site, dtype and device); an entry dies with its tables.
        self._block_masks: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._block_masks_lock = threading.Lock()

    def _cached_block_mask(self, tables: BlockTables, device: torch.device):
        key = ((tables.kv_indices._version, tables.kv_counts._version, id(tables.kv_counts)), tables.block_size,
               tables.q_len, tables.k_len, bool(tables.causal), str(device))
        with self._block_masks_lock:
            per_tables = self._block_masks.get(tables.kv_indices)
            if per_tables is not None and key in per_tables:
                return per_tables[key]
        full, partial = _block_classes(tables, device)
        mask_mod = _causal_mask_mod if tables.causal else None
        block_mask = _from_kv_blocks(*_ordered(partial), *_ordered(full), tables, mask_mod)
        with self._block_masks_lock:
            per_tables = self._block_masks.setdefault(tables.kv_indices, {})
            per_tables[key] = block_mask
            while len(per_tables) > _CACHE_SIZE:
                per_tables.pop(next(iter(per_tables)))
        return block_mask

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
        if q.device.type != "cuda":
            raise UnsupportedError(f"the flex backend needs CUDA tensors, got {q.device.type}")
        _check_shapes(q, k, v, tables)
        batch, heads, q_len, _ = q.shape
        k, v, enable_gqa = _kv_for_heads(k, v, tables)
        score_mod = None
        if attn_mask is None:
            block_mask = self._cached_block_mask(tables, q.device)
        else:
            mask = attn_mask.expand(batch, heads, q_len, tables.k_len)
            block_mask, score_mod = _masked_block_mask(tables, q.device, mask)
        options = None
        if tables.block_size < 128 or score_mod is not None:
            # FlexAttention's tiles must not exceed the sparse block; with a score_mod reading
            # a bias its default 128-wide tiles ran out of shared memory (H200, torch 2.11).
            tile = min(64, tables.block_size)
            options = {"BLOCK_M": tile, "BLOCK_N": tile}
        return _compiled_flex_attention()(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
            enable_gqa=enable_gqa, kernel_options=options,
        )


def _check_shapes(q, k, v, tables: BlockTables) -> None:
    if q.shape[1] != tables.num_heads:
        raise UnsupportedError(f"q has {q.shape[1]} heads but the block tables describe {tables.num_heads}")
    if q.shape[2] != tables.q_len or k.shape[2] != tables.k_len:
        raise UnsupportedError(
            f"sequence lengths q={q.shape[2]}, k={k.shape[2]} do not match the block tables "
            f"(q_len={tables.q_len}, k_len={tables.k_len})"
        )


def _kv_for_heads(k: torch.Tensor, v: torch.Tensor, tables: BlockTables):
    """(k, v, enable_gqa): native GQA for the standard ``h // group`` mapping, else gathered."""
    heads, kv_heads = tables.num_heads, k.shape[1]
    index = tables.kv_head_index.to(k.device)
    if heads % kv_heads == 0:
        standard = torch.arange(heads, device=k.device) // (heads // kv_heads)
        if torch.equal(index, standard):
            return k, v, kv_heads != heads
    return k.index_select(1, index), v.index_select(1, index), False


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and ascending column indices (``[1, heads, rows(, cols)]``) of a bool block mask."""
    counts = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[None].contiguous(), order.to(torch.int32)[None].contiguous()


def _block_classes(tables: BlockTables, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[heads, q_blocks, k_blocks]`` masks of the kept blocks that are full / partial."""
    bs = tables.block_size
    kept = tables.to_block_masks().to(device)
    _, q_blocks, k_blocks = kept.shape
    q_first = torch.arange(q_blocks, device=device).view(q_blocks, 1) * bs
    q_last = torch.clamp(q_first + bs, max=tables.q_len) - 1
    k_first = torch.arange(k_blocks, device=device).view(1, k_blocks) * bs
    k_last = k_first + bs - 1
    if tables.causal:
        kept = kept & (k_first <= q_last)
        full = kept & (k_last <= q_first)
    else:
        full = kept
    return full, kept & ~full


def _from_kv_blocks(counts, indices, full_counts, full_indices, tables: BlockTables, mask_mod):
    module = _flex_module()
    kwargs = {}
    if "compute_q_blocks" in inspect.signature(module.BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: the transposed tables are not needed
    return module.BlockMask.from_kv_blocks(
        counts, indices, full_counts, full_indices, BLOCK_SIZE=tables.block_size,
        mask_mod=mask_mod, seq_lengths=(tables.q_len, tables.k_len), **kwargs,
    )


def _masked_block_mask(tables: BlockTables, device: torch.device, attn_mask: torch.Tensor):
    """(block_mask, score_mod) with every kept block partial and the mask applied per element."""
    full, partial = _block_classes(tables, device)
    causal = bool(tables.causal)
    score_mod = None
    if attn_mask.dtype == torch.bool:
        if causal:
            def mask_mod(b, h, q_idx, kv_idx):
                return attn_mask[b, h, q_idx, kv_idx] & (q_idx >= kv_idx)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return attn_mask[b, h, q_idx, kv_idx]
    else:
        mask_mod = _causal_mask_mod if causal else None

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + attn_mask[b, h, q_idx, kv_idx].to(score.dtype)
    counts, indices = _ordered(full | partial)
    block_mask = _from_kv_blocks(counts, indices, None, None, tables, mask_mod)
    return block_mask, score_mod
