"""Self or cross attention: whether a site's queries and keys are projected from the same tensor."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from sparsify.passes.graph_utils import arg, op_kind

__all__ = ["is_self_attention"]

aten = torch.ops.aten
# How far the self/cross check walks up from q and k to the tensors they were projected from.
_SOURCE_SEARCH_NODES = 200


def is_self_attention(query: torch.fx.Node, key: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    """Self attention when q and k are projected from the same tensor, whatever their lengths.

    Walks up from q and from k to the inputs of the nearest projections (a linear layer or a
    matmul with a weight); q and k that share one such input read one sequence. Where no
    projection is found, the graph inputs reached stand in.

    Example:
        >>> is_self_attention(candidate.query, candidate.key, graph_module)   # doctest: +SKIP
        True
    """
    modules = dict(graph_module.named_modules())
    query_sources, key_sources = _token_sources(query, modules), _token_sources(key, modules)
    return bool(query_sources & key_sources)


def _token_sources(start: torch.fx.Node, modules) -> set[torch.fx.Node]:
    projections: set[torch.fx.Node] = set()
    inputs: set[torch.fx.Node] = set()
    seen: set[torch.fx.Node] = set()
    frontier = [start]
    while frontier and len(seen) < _SOURCE_SEARCH_NODES:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            inputs.add(node)
            continue
        if node.op == "get_attr":
            continue
        activation = _projection_input(node, modules)
        if activation is not None:
            projections.add(activation)
            continue
        frontier.extend(n for n in node.all_input_nodes if n not in seen)
    return projections or inputs


def _projection_input(node: torch.fx.Node, modules) -> torch.fx.Node | None:
    """The activation a linear projection reads (``x`` of ``x @ W``), or None for other nodes."""
    kind = op_kind(node, modules)
    if node.op == "call_module" and kind == "linear":
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    if kind == "linear" and _is_weight(arg(node, 1, "weight")):
        return node.args[0]
    if kind == "addmm" and _is_weight(node.args[2]):
        return node.args[1]
    if kind in ("mm", "matmul") and _is_weight(node.args[1]):
        return node.args[0]
    return None


def _is_weight(node: Any) -> bool:
    for _ in range(3):
        if not isinstance(node, torch.fx.Node):
            return False
        if node.op == "get_attr":
            return True
        if node.target in (aten.t.default, aten.transpose.int, aten.permute.default, aten._to_copy.default,
                           aten.to.dtype, aten.contiguous.default) or node.target in ("t", "to", "transpose"):
            node = node.args[0]
        else:
            return False
    return False
