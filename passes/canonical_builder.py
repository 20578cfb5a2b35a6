"""Graph surgery of the find_attention pass: build the canonical attention node of a `Candidate` and erase the chain it replaces."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx

from sparsify.passes.attention_matchers import Candidate, MaskTerm, NoMatch, Segment
from sparsify.passes.graph_utils import EXAMPLE_SHAPE_KEY, dtype_of, fake_value, shape_of, static_size
from sparsify.passes.infra import CANONICAL_ATTENTION

__all__ = ["CanonicalBuilder", "erase_unused"]

aten = torch.ops.aten


class CanonicalBuilder:
    """Emits the canonical node of one candidate and rewires everything the chain fed.

    Example:
        >>> node = CanonicalBuilder(graph_module.graph, candidate).build()   # doctest: +SKIP
        >>> node.target is torch.ops.sparsify.attention.default             # doctest: +SKIP
        True
    """

    def __init__(self, graph: torch.fx.Graph, candidate: Candidate):
        self.graph = graph
        self.candidate = candidate
        self._query_sizes: dict[int, Any] = {}

    def build(self) -> torch.fx.Node:
        candidate, graph = self.candidate, self.graph
        anchor = candidate.anchor
        for user, segment in candidate.shape_users:
            self._rewire_shape_user(user, segment)
        with graph.inserting_before(anchor):
            key = candidate.key
            if candidate.key_is_transposed:
                key = graph.call_function(aten.transpose.int, (key, -2, -1))
            query = self._to_canonical(candidate.query, candidate.heads)
            key = self._to_canonical(key, None)
            value = self._to_canonical(candidate.value, None)
            mask = self._combine_masks([self._mask_to_canonical(term) for term in candidate.masks])
            attention_args = [query, key, value, mask, candidate.is_causal, candidate.scale]
            if candidate.softcap is not None or candidate.sinks is not None:
                sinks = None
                if candidate.sinks is not None:
                    sinks = graph.call_function(aten.reshape.default, (candidate.sinks, [-1]))
                attention_args += [candidate.softcap, sinks]
            attention = graph.call_function(CANONICAL_ATTENTION, tuple(attention_args))
            output = self._from_canonical(attention, shape_of(anchor))
        query_shape, value_shape = shape_of(candidate.query), shape_of(candidate.value)
        if query_shape and value_shape:
            heads = candidate.heads or 1
            attention.meta[EXAMPLE_SHAPE_KEY] = (math.prod(query_shape[:-2]) // heads, heads, query_shape[-2],
                                                 value_shape[-1])
        for meta_key in ("val", "tensor_meta", EXAMPLE_SHAPE_KEY):  # later matches read shapes of this output
            if meta_key in anchor.meta and output is not attention:
                output.meta[meta_key] = anchor.meta[meta_key]
        attention.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack") or {})
        anchor.replace_all_uses_with(output)
        erase_unused(graph, anchor)
        return attention

    # Layout conversions: every reshape in a chain splits or merges leading dims, heads innermost.

    def _to_canonical(self, node: torch.fx.Node, heads: int | None) -> torch.fx.Node:
        """``[..., seq, dim]`` with any batch·heads leading dims → ``[batch, heads, seq, dim]``."""
        rank = len(shape_of(node))
        if rank == 4:
            return node
        if rank == 3:
            heads = heads if heads is not None else self.candidate.heads
            return self.graph.call_function(aten.unflatten.int, (node, 0, [-1, heads]))
        return self.graph.call_function(aten.flatten.using_ints, (node, 0, rank - 4))

    def _from_canonical(self, attention: torch.fx.Node, anchor_shape: tuple[int, ...]) -> torch.fx.Node:
        rank = len(anchor_shape)
        if rank == 4:
            return attention
        if rank == 3:
            return self.graph.call_function(aten.flatten.using_ints, (attention, 0, 1))
        segment = self.candidate.output_segment
        sizes = [self._segment_size(segment, i) for i in range(len(segment.sizes) - 1)]
        return self.graph.call_function(aten.unflatten.int, (attention, 0, sizes))

    def _mask_to_canonical(self, term: MaskTerm) -> MaskTerm:
        """Bring a mask applied in a chain segment to broadcast over ``[batch, heads, q, k]``."""
        graph, mask = self.graph, term.node
        leading = len(term.segment.sizes)
        mask_shape = shape_of(mask)
        if mask_shape is None:
            return term
        rank = leading + 2
        if leading == 2 or len(mask_shape) <= 2:
            return term  # broadcasts as it is
        for _ in range(rank - len(mask_shape)):
            mask = graph.call_function(aten.unsqueeze.default, (mask, 0))
        mask_leading = ((1,) * (rank - len(mask_shape)) + tuple(mask_shape))[:leading]
        if leading == 1:
            if mask_leading[0] == 1:
                mask = graph.call_function(aten.unsqueeze.default, (mask, 0))
            else:
                mask = graph.call_function(aten.unflatten.int, (mask, 0, [-1, self.candidate.heads]))
            return dataclasses.replace(term, node=mask)
        # leading >= 3: [..., heads] -> [prod(...), heads]; expand where a merged group mixes 1 and full sizes.
        group = mask_leading[:-1]
        if any(size != 1 for size in group) and any(size == 1 for size in group):
            sizes = [self._segment_size(term.segment, i) if size == 1 else -1 for i, size in enumerate(group)]
            mask = graph.call_function(aten.expand.default, (mask, sizes + [-1, -1, -1]))
        mask = graph.call_function(aten.flatten.using_ints, (mask, 0, leading - 2))
        return dataclasses.replace(term, node=mask)

    def _combine_masks(self, terms: list[MaskTerm]) -> torch.fx.Node | None:
        """One mask node (bool keep-mask or additive float) equivalent to all collected terms."""
        graph = self.graph
        if not terms:
            return None
        bools = []
        additive_terms = []
        dtype = dtype_of(self.candidate.query) or torch.float32
        for term in terms:
            if term.kind == "additive":
                additive_terms.append((term.node, term.multiplier))
            elif math.isinf(term.fill):
                node = term.node if term.kind == "keep" else graph.call_function(aten.logical_not.default, (term.node,))
                bools.append(node)
            else:
                # where(hidden, fill, 0): the model set hidden scores to a finite fill, so rows
                # it hides entirely keep their uniform weights.
                hidden, kept = (term.fill, 0.0) if term.kind == "drop" else (0.0, term.fill)
                node = graph.call_function(aten.where.Scalar, (term.node, hidden, kept))
                node = graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
                additive_terms.append((node, term.multiplier))
        additive = None
        for node, multiplier in additive_terms:
            if multiplier != 1.0:
                node = graph.call_function(aten.mul.Tensor, (node, multiplier))
            additive = node if additive is None else graph.call_function(aten.add.Tensor, (additive, node))
        keep = None
        for node in bools:
            keep = node if keep is None else graph.call_function(aten.logical_and.default, (keep, node))
        if additive is None:
            return keep
        if keep is None:
            return additive
        return graph.call_function(aten.where.ScalarOther, (keep, additive, float("-inf")))

    # Sizes: ints where the graph fixes them, else symbolic sizes read from q or the chain's reshapes.

    def _query_size(self, dim: int) -> Any:
        query = self.candidate.query
        size = static_size(query, dim)
        if size is not None:
            return size
        if dim not in self._query_sizes:
            with self._inserting_after_definition(query):
                self._query_sizes[dim] = self.graph.call_function(aten.sym_size.int, (query, dim))
        return self._query_sizes[dim]

    def _inserting_after_definition(self, node: torch.fx.Node):
        if node.op == "placeholder":
            first = next(n for n in self.graph.nodes if n.op != "placeholder")
            return self.graph.inserting_before(first)
        return self.graph.inserting_after(node)

    def _segment_size(self, segment: Segment, dim: int) -> Any:
        """Leading size ``dim`` of a chain segment, as an int or a symbolic-size node."""
        query_leading = len(shape_of(self.candidate.query)) - 2
        if segment.args is None:
            if tuple(shape_of(self.candidate.query)[:-2]) == segment.sizes:
                return self._query_size(dim)
            raise NoMatch("a segment of the scores whose sizes are not those of q")
        size = segment.args[dim]
        if not (isinstance(size, int) and size == -1):
            return size
        others = [s for i, s in enumerate(segment.args[:len(segment.sizes)]) if i != dim]
        total: Any = 1
        for i in range(query_leading):
            total = _multiply(self.graph, total, self._query_size(i))
        divisor: Any = 1
        for other in others:
            divisor = _multiply(self.graph, divisor, other)
        if isinstance(total, int) and isinstance(divisor, int):
            return total // divisor
        return self.graph.call_function(operator.floordiv, (total, divisor))

    def _rewire_shape_user(self, user: torch.fx.Node, segment: Segment) -> None:
        """Point a read of a chain node's shape at sizes of q and k, so the chain can go."""
        graph, candidate = self.graph, self.candidate
        key = candidate.key
        leading = len(segment.sizes)
        with graph.inserting_before(user):
            def size(dim: int) -> Any:
                dim = dim % (leading + 2)
                if dim < leading:
                    return self._segment_size(segment, dim)
                if dim == leading:
                    return self._query_size(len(shape_of(candidate.query)) - 2)
                key_dim = -1 if candidate.key_is_transposed else -2
                fixed = static_size(key, key_dim)
                return fixed if fixed is not None else graph.call_function(aten.sym_size.int, (key, key_dim))

            source = user.args[0]
            if user.target is aten.sym_size.int:
                replacement = size(user.args[1])
                if isinstance(replacement, torch.fx.Node):
                    user.replace_all_uses_with(replacement)
                else:
                    for consumer in list(user.users):
                        consumer.args = torch.fx.node.map_arg(consumer.args, lambda n: replacement if n is user else n)
                        consumer.kwargs = torch.fx.node.map_arg(consumer.kwargs, lambda n: replacement if n is user else n)
                graph.erase_node(user)
                return
            value = fake_value(source)
            dtype = user.kwargs.get("dtype") or (value.dtype if isinstance(value, torch.Tensor) else None)
            if user.target in (aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default):
                sizes = user.args[1]
                fill = {aten.new_ones.default: 1.0, aten.new_full.default: user.args[2] if len(user.args) > 2 else 0.0}.get(
                    user.target, 0.0)
            else:
                sizes = [size(d) for d in range(leading + 2)]
                fill = {aten.ones_like.default: 1.0, aten.full_like.default: user.args[1] if len(user.args) > 1 else 0.0}.get(
                    user.target, 0.0)
            # new_full on q: same device as the model runs on, whatever the example's device was.
            replacement = graph.call_function(aten.new_full.default, (candidate.query, sizes, fill), {"dtype": dtype})
        replacement.meta.update({k: v for k, v in user.meta.items() if k in ("val", "tensor_meta", EXAMPLE_SHAPE_KEY)})
        user.replace_all_uses_with(replacement)
        graph.erase_node(user)


def _multiply(graph: torch.fx.Graph, left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int):
        return left * right
    if isinstance(left, int) and left == 1:
        return right
    if isinstance(right, int) and right == 1:
        return left
    return graph.call_function(operator.mul, (left, right))



def erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase ``node`` and then its inputs while they have no users left.

    ``Graph.eliminate_dead_code`` keeps random ops (SDPA and dropout are "nondeterministic
    seeded") and in-place ops, so the replaced chain is removed explicitly.
    """
    pending = [node]
    while pending:
        current = pending.pop()
        if current.users or current.op not in ("call_function", "call_method", "call_module") or current.graph is not graph:
            continue
        if getattr(current, "_erased", False):
            continue
        inputs = [n for n in current.all_input_nodes]
        graph.erase_node(current)
        pending.extend(inputs)
