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

import dataclasses
import logging
import math
import operator
from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

import sparsify.ops  # noqa: F401  (registers torch.ops.sparsify.attention)
from sparsify.errors import NoAttentionFoundError
from sparsify.passes.graph_utils import (
    EXAMPLE_SHAPE_KEY,
    arg,
    constant_value,
    dtype_of,
    fake_value,
    is_float_scalar,
    module_path,
    op_kind,
    shape_of,
    static_size,
)
from sparsify.passes.infra import SITE_META_KEY, GraphPass, attention_nodes
from sparsify.site import AttentionSite

logger = logging.getLogger(__name__)
aten = torch.ops.aten
CANONICAL_ATTENTION = torch.ops.sparsify.attention.default

# A fill value at or below this hides a key as well as -inf does (HF uses finfo.min, others -1e9).
_MASKING_FILL = -1.0e4
_METADATA_ASSERTS = (aten._assert_tensor_metadata.default,)
# Attributes under which attention modules commonly keep their head count.
_HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
# How far the self/cross check walks up from q and k to the tensors they were projected from.
_SOURCE_SEARCH_NODES = 200


class _NoMatch(Exception):
    """A candidate is not an attention sparsify can canonicalise (the message says why)."""


@dataclasses.dataclass
class _Segment:
    """A stretch of the score chain between two reshapes: its leading (batch·heads) dims.

    ``sizes`` are the example sizes; ``args`` the size arguments the graph holds for them (an
    int, a symbolic-size node, or -1), from the reshape that produced the segment, or None
    for the segment right below ``q @ kᵀ`` (its sizes are those of ``q``).
    """

    sizes: tuple[int, ...]
    args: list[Any] | None = None


@dataclasses.dataclass
class _MaskTerm:
    kind: str  # "additive" (added to the scores), "keep" (bool, True = attend), "drop" (bool, True = hide)
    node: torch.fx.Node
    segment: _Segment
    multiplier: float = 1.0
    # For keep/drop: the value hidden scores were set to. -inf is a plain bool mask; a finite fill
    # (finfo.min) becomes an additive mask, so rows the mask hides entirely stay uniform as in the model.
    fill: float = float("-inf")


