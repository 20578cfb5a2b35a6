"""Numerical helpers for the tests: outputs, relative errors, dense masked references."""

from __future__ import annotations

import math
from typing import Any

import torch

from sparsify.api import first_output_tensor


first_tensor = first_output_tensor


def max_relative_error(output: Any, reference: Any) -> float:
    """max |output - reference| / max |reference| over the first tensor of each."""
    output, reference = first_tensor(output).detach().double(), first_tensor(reference).detach().double()
    assert output.shape == reference.shape, (output.shape, reference.shape)
    return float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def call(model: torch.nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, torch.Tensor):
            return model(inputs)
        return model(*inputs)


def masked_attention_reference(q, k, v, keep: torch.Tensor, scale: float | None = None, additive=None):
    """Dense attention in float64 restricted to ``keep`` (bool, broadcastable [B, H, Sq, Sk]).

    Query heads read key/value head ``h // (Hq // Hkv)``; rows with no visible key give zeros.
    """
    heads = q.shape[1]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], 1)
        v = v.repeat_interleave(heads // v.shape[1], 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    if additive is not None:
        scores = scores + additive.double()
    keep = keep.expand_as(scores)
    scores = scores.masked_fill(~keep, float("-inf"))
    probabilities = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probabilities @ v.double()).to(q.dtype)


def tables_reference(q, k, v, tables, attn_mask=None, scale=None):
    """Dense attention in float64 under ``tables.element_mask()`` and ``attn_mask`` (rows with no key → 0).

    Query head ``h`` reads key/value head ``tables.kv_head_index[h]``.
    """
    index = tables.kv_head_index.to(q.device)
    kk, vv = k.double().index_select(1, index), v.double().index_select(1, index)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ kk.transpose(-1, -2)) * scale
    visible = tables.element_mask().to(q.device)[None]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.double()
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ vv
