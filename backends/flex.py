"""The `flex` backend: PyTorch FlexAttention driven by a `BlockMask` made from the runtime mask's block lists.

The runtime mask's full and partial lists become a FlexAttention ``BlockMask`` directly
(``BlockMask.from_kv_blocks``: the same layout). Element masking is a ``mask_mod`` /
``score_mod`` that captures tensors only (never per-call Python numbers, which FlexAttention
would compile into the kernel and recompile for): the causal diagonal at the mask's query
offset, the user's ``attn_mask`` (then every kept block is partial), a softcap. Sequence ends
that are not block multiples are masked by FlexAttention itself.

One compiled ``flex_attention`` per backend instance is created lazily. CUDA only:
FlexAttention's CPU path is slow or missing depending on the torch version.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from sparsify.backends.base import Backend, BackendFeatures, BackendPlan, register_backend
from sparsify.errors import UnsupportedError
from sparsify.runtime.block_mask import RuntimeBlockMask

__all__ = ["FlexBackend", "FlexPlan"]


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:  # torch without FlexAttention
        return None
    return module


@dataclasses.dataclass
class FlexPlan(BackendPlan):
    """The flex backend's plan: the ``BlockMask`` of the runtime mask (no user mask) and GQA handling."""

    block_mask: object = None
    q_offset: torch.Tensor | None = None    # 0-d tensor captured by the causal mask_mod


@register_backend("flex")
class FlexBackend(Backend):
    """Block-sparse attention through FlexAttention (``torch.nn.attention.flex_attention``); CUDA, forward only."""

    features = BackendFeatures(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                               max_head_dim=256, sinks=False, training=False)
    auto_priority = 30
    install_hint = "FlexAttention ships with torch >= 2.5 on CUDA"

    def __init__(self) -> None:
        self._compiled = None

    def availability(self, device: torch.device | str | None = None) -> str | None:
        if _flex_module() is None:
            return f"torch {torch.__version__} has no FlexAttention"
        if device is None:
            return None if torch.cuda.is_available() else "no CUDA device in this process"
        return super().availability(device)

    def _flex_attention(self):
        if self._compiled is None:  # compiled once per backend instance, on first use
            self._compiled = torch.compile(_flex_module().flex_attention)
        return self._compiled

    def prepare(self, mask: RuntimeBlockMask, *, q_shape, k_shape, v_shape, dtype, device) -> FlexPlan:
        device = torch.device(device)
        if device.type != "cuda":
            raise UnsupportedError(f"the flex backend needs CUDA tensors, got {device.type}")
        if q_shape[1] != mask.num_heads or q_shape[2] != mask.q_len or k_shape[2] != mask.k_len:
            raise UnsupportedError(
                f"flex backend: q {tuple(q_shape)} / k {tuple(k_shape)} do not match the mask (heads="
                f"{mask.num_heads}, q_len={mask.q_len}, k_len={mask.k_len})")
        mask = mask.to(device)
        offset = torch.tensor(mask.q_offset, device=device)
        mask_mod = _causal_mask_mod(offset) if mask.causal else None
        block_mask = _from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                     mask.full_kv_indices, mask, mask_mod)
        return FlexPlan(mask=mask, q_shape=tuple(q_shape), k_shape=tuple(k_shape), v_shape=tuple(v_shape), dtype=dtype,
                        device=device, block_mask=block_mask, q_offset=offset)

    def run(self, plan: FlexPlan, q, k, v, *, attn_mask=None, scale=None, softcap=None, sinks=None) -> torch.Tensor:
        plan.check_call(q, k, v, self.name)
        if sinks is not None:
            raise UnsupportedError("the flex backend does not support learned attention sinks; use backend='torch' "
                                   "or 'triton'")
        mask = plan.mask
        batch, heads, q_len, _ = q.shape
        k, v, enable_gqa = _kv_for_heads(k, v, mask)
        score_mod = _softcap_score_mod(torch.tensor(float(softcap), device=q.device)) if softcap else None
        block_mask = plan.block_mask
        if attn_mask is not None:
            block_mask, score_mod = _masked_block_mask(plan, attn_mask.expand(batch, heads, q_len, mask.k_len),
                                                       score_mod)
        options = None
        if mask.block_size < 128 or score_mod is not None:
            # FlexAttention's tiles must not exceed the sparse block; with a score_mod reading
            # a bias its default 128-wide tiles ran out of shared memory (H200, torch 2.11).
            tile = min(64, mask.block_size)
            options = {"BLOCK_M": tile, "BLOCK_N": tile}
        return self._flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                      enable_gqa=enable_gqa, kernel_options=options)


def _causal_mask_mod(offset: torch.Tensor):
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx
    return causal


def _softcap_score_mod(softcap: torch.Tensor):
    def capped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap
    return capped


def _kv_for_heads(k: torch.Tensor, v: torch.Tensor, mask: RuntimeBlockMask):
    """(k, v, enable_gqa): native GQA for the standard ``h // group`` mapping, else gathered."""
    heads, kv_heads = mask.num_heads, k.shape[1]
    index = mask.kv_head_index.to(k.device)
    if heads % kv_heads == 0:
        standard = torch.arange(heads, device=k.device) // (heads // kv_heads)
        if torch.equal(index, standard):
            return k, v, kv_heads != heads
    return k.index_select(1, index), v.index_select(1, index), False


def _full_width(indices: torch.Tensor | None, k_blocks: int) -> torch.Tensor | None:
    """Index rows padded to ``k_blocks`` slots: FlexAttention reads the key-block count off the last dim."""
    if indices is None or indices.shape[-1] == k_blocks:
        return indices
    pad = indices[..., -1:].expand(*indices.shape[:-1], k_blocks - indices.shape[-1])
    return torch.cat([indices, pad], -1).contiguous()


def _from_kv_blocks(counts, indices, full_counts, full_indices, mask: RuntimeBlockMask, mask_mod):
    module = _flex_module()
    indices, full_indices = _full_width(indices, mask.k_blocks), _full_width(full_indices, mask.k_blocks)
    kwargs = {}
    if "compute_q_blocks" in inspect.signature(module.BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: the transposed tables are not needed
    return module.BlockMask.from_kv_blocks(
        counts, indices, full_counts, full_indices, BLOCK_SIZE=mask.block_size,
        mask_mod=mask_mod, seq_lengths=(mask.q_len, mask.k_len), **kwargs,
    )


def _masked_block_mask(plan: FlexPlan, attn_mask: torch.Tensor, score_mod):
    """(block_mask, score_mod) with every kept block partial and the user's mask applied per element."""
    mask = plan.mask
    offset = plan.q_offset
    causal = bool(mask.causal)
    if attn_mask.dtype == torch.bool:
        if causal:
            def mask_mod(b, h, q_idx, kv_idx):
                return attn_mask[b, h, q_idx, kv_idx] & (q_idx + offset >= kv_idx)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return attn_mask[b, h, q_idx, kv_idx]
        new_score_mod = score_mod
    else:
        mask_mod = _causal_mask_mod(offset) if causal else None
        inner = score_mod

        def new_score_mod(score, b, h, q_idx, kv_idx):
            if inner is not None:
                score = inner(score, b, h, q_idx, kv_idx)
            return score + attn_mask[b, h, q_idx, kv_idx].to(score.dtype)
    counts, indices = mask.merged()
    return _from_kv_blocks(counts, indices, None, None, mask, mask_mod), new_score_mod