@dataclasses.dataclass
class _Candidate:
    """One matched attention, before its canonical node is built."""

    anchor: torch.fx.Node  # the node whose value the canonical attention replaces
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    key_is_transposed: bool  # `key` is kᵀ ([..., dim, k_len]) and needs a transpose
    masks: list[_MaskTerm]
    is_causal: bool
    scale: float | None
    source: str
    softcap: float | None = None
    sinks: torch.fx.Node | None = None  # the per-head sink logits (numel == heads)
    heads: int | None = None  # query heads (canonical dim 1)
    output_segment: _Segment | None = None  # leading dims of the anchor's value (None: as q's)
    shape_users: list[tuple[torch.fx.Node, _Segment]] = dataclasses.field(default_factory=list)


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
        self._graph_module: torch.fx.GraphModule | None = None

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if self.example_inputs is None:
            raise ValueError("find_attention needs the example inputs the graph was captured with")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self._graph_module = graph_module
        graph = graph_module.graph
        # Export's dtype assertions would keep replaced nodes alive; they check nothing we rely on.
        for node in list(graph.nodes):
            if node.target in _METADATA_ASSERTS:
                graph.erase_node(node)
        graph.eliminate_dead_code()
        _record_example_shapes(graph_module, self.example_inputs)
        try:
            modules = dict(graph_module.named_modules())
            candidates: list[_Candidate] = []
            canonical_nodes: list[torch.fx.Node] = []
            for node in list(graph.nodes):
                if getattr(node, "_erased", False):
                    continue  # part of a chain already replaced
                kind = op_kind(node, modules)
                try:
                    if kind == "sdpa":
                        candidate = self._match_sdpa(node)
                    elif kind == "softmax":
                        candidate = self._match_manual(node, modules)
                    else:
                        continue
                except _NoMatch as reason:
                    self._skip(node, str(reason))
                    continue
                # Build right away: a later attention may read this one's output.
                candidates.append(candidate)
                canonical_nodes.append(_Builder(graph, candidate).build())
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

    # -- matching ------------------------------------------------------------------------------

    def _skip(self, node: torch.fx.Node, reason: str) -> None:
        path, _ = module_path(node)
        message = f"{node.name} in {path or '<top>'}: {reason}"
        logger.debug("not an attention: %s", message)
        self.skipped.append(message)

    def _match_sdpa(self, node: torch.fx.Node) -> _Candidate:
        query, key, value = node.args[:3]
        mask = arg(node, 3, "attn_mask")
        dropout = arg(node, 4, "dropout_p", 0.0)
        is_causal = arg(node, 5, "is_causal", False)
        scale = arg(node, 6, "scale")
        if not all(isinstance(n, torch.fx.Node) for n in (query, key, value)):
            raise _NoMatch("query/key/value are not graph values")
        if not isinstance(is_causal, bool) or (scale is not None and not is_float_scalar(scale)):
            raise _NoMatch("is_causal/scale are not constants")
        rank = len(shape_of(query) or ())
        if rank != 4:
            raise _NoMatch(f"query has rank {rank}, expected [batch, heads, seq, dim]")
        if isinstance(dropout, (int, float)) and dropout > 0:
            logger.warning("%s: attention dropout %.3g is ignored (sparsify compiles for inference)", node.name, dropout)
        key, value = _unrepeat_key_value(key, value)
        segment = _Segment(tuple(shape_of(query)[:2]))
        masks = [] if mask is None else [_MaskTerm("keep" if _is_bool(mask) else "additive", mask, segment)]
        return _Candidate(node, query, key, value, False, masks, is_causal,
                          float(scale) if scale is not None else None, "sdpa", heads=shape_of(query)[1],
                          output_segment=segment)

    def _match_manual(self, softmax: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> _Candidate:
        scores = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
        dim = arg(softmax, 1, "dim")
        score_shape = shape_of(scores)
        if score_shape is None or dim not in (-1, len(score_shape) - 1):
            raise _NoMatch(f"softmax over dim {dim}, not the last")
        if len(score_shape) < 3:
            raise _NoMatch(f"softmax input of rank {len(score_shape)}; expected [batch(*heads), q, k]")
        shape_users: list[tuple[torch.fx.Node, _Segment]] = []
        softmax_segment = _Segment(tuple(score_shape[:-2]))
        anchor, value, drops_last_column, output_segment = self._walk_down(softmax, softmax_segment, modules)

        # Upward: softmax input -> ... -> q @ kᵀ, collecting steps (in reverse order).
        steps: list[tuple[str, Any]] = []
        segment = softmax_segment
        sinks = None
        current = scores
        while True:
            if not isinstance(current, torch.fx.Node):
                raise _NoMatch("scores are not a graph value")
            self._check_users(current, segment, shape_users, modules)
            kind = op_kind(current, modules)
            if kind == "cast":
                current = current.args[0]
            elif kind == "view":
                above = current.args[0]
                above_shape, below_shape = shape_of(above), shape_of(current)
                if not _splits_or_merges_leading(above_shape, below_shape):
                    raise _NoMatch(f"{current.name} reshapes more than the batch·heads dims of the scores")
                segment.args = _reshape_args(current)
                segment = _Segment(tuple(above_shape[:-2]))
                current = above
            elif kind in ("mul", "div"):
                left, right = current.args[:2]
                factor = constant_value(right, self._graph_module) if isinstance(left, torch.fx.Node) else None
                if factor is not None:
                    current = left
                elif kind == "mul" and isinstance(right, torch.fx.Node) and constant_value(left, self._graph_module) is not None:
                    factor, current = constant_value(left, self._graph_module), right
                else:
                    raise _NoMatch(f"scores scaled by a tensor at {current.name}")
                factor = factor if kind == "mul" else 1.0 / factor
                if not factor > 0:
                    raise _NoMatch(f"non-positive score scale {factor}")
                steps.append(("scale", factor))
            elif kind == "tanh":
                inner = current.args[0]
                divisor = 1.0
                inner_kind = op_kind(inner, modules) if isinstance(inner, torch.fx.Node) else None
                if inner_kind in ("mul", "div") and len(inner.users) == 1:
                    number = constant_value(inner.args[1], self._graph_module)
                    if number is not None and number > 0:
                        divisor = number if inner_kind == "div" else 1.0 / number
                        inner = inner.args[0]
                steps.append(("softcap", divisor))
                current = inner
            elif kind in ("add", "sub"):
                left, right = current.args[:2]
                alpha = current.kwargs.get("alpha", 1)
                if alpha != 1:
                    raise _NoMatch(f"{kind} with alpha at {current.name}")
                if constant_value(right, self._graph_module) is not None or constant_value(left, self._graph_module) is not None:
                    if sinks is not None:
                        raise _NoMatch("a constant shift of the scores but not of the sinks")
                    if kind == "sub" and constant_value(left, self._graph_module) is not None:
                        raise _NoMatch(f"scores negated at {current.name}")
                    # A constant shift does not change the softmax.
                    current = left if constant_value(right, self._graph_module) is not None else right
                    continue
                if kind == "sub" and _is_row_max_of(right, left, modules):
                    if sinks is not None:
                        raise _NoMatch("a row-max shift of the scores but not of the sinks")
                    current = left  # x - max(x, -1): a per-row shift does not change the softmax
                    continue
                if _reaches_product(left, modules):
                    steps.append(("mask", ("additive", right, segment, -1.0 if kind == "sub" else 1.0)))
                    current = left
                elif kind == "add" and _reaches_product(right, modules):
                    steps.append(("mask", ("additive", left, segment, 1.0)))
                    current = right
                elif kind == "sub" and _reaches_product(right, modules):
                    raise _NoMatch(f"scores negated at {current.name}")
                else:
                    raise _NoMatch(f"no q @ kᵀ above {current.name}")
            elif kind == "masked_fill":
                source, condition, fill = current.args[:3]
                number = constant_value(fill, self._graph_module)
                if not (number is not None and number <= _MASKING_FILL):
                    raise _NoMatch(f"masked_fill with {fill!r}, not a masking value")
                steps.append(("mask", ("drop", condition, segment, 1.0, number)))
                current = source
            elif kind == "where":
                condition, when_true, when_false = current.args[:3]
                false_fill = constant_value(when_false, self._graph_module)
                true_fill = constant_value(when_true, self._graph_module)
                if false_fill is not None and false_fill <= _MASKING_FILL and isinstance(when_true, torch.fx.Node):
                    steps.append(("mask", ("keep", condition, segment, 1.0, false_fill)))
                    current = when_true
                elif true_fill is not None and true_fill <= _MASKING_FILL and isinstance(when_false, torch.fx.Node):
                    steps.append(("mask", ("drop", condition, segment, 1.0, true_fill)))
                    current = when_false
                else:
                    raise _NoMatch("where(cond, scores, other) whose `other` is not a constant masking value "
                                   "(<= -1e4); if the model offers attn_implementation='sdpa', use it")
            elif kind == "cat":
                parts, cat_dim = current.args[0], arg(current, 1, "dim", 0)
                rank = len(shape_of(current) or ())
                if sinks is not None or not drops_last_column or len(parts) != 2 or cat_dim not in (-1, rank - 1):
                    raise _NoMatch(f"concatenation at {current.name} is not scores + one sink column "
                                   f"whose probability is dropped after the softmax")
                if (shape_of(parts[1]) or (0,))[-1] != 1:
                    raise _NoMatch(f"the column concatenated at {current.name} is not one sink per row")
                sinks = _per_head_source(parts[1], modules)
                if sinks is None:
                    raise _NoMatch(f"the sink column at {current.name} does not come from one logit per head")
                current = parts[0]
            elif kind == "baddbmm":
                bias, batch1, batch2 = current.args[:3]
                beta = current.kwargs.get("beta", 1)
                alpha = current.kwargs.get("alpha", 1)
                if beta != 1 or not is_float_scalar(alpha) or alpha <= 0:
                    raise _NoMatch("baddbmm with beta != 1")
                steps.append(("mask", ("additive", bias, segment, 1.0)))
                if alpha != 1:
                    steps.append(("scale", float(alpha)))
                query, key_transposed = batch1, batch2
                break
            elif kind in ("matmul", "bmm"):
                query, key_transposed = current.args[:2]
                break
            else:
                raise _NoMatch(f"scores come from {current.name} ({current.target}), not q @ kᵀ")
        if drops_last_column and sinks is None:
            raise _NoMatch("the last probability column is dropped but no sink column was concatenated")
        segment.args = None  # the product's own segment: sizes are those of q
        # Scales applied to q or kᵀ before the product fold into the scale.
        query, query_factor = self._peel_scale(query, modules)
        key_transposed, key_factor = self._peel_scale(key_transposed, modules)
        steps.append(("scale", query_factor * key_factor))

        # Apply the collected steps in forward order: softmax(softcap(S * scale) + masks).
        scale, softcap = 1.0, None
        masks: list[_MaskTerm] = []
        for step, payload in reversed(steps):
            if step == "scale":
                scale *= payload
                if softcap is not None:
                    softcap *= payload  # a·c·tanh(sS/c) = c'·tanh(s'S/c') with c' = a·c, s' = a·s
                for term in masks:
                    term.multiplier *= payload
            elif step == "softcap":
                if masks:
                    raise _NoMatch("a mask added before the soft-capping tanh")
                if softcap is not None:
                    raise _NoMatch("two soft-capping tanh in one chain")
                # tanh(x / B) = (1/B) · softcap_B(x): soft-cap at B, then scale by 1/B.
                softcap = payload
                scale /= payload
                softcap /= payload
            else:
                term_kind, node, term_segment, multiplier, *fill = payload
                if term_kind == "additive" and _is_bool(node):
                    term_kind = "keep"
                masks.append(_MaskTerm(term_kind, node, term_segment, multiplier, *fill))
        if softcap is not None and not math.isfinite(softcap):
            raise _NoMatch("soft-capping value is not finite")

        rank = len(shape_of(query) or ())
        if rank < 3 or len(shape_of(value) or ()) < 3:
            raise _NoMatch(f"q/v of rank {rank}; expected [batch(*heads), seq, dim]")
        key, transposed = _untranspose(key_transposed)
        source = "multihead_attention" if module_path(softmax)[1].endswith("MultiheadAttention") else "manual"
        if rank == 4 and not transposed:
            key, value = _unrepeat_key_value(key, value)
        candidate = _Candidate(anchor, query, key, value, transposed, masks, False, scale, source,
                               softcap=softcap, sinks=sinks, output_segment=output_segment, shape_users=shape_users)
        candidate.heads = self._canonical_heads(candidate, [softmax_segment, output_segment, segment], softmax)
        _check_layouts(candidate, [softmax_segment, output_segment, segment])
        return candidate

    def _walk_down(self, softmax: torch.fx.Node, segment: _Segment, modules) -> tuple:
        """Probabilities -> (dropout / cast / batch·heads reshape / sink-column drop)* -> matmul with v."""
        current = softmax
        drops_last_column = False
        while True:
            if len(current.users) != 1:
                raise _NoMatch("attention probabilities are used elsewhere (e.g. returned as weights)")
            user = next(iter(current.users))
            kind = op_kind(user, modules)
            if kind in ("dropout", "cast") and user.args and user.args[0] is current:
                current = user
                continue
            if kind == "view" and user.args[0] is current and _splits_or_merges_leading(shape_of(current), shape_of(user)):
                segment = _Segment(tuple(shape_of(user)[:-2]), _reshape_args(user))
                current = user
                continue
            if not drops_last_column and _drops_last_column(user, current):
                drops_last_column = True
                current = user
                continue
            if kind in ("matmul", "bmm") and user.args[0] is current:
                return user, user.args[1], drops_last_column, segment
            raise _NoMatch(f"probabilities flow into {user.name} ({user.target}), not a matmul with v")

    def _check_users(self, node: torch.fx.Node, segment: _Segment, shape_users: list, modules) -> None:
        """A chain node may feed the next chain step, reads of its shape, and a row max that shifts it."""
        chain_users = []
        for user in node.users:
            kind = op_kind(user, modules)
            if kind == "shape_only" and user.args and user.args[0] is node:
                if user.op != "call_function" or op_kind(node, modules) == "cat":
                    raise _NoMatch(f"the shape of {node.name} is read by {user.name}, which cannot be rewired")
                shape_users.append((user, segment))
            elif kind == "row_max" and user.args[0] is node:
                continue  # x - max(x, -1): checked where the shift is subtracted, removed with the chain
            else:
                chain_users.append(user)
        if len(chain_users) != 1:
            raise _NoMatch(f"scores at {node.name} are used elsewhere")

    def _peel_scale(self, node: Any, modules) -> tuple[Any, float]:
        """``(x, a)`` when ``node`` is ``x * a`` / ``x / (1/a)`` with a constant ``a`` used only by the product."""
        factor = 1.0
        while isinstance(node, torch.fx.Node) and len(node.users) == 1 and op_kind(node, modules) in ("mul", "div"):
            kind = op_kind(node, modules)
            left, right = node.args[:2]
            if isinstance(left, torch.fx.Node) and constant_value(right, self._graph_module) is not None:
                number, inner = constant_value(right, self._graph_module), left
            elif kind == "mul" and isinstance(right, torch.fx.Node) and constant_value(left, self._graph_module) is not None:
                number, inner = constant_value(left, self._graph_module), right
            else:
                break
            if not number > 0:
                break
            factor *= number if kind == "mul" else 1.0 / number
            node = inner
        return node, factor

    def _canonical_heads(self, candidate: _Candidate, segments: Sequence[_Segment], node: torch.fx.Node) -> int:
        """Query heads: dim 1 of a ``[batch, heads, ...]`` layout in the chain, else the module's head count."""
        for sizes in [tuple((shape_of(candidate.query) or ())[:-2])] + [s.sizes for s in segments]:
            if len(sizes) >= 2:
                return sizes[-1]
        return self._heads_of(node, candidate.query)

    def _heads_of(self, node: torch.fx.Node, query: torch.fx.Node) -> int:
        """Heads folded into dim 0 of a 3-D query: from the enclosing module, else 1."""
        path, _ = module_path(node)
        if self.root is not None and path:
            try:
                module = self.root.get_submodule(path)
            except AttributeError:
                module = None
            for attribute in _HEAD_COUNT_ATTRIBUTES:
                heads = getattr(module, attribute, None)
                if isinstance(heads, int) and heads > 0 and (shape_of(query) or (0,))[0] % heads == 0:
                    return heads
        return 1

    # -- annotating ----------------------------------------------------------------------------

    def _annotate(self, graph_module: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node],
                  candidates: Sequence[_Candidate]) -> None:
        observed = _observe_inputs(graph_module, nodes, self.example_inputs)
        used_names: dict[str, int] = {}
        for index, node in enumerate(nodes):
            path, module_type = module_path(node)
            base = path or "attention"
            count = used_names.get(base, 0)
            used_names[base] = count + 1
            name = base if count == 0 else f"{base}#{count}"
            query, key, value, mask = observed[node]
            causal = bool(node.args[4]) or (mask is not None and _mask_is_causal(mask))
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
                is_self_attention=_same_source(candidate.query, candidate.key, graph_module),
                has_mask=node.args[3] is not None,
                source=candidate.source,
                module_type=module_type,
                softcap=candidate.softcap,
                has_sinks=candidate.sinks is not None,
            )


