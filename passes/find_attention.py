"""The `find_attention` pass: turn every attention in a captured graph into one canonical node.

Matched forms (at aten level from ``torch.export`` and at torch level from ``symbolic_trace``):

* ``scaled_dot_product_attention`` — no mask, bool or additive mask, ``is_causal``, custom
  ``scale``, ``enable_gqa``; key/value heads repeated before the call (``repeat_kv``:
  unsqueeze → expand → reshape, or ``repeat_interleave``) are un-repeated so the site is GQA;
* the hand-written chain ``q @ kᵀ`` → scale (``*``/``/`` a number) → optional ``+ mask`` /
  ``masked_fill`` / ``where`` → ``softmax(-1)`` → optional dropout / cast → ``@ v``, on 4-D
  ``[batch, heads, seq, dim]`` or 3-D ``[batch*heads, seq, dim]`` tensors (``bmm``/``baddbmm``
  as ``nn.MultiheadAttention`` writes it).

Each match becomes ``torch.ops.sparsify.attention(q, k, v, attn_mask, is_causal, scale)`` on
``[batch, heads, seq, head_dim]`` tensors with an `AttentionSite` in ``node.meta["sparsify"]``.
A candidate that does not match is logged at debug level and reported in the
`NoAttentionFoundError` when nothing matched at all.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

import sparsify.ops  # noqa: F401  (registers torch.ops.sparsify.attention)
from sparsify.errors import NoAttentionFoundError
from sparsify.passes.graph_utils import arg, dtype_of, is_float_scalar, module_path, op_kind, shape_of
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


@dataclasses.dataclass
class _MaskTerm:
    kind: str  # "additive" (added to the scores), "keep" (bool, True = attend), "drop" (bool, True = hide)
    node: torch.fx.Node
    multiplier: float = 1.0


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
    rank: int  # rank of q/k/v at the match (3 or 4)
    heads: int | None = None  # for rank 3: heads folded into the batch dimension


class FindAttention(GraphPass):
    """Replace every recognised attention with ``torch.ops.sparsify.attention``.

    Args:
        example_inputs: ``(args, kwargs)`` the graph was captured with; the pass runs the graph
            on them once to read sequence lengths and to tell causal masks.
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

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self._graph_module = graph_module
        graph = graph_module.graph
        # Export's dtype assertions would keep replaced nodes alive; they check nothing we rely on.
        for node in list(graph.nodes):
            if node.target in _METADATA_ASSERTS:
                graph.erase_node(node)
        graph.eliminate_dead_code()
        modules = dict(graph_module.named_modules())
        candidates: list[_Candidate] = []
        canonical_nodes: list[torch.fx.Node] = []
        for node in list(graph.nodes):
            if getattr(node, "_erased", False):
                continue  # part of a chain already replaced
            kind = op_kind(node, modules)
            candidate = None
            if kind == "sdpa":
                candidate = self._match_sdpa(node)
            elif kind == "softmax":
                candidate = self._match_manual(node, modules)
            if candidate is not None:
                # Build right away: a later attention may read this one's output.
                candidates.append(candidate)
                canonical_nodes.append(self._build(graph, candidate))
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
        if canonical_nodes:
            self._annotate(graph_module, canonical_nodes, candidates)
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

    def _match_sdpa(self, node: torch.fx.Node) -> _Candidate | None:
        query, key, value = node.args[:3]
        mask = arg(node, 3, "attn_mask")
        dropout = arg(node, 4, "dropout_p", 0.0)
        is_causal = bool(arg(node, 5, "is_causal", False))
        scale = arg(node, 6, "scale")
        if not all(isinstance(n, torch.fx.Node) for n in (query, key, value)):
            self._skip(node, "query/key/value are not graph values")
            return None
        if not isinstance(is_causal, bool) or (scale is not None and not is_float_scalar(scale)):
            self._skip(node, "is_causal/scale are not constants")
            return None
        rank = len(shape_of(query) or ())
        if rank != 4:
            self._skip(node, f"query has rank {rank}, expected [batch, heads, seq, dim]")
            return None
        if isinstance(dropout, (int, float)) and dropout > 0:
            logger.warning("%s: attention dropout %.3g is ignored (sparsify compiles for inference)", node.name, dropout)
        key, value = _unrepeat_key_value(key, value)
        masks = [] if mask is None else [_MaskTerm("keep" if _is_bool(mask) else "additive", mask)]
        return _Candidate(node, query, key, value, False, masks, is_causal,
                          float(scale) if scale is not None else None, "sdpa", 4)

    def _match_manual(self, softmax: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> _Candidate | None:
        scores = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
        dim = arg(softmax, 1, "dim")
        score_shape = shape_of(scores)
        if score_shape is None or dim not in (-1, len(score_shape) - 1):
            self._skip(softmax, f"softmax over dim {dim}, not the last")
            return None
        # Downward: probabilities -> (dropout / cast)* -> matmul with v.
        current = softmax
        while True:
            users = list(current.users)
            if len(users) != 1:
                self._skip(softmax, "attention probabilities are used elsewhere (e.g. returned as weights)")
                return None
            user = users[0]
            kind = op_kind(user, modules)
            if kind in ("dropout", "cast") and user.args and user.args[0] is current:
                current = user
                continue
            if kind in ("matmul", "bmm") and user.args[0] is current:
                anchor, value = user, user.args[1]
                break
            self._skip(softmax, f"probabilities flow into {user.name} ({user.target}), not a matmul with v")
            return None
        # Upward: softmax input -> ... -> q @ kᵀ, collecting scale and masks (in reverse order).
        steps: list[tuple[str, Any]] = []
        current = scores
        while True:
            if not isinstance(current, torch.fx.Node):
                self._skip(softmax, "scores are not a graph value")
                return None
            if current is not scores and len(current.users) != 1:
                self._skip(softmax, f"scores at {current.name} are used elsewhere")
                return None
            kind = op_kind(current, modules)
            if kind == "cast":
                current = current.args[0]
            elif kind in ("mul", "div"):
                left, right = current.args[:2]
                if is_float_scalar(right) and isinstance(left, torch.fx.Node):
                    factor, current = right, left
                elif kind == "mul" and is_float_scalar(left) and isinstance(right, torch.fx.Node):
                    factor, current = left, right
                else:
                    self._skip(softmax, f"scores scaled by a tensor at {current.name}")
                    return None
                factor = float(factor) if kind == "mul" else 1.0 / float(factor)
                if factor <= 0:
                    self._skip(softmax, f"non-positive score scale {factor}")
                    return None
                steps.append(("scale", factor))
            elif kind == "add":
                left, right = current.args[:2]
                alpha = current.kwargs.get("alpha", 1)
                if alpha != 1:
                    self._skip(softmax, "add with alpha")
                    return None
                if is_float_scalar(right):
                    current = left  # a constant shift does not change softmax
                    continue
                if is_float_scalar(left):
                    current = right
                    continue
                if _reaches_product(left, modules):
                    steps.append(("add", right))
                    current = left
                elif _reaches_product(right, modules):
                    steps.append(("add", left))
                    current = right
                else:
                    self._skip(softmax, f"no q @ kᵀ above {current.name}")
                    return None
            elif kind == "masked_fill":
                source, condition, fill = current.args[:3]
                if not (is_float_scalar(fill) and float(fill) <= _MASKING_FILL):
                    self._skip(softmax, f"masked_fill with {fill!r}, not a masking value")
                    return None
                steps.append(("drop", condition))
                current = source
            elif kind == "where":
                condition, source, other = current.args[:3]
                fill = _constant_value(other, self._graph_module)
                if not (fill is not None and fill <= _MASKING_FILL):
                    self._skip(softmax, "where(cond, scores, other) whose `other` is not a constant masking value "
                                        "(<= -1e4); if the model offers attn_implementation='sdpa', use it")
                    return None
                steps.append(("keep", condition))
                current = source
            elif kind == "baddbmm":
                bias, batch1, batch2 = current.args[:3]
                beta = current.kwargs.get("beta", 1)
                alpha = current.kwargs.get("alpha", 1)
                if beta != 1 or not is_float_scalar(alpha) or alpha <= 0:
                    self._skip(softmax, "baddbmm with beta != 1")
                    return None
                steps.append(("add", bias))
                if alpha != 1:
                    steps.append(("scale", float(alpha)))
                query, key_transposed = batch1, batch2
                break
            elif kind in ("matmul", "bmm"):
                query, key_transposed = current.args[:2]
                break
            else:
                self._skip(softmax, f"scores come from {current.name} ({current.target}), not q @ kᵀ")
                return None
        # Apply the collected steps in forward order: softmax(S * scale + masks).
        scale = 1.0
        masks: list[_MaskTerm] = []
        for step, payload in reversed(steps):
            if step == "scale":
                scale *= payload
                for term in masks:
                    term.multiplier *= payload
            elif step == "add":
                masks.append(_MaskTerm("keep" if _is_bool(payload) else "additive", payload))
            else:
                masks.append(_MaskTerm(step, payload))
        rank = len(shape_of(query) or ())
        if rank not in (3, 4) or len(shape_of(value) or ()) != rank:
            self._skip(softmax, f"q/v of rank {rank}; expected 3 or 4")
            return None
        heads = self._heads_of(softmax, query) if rank == 3 else None
        key, transposed = _untranspose(key_transposed)
        source = "multihead_attention" if module_path(softmax)[1].endswith("MultiheadAttention") else "manual"
        if rank == 4:
            key, value = _unrepeat_key_value(key, value) if not transposed else (key, value)
        return _Candidate(anchor, query, key, value, transposed, masks, False, scale, source, rank, heads)

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

    # -- building ------------------------------------------------------------------------------

    def _build(self, graph: torch.fx.Graph, candidate: _Candidate) -> torch.fx.Node:
        anchor = candidate.anchor
        with graph.inserting_before(anchor):
            query, key, value = candidate.query, candidate.key, candidate.value
            if candidate.key_is_transposed:
                key = graph.call_function(aten.transpose.int, (key, -2, -1))
            mask = _combine_masks(graph, candidate.masks)
            if candidate.rank == 3:
                heads = candidate.heads or 1
                query, key, value = (graph.call_function(aten.unflatten.int, (t, 0, [-1, heads])) for t in (query, key, value))
                if mask is not None:
                    mask = _mask_to_rank4(graph, mask, candidate)
            attention = graph.call_function(
                CANONICAL_ATTENTION, (query, key, value, mask, candidate.is_causal, candidate.scale)
            )
            output = attention
            if candidate.rank == 3:
                output = graph.call_function(aten.flatten.using_ints, (attention, 0, 1))
        for key in ("val", "tensor_meta"):  # later matches read shapes of this output
            if key in anchor.meta:
                output.meta[key] = anchor.meta[key]
        attention.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack") or {})
        attention.meta["sparsify_source"] = candidate.source
        anchor.replace_all_uses_with(output)
        _erase_unused(graph, anchor)
        return attention

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
                is_self_attention=_same_source(candidates[index]),
                has_mask=node.args[3] is not None,
                source=node.meta.pop("sparsify_source", "sdpa"),
                module_type=module_type,
            )


