"""`torch.ops.sparsify.attention`: the canonical attention op every captured attention becomes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("sparsify::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """Dense scaled-dot-product attention on ``[batch, heads, seq, head_dim]`` tensors.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention: query head ``h``
    reads key/value head ``h // (q_heads // kv_heads)``). ``attn_mask`` is ``None``, bool
    (True = attend) or additive, broadcastable to ``[batch, heads, q_len, k_len]``. Causal
    masking is top-left aligned, as in ``F.scaled_dot_product_attention``.

    This op marks an attention site in a captured graph; the rewrite pass replaces it with a
    sparse backend call. Run as is, it computes exactly what the original model computed.

    Example:
        >>> q = k = v = torch.randn(1, 2, 8, 4)
        >>> torch.ops.sparsify.attention(q, k, v, None, True, None).shape
        torch.Size([1, 2, 8, 4])
    """
    return dense_attention(q, k, v, attn_mask, is_causal, scale)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with grouped key/value heads expanded when needed."""
    if k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    if is_causal and attn_mask is not None:
        # SDPA refuses both at once; fold the causal triangle into the mask.
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