# -- building ------------------------------------------------------------------------------------


class _Builder:
    """Emits the canonical node of one candidate and rewires everything the chain fed."""

    def __init__(self, graph: torch.fx.Graph, candidate: _Candidate):
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
        _erase_unused(graph, anchor)
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

    def _mask_to_canonical(self, term: _MaskTerm) -> _MaskTerm:
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

    def _combine_masks(self, terms: list[_MaskTerm]) -> torch.fx.Node | None:
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

    def _segment_size(self, segment: _Segment, dim: int) -> Any:
        """Leading size ``dim`` of a chain segment, as an int or a symbolic-size node."""
        query_leading = len(shape_of(self.candidate.query)) - 2
        if segment.args is None:
            if tuple(shape_of(self.candidate.query)[:-2]) == segment.sizes:
                return self._query_size(dim)
            raise _NoMatch("a segment of the scores whose sizes are not those of q")
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

    def _rewire_shape_user(self, user: torch.fx.Node, segment: _Segment) -> None:
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


# -- matching helpers ----------------------------------------------------------------------------


def _splits_or_merges_leading(above: tuple[int, ...] | None, below: tuple[int, ...] | None) -> bool:
    """A reshape that keeps the last two dims and only regroups the dims before them."""
    if above is None or below is None or len(above) < 3 or len(below) < 3:
        return False
    return above[-2:] == below[-2:] and math.prod(above[:-2]) == math.prod(below[:-2])


