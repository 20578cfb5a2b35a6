"""Grouped key/value heads repeated before attention (``repeat_kv``, ``repeat_interleave``), un-repeated so the site is GQA."""

from __future__ import annotations

import torch
import torch.fx

from sparsify.passes.graph_utils import arg, op_kind, shape_of

__all__ = ["unrepeat_key_value"]

aten = torch.ops.aten


def _unrepeat_one(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """``(source, repeats)`` when ``node`` repeats the heads of a [B, Hkv, S, D] ``source``."""
    shape = shape_of(node)
    if shape is None or len(shape) != 4:
        return None
    kind = op_kind(node)
    if kind == "repeat_interleave":
        repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(repeats, int) and dim in (1, -3) and isinstance(node.args[0], torch.fx.Node):
            return node.args[0], repeats
        return None
    while kind == "cast":
        node = node.args[0]
        kind = op_kind(node)
    if kind != "view":
        return None
    expanded = node.args[0]
    if not isinstance(expanded, torch.fx.Node) or op_kind(expanded) != "expand":
        return None
    expanded_shape = shape_of(expanded)
    if expanded_shape is None or len(expanded_shape) != 5:
        return None
    batch, kv_heads, repeats, seq, dim = expanded_shape
    if (batch, kv_heads * repeats, seq, dim) != shape:
        return None
    source = expanded.args[0]
    for _ in range(4):
        if not isinstance(source, torch.fx.Node):
            return None
        if shape_of(source) == (batch, kv_heads, seq, dim):
            return source, repeats
        if op_kind(source) in ("unsqueeze", "cast") or source.target in (aten.slice.Tensor, aten.alias.default):
            source = source.args[0]
        else:
            return None
    return None


def unrepeat_key_value(key: torch.fx.Node, value: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Un-repeat GQA keys/values when both were repeated by the same factor (else return them as they are).

    Example:
        >>> key, value = unrepeat_key_value(repeated_key, repeated_value)    # doctest: +SKIP
        >>> shape_of(key)[1]                                                 # doctest: +SKIP
        2
    """
    key_source, value_source = _unrepeat_one(key), _unrepeat_one(value)
    if key_source and value_source and key_source[1] == value_source[1]:
        return key_source[0], value_source[0]
    return key, value
