"""The `find_attention` pass: turn every attention in a captured graph into one canonical node.

Matched forms (at aten level from ``torch.export`` and at torch level from ``symbolic_trace``):

* ``scaled_dot_product_attention`` — no mask, bool or additive mask, ``is_causal``, custom
  ``scale``, ``enable_gqa``; key/value heads repeated before the call (``repeat_kv``:
  unsqueeze → expand → reshape, or ``repeat_interleave``) are un-repeated so the site is GQA;
* the hand-written chain ``q @ kᵀ`` → scale (``*``/``/`` a constant, also on ``q`` or ``kᵀ``
  before the product) → optional soft-capping ``c · tanh(s / c)`` → optional ``+``/``-`` mask,
  ``masked_fill``, ``where`` → optional learned sinks (``cat([s, sinks], -1)``, the column
  dropped after the softmax) → optional row-max shift → ``softmax(-1)`` → optional dropout /
  cast → ``@ v``. In-place forms (``scores += bias``) and lifted constant fills match like their
  out-of-place forms; uses of the scores that read only their shape (``ones_like(scores)``,
  ``scores.shape``) do not block a match; reshapes that only split or merge the batch·heads
  dimensions may sit anywhere in the chain (``[batch*heads, q, k]`` ↔ ``[batch, heads, q, k]``
  ↔ ``[batch, windows, heads, q, k]``), so ``bmm``/``baddbmm`` chains (``nn.MultiheadAttention``,
  BLOOM, DeBERTa) and shifted-window masks (Swin) match.

Each match becomes ``torch.ops.sparsify.attention(q, k, v, attn_mask, is_causal, scale[,
softcap, sinks])`` on ``[batch, heads, seq, head_dim]`` tensors with an `AttentionSite` in
``node.meta["sparsify"]``. A candidate that does not match is logged at debug level and
reported in the `NoAttentionFoundError` when nothing matched at all.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sparsify.errors import NoAttentionFoundError
from sparsify.passes.attention_matchers import AttentionMatcher, Candidate, NoMatch
from sparsify.passes.canonical_builder import CanonicalBuilder
from sparsify.passes.example_run import mask_is_causal, observe_attention_inputs, record_example_shapes
from sparsify.passes.graph_utils import EXAMPLE_SHAPE_KEY, module_path, op_kind
from sparsify.passes.infra import SITE_META_KEY, GraphPass, attention_nodes
from sparsify.passes.self_or_cross import is_self_attention
from sparsify.site import AttentionSite

__all__ = ["FindAttention"]

logger = logging.getLogger(__name__)
# Export's dtype assertions would keep replaced nodes alive; they check nothing we rely on.
_METADATA_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


class FindAttention(GraphPass):
    """Replace every recognised attention with ``torch.ops.sparsify.attention``.

    Args:
        example_inputs: ``(args, kwargs)`` the graph was captured with; the pass runs the graph
            on them to read sizes export left symbolic and to tell causal masks.
        root: the original model, used to read head counts of modules that fold heads into
            the batch dimension (``nn.MultiheadAttention``).

    Example:
        >>> gm = capture(model, (x,)).graph_module          # doctest: +SKIP
        >>> FindAttention(((x,), {})).call(gm).modified    # doctest: +SKIP
        True
    """

    name = "find_attention"

    def __init__(self, example_inputs: tuple[tuple, dict] | None = None, root: torch.nn.Module | None = None):
        self.example_inputs = example_inputs
        self.root = root
        self.skipped: list[str] = []

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if self.example_inputs is None:
            raise ValueError("find_attention needs the example inputs the graph was captured with")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        for node in list(graph.nodes):
            if node.target in _METADATA_ASSERTS:
                graph.erase_node(node)
        graph.eliminate_dead_code()
        record_example_shapes(graph_module, self.example_inputs)
        try:
            modules = dict(graph_module.named_modules())
            matcher = AttentionMatcher(graph_module, self.root)
            candidates: list[Candidate] = []
            canonical_nodes: list[torch.fx.Node] = []
            for node in list(graph.nodes):
                if getattr(node, "_erased", False):
                    continue  # part of a chain already replaced
                kind = op_kind(node, modules)
                try:
                    if kind == "sdpa":
                        candidate = matcher.match_sdpa(node)
                    elif kind == "softmax":
                        candidate = matcher.match_manual(node, modules)
                    else:
                        continue
                except NoMatch as reason:
                    self._skip(node, str(reason))
                    continue
                # Build right away: a later attention may read this one's output.
                candidates.append(candidate)
                canonical_nodes.append(CanonicalBuilder(graph, candidate).build())
            graph.eliminate_dead_code()
            graph.lint()
            graph_module.recompile()
            if canonical_nodes:
                self._annotate(graph_module, canonical_nodes, candidates)
        finally:
            for node in graph.nodes:
                node.meta.pop(EXAMPLE_SHAPE_KEY, None)
        return PassResult(graph_module, bool(canonical_nodes))

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        found = attention_nodes(graph_module)
        if not found:
            detail = ""
            if self.skipped:
                detail = "\nCandidates that did not match:\n  " + "\n  ".join(self.skipped)
            raise NoAttentionFoundError(
                "no attention found in the captured graph: sparsify recognises "
                "scaled_dot_product_attention, nn.MultiheadAttention and the chain "
                "matmul -> (scale) -> (mask) -> softmax -> matmul." + detail
            )
        for node in found:
            if not isinstance(node.meta[SITE_META_KEY], AttentionSite):
                raise TypeError(f"node {node.name} carries {type(node.meta[SITE_META_KEY])}, not AttentionSite")

    def _skip(self, node: torch.fx.Node, reason: str) -> None:
        path, _ = module_path(node)
        message = f"{node.name} in {path or '<top>'}: {reason}"
        logger.debug("not an attention: %s", message)
        self.skipped.append(message)

    # -- annotating ----------------------------------------------------------------------------

    def _annotate(self, graph_module: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node],
                  candidates: Sequence[Candidate]) -> None:
        observed = observe_attention_inputs(graph_module, nodes, self.example_inputs)
        used_names: dict[str, int] = {}
        for index, node in enumerate(nodes):
            path, module_type = module_path(node)
            base = path or "attention"
            count = used_names.get(base, 0)
            used_names[base] = count + 1
            name = base if count == 0 else f"{base}#{count}"
            query, key, value, mask = observed[node]
            causal = bool(node.args[4]) or (mask is not None and mask_is_causal(mask))
            candidate = candidates[index]
            node.meta[SITE_META_KEY] = AttentionSite(
                name=name,
                index=index,
                num_heads=query[1],
                num_kv_heads=key[1],
                head_dim=query[3],
                value_head_dim=value[3],
                q_len=query[2],
                k_len=key[2],
                causal=causal,
                is_self_attention=is_self_attention(candidate.query, candidate.key, graph_module),
                has_mask=node.args[3] is not None,
                source=candidate.source,
                module_type=module_type,
                softcap=candidate.softcap,
                has_sinks=candidate.sinks is not None,
            )