def _reshape_args(node: torch.fx.Node) -> list[Any] | None:
    """The size arguments of a ``view``/``reshape``, or the example sizes where they are fixed."""
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and isinstance(
            node.args[1], (list, tuple)):
        return list(node.args[1])
    shape = shape_of(node)
    value = fake_value(node)
    if isinstance(value, torch.Tensor) and all(isinstance(s, int) for s in value.shape):
        return list(shape)
    return None


def _check_layouts(candidate: _Candidate, segments: Sequence[_Segment]) -> None:
    """Every segment regroups the same batch·heads; masks applied in one can be brought to canonical."""
    heads = candidate.heads
    total = math.prod(shape_of(candidate.query)[:-2])
    if not heads or total % heads:
        raise _NoMatch(f"{heads} heads do not divide the batch·heads size {total}")
    for segment in list(segments) + [term.segment for term in candidate.masks]:
        if math.prod(segment.sizes) != total:
            raise _NoMatch("the scores' batch·heads dims change size along the chain")
        if len(segment.sizes) >= 2 and segment.sizes[-1] != heads:
            raise _NoMatch(f"a reshape in the chain leaves {segment.sizes[-1]} as the inner dim, not the {heads} heads")
    query_leading = tuple(shape_of(candidate.query)[:-2])

    def resolvable(segment: _Segment) -> bool:
        return segment.args is not None or segment.sizes == query_leading

    needs_sizes = [segment for _, segment in candidate.shape_users]
    if len(shape_of(candidate.anchor) or ()) > 4:
        needs_sizes.append(candidate.output_segment)
    needs_sizes += [term.segment for term in candidate.masks if len(term.segment.sizes) >= 3]
    if not all(resolvable(segment) for segment in needs_sizes):
        raise _NoMatch("a reshape in the chain has sizes the graph does not spell out")
    if candidate.sinks is not None and math.prod(shape_of(candidate.sinks) or (0,)) != heads:
        raise _NoMatch(f"the sinks hold {math.prod(shape_of(candidate.sinks) or (0,))} logits for {heads} heads")