# -- helpers -------------------------------------------------------------------------------------


def _constant_value(value: Any, graph_module: torch.fx.GraphModule | None) -> float | None:
    """The number a constant operand holds: a Python number, a 0-d/1-element tensor built by
    ``full``/``scalar_tensor`` in the graph, or a captured constant tensor; else None."""
    if is_float_scalar(value):
        return float(value)
    if not isinstance(value, torch.fx.Node):
        return None
    if value.target in (aten.full.default, aten.scalar_tensor.default, aten.full_like.default):
        fill = value.args[1] if value.target != aten.scalar_tensor.default else value.args[0]
        size = value.args[0] if value.target == aten.full.default else []
        if is_float_scalar(fill) and (value.target != aten.full.default or all(s == 1 for s in size)):
            return float(fill)
        return None
    if value.op == "get_attr" and graph_module is not None:
        tensor = getattr(graph_module, str(value.target), None)
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 1:
            return float(tensor.reshape(()))
    return None


def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase ``node`` and then its inputs while they have no users left.

    ``Graph.eliminate_dead_code`` keeps random ops (SDPA and dropout are "nondeterministic
    seeded"), so the replaced chain is removed explicitly.
    """
    pending = [node]
    while pending:
        current = pending.pop()
        if current.users or current.op not in ("call_function", "call_method", "call_module") or current.graph is not graph:
            continue
        inputs = [n for n in current.all_input_nodes]
        graph.erase_node(current)
        pending.extend(inputs)


def _is_bool(node: Any) -> bool:
    return dtype_of(node) == torch.bool


def _reaches_product(node: Any, modules: dict[str, torch.nn.Module], depth: int = 8) -> bool:
    """Whether walking up the score chain from ``node`` reaches a matmul/bmm/baddbmm."""
    while isinstance(node, torch.fx.Node) and depth > 0:
        kind = op_kind(node, modules)
        if kind in ("matmul", "bmm", "baddbmm"):
            return True
        if kind in ("cast", "mul", "div", "masked_fill"):
            node = node.args[0]
        elif kind == "where":
            node = node.args[1]
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


def _combine_masks(graph: torch.fx.Graph, terms: list[_MaskTerm]) -> torch.fx.Node | None:
    """One mask node (bool keep-mask or additive float) equivalent to all collected terms."""
    if not terms:
        return None
    bools = []
    for term in terms:
        if term.kind == "keep":
            bools.append(term.node)
        elif term.kind == "drop":
            bools.append(graph.call_function(aten.logical_not.default, (term.node,)))
    additive = None
    for term in terms:
        if term.kind != "additive":
            continue
        node = term.node
        if term.multiplier != 1.0:
            node = graph.call_function(aten.mul.Tensor, (node, term.multiplier))
        additive = node if additive is None else graph.call_function(aten.add.Tensor, (additive, node))
    keep = None
    for node in bools:
        keep = node if keep is None else graph.call_function(aten.logical_and.default, (keep, node))
    if additive is None:
        return keep
    if keep is None:
        return additive
    return graph.call_function(aten.where.ScalarOther, (keep, additive, float("-inf")))


def _mask_to_rank4(graph: torch.fx.Graph, mask: torch.fx.Node, candidate: _Candidate) -> torch.fx.Node:
    """Reshape a mask of a [batch*heads, q, k] attention to broadcast over [batch, heads, q, k]."""
    mask_shape = shape_of(mask)
    query_shape = shape_of(candidate.query)
    if mask_shape is None or len(mask_shape) < 3:
        return mask  # [q, k] broadcasts as is
    if query_shape and mask_shape[0] == query_shape[0] and mask_shape[0] != 1:
        return graph.call_function(aten.unflatten.int, (mask, 0, [-1, candidate.heads or 1]))
    return graph.call_function(aten.unsqueeze.default, (mask, 0))


def _same_source(candidate: _Candidate) -> bool:
    """Self attention unless keys come from a sequence of another length than queries."""
    query_shape, key_shape = shape_of(candidate.query), shape_of(candidate.key)
    if query_shape is None or key_shape is None:
        return True
    key_len = key_shape[-1] if candidate.key_is_transposed else key_shape[-2]
    return query_shape[-2] == key_len


def _mask_is_causal(mask: torch.Tensor, rows_per_chunk: int = 256) -> bool:
    """Whether a mask hides every key after its query (top-left aligned) yet leaves the rest open.

    Checked chunk by chunk of query rows, so no further ``q_len × k_len`` tensor is built.
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
