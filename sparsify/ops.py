"""`torch.ops.sparsify.attention`: the canonical attention op every captured attention becomes, and its autograd."""

from __future__ import annotations

import math

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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense scaled-dot-product attention on ``[batch, heads, seq, head_dim]`` tensors.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention: query head ``h``
    reads key/value head ``h // (q_heads // kv_heads)``). ``attn_mask`` is ``None``, bool
    (True = attend) or additive, broadcastable to ``[batch, heads, q_len, k_len]``. Causal
    masking is top-left aligned, as in ``F.scaled_dot_product_attention``.

    The two trailing arguments are optional (canonical nodes omit them when unused):

    * ``softcap``: scores become ``softcap * tanh(scores / softcap)`` after scaling and before
      the mask (Gemma 2);
    * ``sinks``: ``[heads]`` learned logits, one per query head, that join each row's softmax
      as one extra key without a value: ``p = softmax([scores, sink_h])[..., :-1]``,
      ``out = p @ v`` (gpt-oss).

    This op marks an attention site in a captured graph; the rewrite pass replaces it with a
    sparse backend call. Run as is, it computes exactly what the original model computed.
    It has an autograd formula (the backward recomputes `dense_attention`).

    Example:
        >>> q = k = v = torch.randn(1, 2, 8, 4)
        >>> torch.ops.sparsify.attention(q, k, v, None, True, None).shape
        torch.Size([1, 2, 8, 4])
        >>> torch.ops.sparsify.attention(q, k, v, None, True, None, 30.0, torch.zeros(2)).shape
        torch.Size([1, 2, 8, 4])
    """
    return dense_attention(q, k, v, attn_mask, is_causal, scale, softcap, sinks)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference computation of ``torch.ops.sparsify.attention`` (differentiable).

    Without ``softcap`` and ``sinks`` it is ``F.scaled_dot_product_attention`` with grouped
    key/value heads expanded and ``is_causal`` folded into a given mask. With either, the
    scores are computed explicitly: ``s = scale · q kᵀ``; ``s = softcap · tanh(s / softcap)``;
    mask and causal triangle applied; ``p = softmax([s, sink_h])`` with the sink column
    dropped after the softmax; ``out = p @ v``. Rows whose keys are all hidden give zeros
    when a sink is present (the sink holds the whole mass), NaN otherwise, as SDPA does.

    Example:
        >>> q, k, v = torch.randn(3, 1, 2, 6, 4).unbind(0)
        >>> plain = dense_attention(q, k, v, is_causal=True)
        >>> torch.allclose(plain, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
        True
        >>> capped = dense_attention(q, k, v, softcap=50.0)      # tanh barely bends small scores
        >>> torch.allclose(capped, F.scaled_dot_product_attention(q, k, v), atol=1e-3)
        True
        >>> very_low_sinks = torch.full((2,), -1e4)               # a sink of -inf changes nothing
        >>> torch.allclose(dense_attention(q, k, v, sinks=very_low_sinks), F.scaled_dot_product_attention(q, k, v))
        True
    """
    if k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    if softcap is None and sinks is None:
        if is_causal and attn_mask is not None:
            # SDPA refuses both at once; fold the causal triangle into the mask.
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            if attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & causal
            else:
                attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
            is_causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if is_causal:
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if sinks is not None:
        sink_column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probabilities = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    else:
        probabilities = torch.softmax(scores, dim=-1)
    return probabilities.to(v.dtype) @ v


# -- autograd ------------------------------------------------------------------------------------

_DIFFERENTIABLE = {0: "q", 1: "k", 2: "v", 3: "attn_mask", 7: "sinks"}


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, *rest = inputs
    softcap = rest[0] if rest else None
    sinks = rest[1] if len(rest) > 1 else None
    ctx.is_causal, ctx.scale, ctx.softcap = is_causal, scale, softcap
    ctx.has_mask, ctx.has_sinks = attn_mask is not None, sinks is not None
    ctx.save_for_backward(q, k, v, attn_mask, sinks)


def _backward(ctx, grad_output):
    """Vector-Jacobian product of `dense_attention`, recomputed under ``enable_grad``.

    Gradients flow to q, k, v, an additive float mask and the sinks; a bool mask has none.
    """
    q, k, v, attn_mask, sinks = ctx.saved_tensors
    wanted = {"q": ctx.needs_input_grad[0], "k": ctx.needs_input_grad[1], "v": ctx.needs_input_grad[2],
              "attn_mask": ctx.has_mask and ctx.needs_input_grad[3] and attn_mask.is_floating_point(),
              "sinks": ctx.has_sinks and len(ctx.needs_input_grad) > 7 and ctx.needs_input_grad[7]}
    with torch.enable_grad():
        leaves = {"q": q.detach().requires_grad_(wanted["q"]), "k": k.detach().requires_grad_(wanted["k"]),
                  "v": v.detach().requires_grad_(wanted["v"])}
        leaves["attn_mask"] = None if attn_mask is None else attn_mask.detach().requires_grad_(wanted["attn_mask"])
        leaves["sinks"] = None if sinks is None else sinks.detach().requires_grad_(wanted["sinks"])
        output = dense_attention(leaves["q"], leaves["k"], leaves["v"], leaves["attn_mask"], ctx.is_causal, ctx.scale,
                                 ctx.softcap, leaves["sinks"])
        names = [name for name, needed in wanted.items() if needed]
        grads = torch.autograd.grad(output, [leaves[name] for name in names], grad_output, allow_unused=True)
    by_name = dict(zip(names, grads))  # each gradient has its leaf's shape (broadcasts are summed back)
    return (by_name.get("q"), by_name.get("k"), by_name.get("v"), by_name.get("attn_mask"), None, None, None,
            by_name.get("sinks"))


attention.register_autograd(_backward, setup_context=_setup_context)