def _drops_last_column(user: torch.fx.Node, source: torch.fx.Node) -> bool:
    """``probabilities[..., :-1]`` (aten ``slice`` or a torch-level ``getitem``)."""
    shape = shape_of(source)
    if shape is None:
        return False
    if user.target is aten.slice.Tensor and user.args[0] is source:
        dim = arg(user, 1, "dim", 0)
        start = arg(user, 2, "start", None)
        end = arg(user, 3, "end", None)
        return dim in (-1, len(shape) - 1) and start in (None, 0) and isinstance(end, int) and end in (-1, shape[-1] - 1)
    if user.target is operator.getitem and user.args[0] is source and isinstance(user.args[1], tuple):
        index = user.args[1]
        return (len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
                and index[1].start in (None, 0) and index[1].stop == -1 and index[1].step is None)
    return False


def _per_head_source(node: Any, modules, depth: int = 8) -> torch.fx.Node | None:
    """The tensor of one logit per head that a broadcast sink column was expanded from."""
    while isinstance(node, torch.fx.Node) and depth > 0:
        shape = shape_of(node)
        if shape is not None and sum(1 for s in shape if s != 1) <= 1 and node.op in ("get_attr", "placeholder"):
            return node
        kind = op_kind(node, modules)
        if kind in ("cast", "view", "unsqueeze", "expand"):
            node = node.args[0]
        else:
            return node if shape is not None and sum(1 for s in shape if s != 1) <= 1 else None
        depth -= 1
    return None


def _is_row_max_of(node: Any, source: Any, modules) -> bool:
    """``node`` is ``max(source, dim=-1, keepdim=True)`` (values), possibly detached or cast."""
    for _ in range(4):
        if not isinstance(node, torch.fx.Node):
            return False
        kind = op_kind(node, modules)
        if kind == "cast":
            node = node.args[0]
        elif kind == "getitem" and node.args[1] == 0:
            node = node.args[0]
        elif kind == "row_max":
            dim = arg(node, 1, "dim")
            keepdim = arg(node, 2, "keepdim", False)
            rank = len(shape_of(source) or ())
            dims = dim if isinstance(dim, (list, tuple)) else [dim]
            return node.args[0] is source and keepdim and [d % rank for d in dims] == [rank - 1] if rank else False
        else:
            return False
    return False


def _record_example_shapes(graph_module: torch.fx.GraphModule, example_inputs: tuple[tuple, dict] | None) -> None:
    """Run the graph once on the example and record every tensor's concrete shape in ``node.meta``.

    Export leaves data-dependent sizes (a text length taken from a mask) without a hint; the
    example run gives the matcher the sizes the model really had.
    """
    if example_inputs is None:
        return
    from sparsify.capture import flat_graph_inputs

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                node.meta[EXAMPLE_SHAPE_KEY] = tuple(result.shape)
            return result

    with torch.no_grad():
        Recorder(graph_module).run(*flat_graph_inputs(graph_module, *example_inputs))


def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
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


def _is_bool(node: Any) -> bool:
    return dtype_of(node) == torch.bool


def _reaches_product(node: Any, modules: dict[str, torch.nn.Module], depth: int = 12) -> bool:
    """Whether walking up the score chain from ``node`` reaches a matmul/bmm/baddbmm."""
    while isinstance(node, torch.fx.Node) and depth > 0:
        kind = op_kind(node, modules)
        if kind in ("matmul", "bmm", "baddbmm"):
            return True
        if kind in ("cast", "mul", "div", "masked_fill", "view", "tanh"):
            node = node.args[0]
        elif kind == "sub":
            return _reaches_product(node.args[0], modules, depth - 1) or _reaches_product(node.args[1], modules, depth - 1)
        elif kind == "cat":
            node = node.args[0][0] if node.args[0] else None
        elif kind == "where":
            return (_reaches_product(node.args[1], modules, depth - 1)
                    or _reaches_product(node.args[2], modules, depth - 1))
        elif kind == "add":
            return _reaches_product(node.args[0], modules, depth - 1) or _reaches_product(node.args[1], modules, depth - 1)
        else:
            return False
        depth -= 1
    return False


def _untranspose(node: torch.fx.Node) -> tuple[torch.fx.Node, bool]:
    """``(k, False)`` when ``node`` is ``k.transpose(-2, -1)``, else ``(node, True)`` (kᵀ itself)."""
    shape = shape_of(node)
    if shape is None:
        return node, True
    rank = len(shape)
    kind = op_kind(node)
    if kind == "transpose" and len(node.args) >= 3:
        dims = {d % rank for d in node.args[1:3] if isinstance(d, int)}
        if dims == {rank - 2, rank - 1} and isinstance(node.args[0], torch.fx.Node):
            return node.args[0], False
    if kind == "permute":
        order = list(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        expected = list(range(rank - 2)) + [rank - 1, rank - 2]
        if [d % rank for d in order if isinstance(d, int)] == expected and isinstance(node.args[0], torch.fx.Node):
            return node.args[0], False
    return node, True


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


def _unrepeat_key_value(key: torch.fx.Node, value: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Un-repeat GQA keys/values when both were repeated by the same factor."""
    key_source, value_source = _unrepeat_one(key), _unrepeat_one(value)
    if key_source and value_source and key_source[1] == value_source[1]:
        return key_source[0], value_source[0]
    return key, value


# -- self or cross attention ---------------------------------------------------------------------


def _same_source(query: torch.fx.Node, key: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    """Self attention when q and k are projected from the same tensor, whatever their lengths.

    Walks up from q and from k to the inputs of the nearest projections (a linear layer or a
    matmul with a weight); q and k that share one such input read one sequence. Where no
    projection is found, the graph inputs reached stand in.
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


# -- example values ------------------------------------------------------------------------------


def _mask_is_causal(mask: torch.Tensor, rows_per_chunk: int = 256) -> bool:
    """Whether a mask hides every key after its query (top-left aligned) yet leaves the rest open.

    Checked on the example's concrete mask, chunk by chunk of query rows, so no further
    ``q_len × k_len`` tensor is built.
    """
    q_len, k_len = mask.shape[-2], mask.shape[-1]
    if q_len < 2 or k_len < 2:
        return False
    any_visible = False
    keys = torch.arange(k_len, device=mask.device)
    for start in range(0, q_len, rows_per_chunk):
        rows = torch.arange(start, min(q_len, start + rows_per_chunk), device=mask.device).unsqueeze(-1)
        chunk = mask[..., start:start + rows_per_chunk, :]
        hidden = ~chunk if chunk.dtype == torch.bool else chunk <= _MASKING_FILL
        future = keys > rows
        if not bool((hidden | ~future).all()):
            return False  # some key after its query is visible
        any_visible = any_visible or bool((~hidden & ~future).any())
    return any_visible


class _Observer(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, watched: set[torch.fx.Node]):
        super().__init__(module)
        self.watched = watched
        self.seen: dict[torch.fx.Node, tuple] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        if node in self.watched:
            query, key, value, mask = (self.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[:4])
            self.seen[node] = (tuple(query.shape), tuple(key.shape), tuple(value.shape),
                               mask.detach() if isinstance(mask, torch.Tensor) else None)
        return super().run_node(node)


def _observe_inputs(graph_module: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node],
                    example_inputs: tuple[tuple, dict] | None) -> dict[torch.fx.Node, tuple]:
    """Shapes of q/k/v and the mask value of each canonical node, from one run on the example."""
    if example_inputs is None:
        raise ValueError("find_attention needs the example inputs the graph was captured with")
    from sparsify.capture import flat_graph_inputs

    observer = _Observer(graph_module, set(nodes))
    with torch.no_grad():
        observer.run(*flat_graph_inputs(graph_module, *example_inputs))
    missing = [n.name for n in nodes if n not in observer.seen]
    if missing:
        raise RuntimeError(f"attention nodes {missing} did not run on the example inputs")
    return observer.seen
