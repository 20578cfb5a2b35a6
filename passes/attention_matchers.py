"""Matchers of the find_attention pass: read an SDPA call or a hand-written softmax chain off the graph as a `Candidate`."""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any, Sequence

import torch
import torch.fx

from sparsify.passes.graph_utils import (
    MASKING_FILL,
    arg,
    constant_value,
    dtype_of,
    fake_value,
    is_float_scalar,
    module_path,
    op_kind,
    shape_of,
)
from sparsify.passes.unrepeat_key_value import unrepeat_key_value

__all__ = ["AttentionMatcher", "Candidate", "MaskTerm", "NoMatch", "Segment", "is_bool", "untranspose"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten
# Attributes under which attention modules commonly keep their head count.
_HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")


class NoMatch(Exception):
    """A candidate is not an attention sparsify can canonicalise (the message says why)."""


@dataclasses.dataclass
class Segment:
    """A stretch of the score chain between two reshapes: its leading (batch·heads) dims.

    ``sizes`` are the example sizes; ``args`` the size arguments the graph holds for them (an
    int, a symbolic-size node, or -1), from the reshape that produced the segment, or None
    for the segment right below ``q @ kᵀ`` (its sizes are those of ``q``).
    """

    sizes: tuple[int, ...]
    args: list[Any] | None = None


@dataclasses.dataclass
class MaskTerm:
    kind: str  # "additive" (added to the scores), "keep" (bool, True = attend), "drop" (bool, True = hide)
    node: torch.fx.Node
    segment: Segment
    multiplier: float = 1.0
    # For keep/drop: the value hidden scores were set to. -inf is a plain bool mask; a finite fill
    # (finfo.min) becomes an additive mask, so rows the mask hides entirely stay uniform as in the model.
    fill: float = float("-inf")


@dataclasses.dataclass
class Candidate:
    """One matched attention, before its canonical node is built."""

    anchor: torch.fx.Node  # the node whose value the canonical attention replaces
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    key_is_transposed: bool  # `key` is kᵀ ([..., dim, k_len]) and needs a transpose
    masks: list[MaskTerm]
    is_causal: bool
    scale: float | None
    source: str
    softcap: float | None = None
    sinks: torch.fx.Node | None = None  # the per-head sink logits (numel == heads)
    heads: int | None = None  # query heads (canonical dim 1)
    output_segment: Segment | None = None  # leading dims of the anchor's value (None: as q's)
    shape_users: list[tuple[torch.fx.Node, Segment]] = dataclasses.field(default_factory=list)


class AttentionMatcher:
    """Reads candidate attentions off a captured graph: `match_sdpa` and `match_manual` return a `Candidate` or raise `NoMatch`.

    Args:
        graph_module: the graph being matched (its example shapes recorded, `record_example_shapes`).
        root: the original model, for head counts of modules that fold heads into the batch dimension.

    Example:
        >>> matcher = AttentionMatcher(graph_module, model)                  # doctest: +SKIP
        >>> candidate = matcher.match_sdpa(node)                             # doctest: +SKIP
    """

    def __init__(self, graph_module: torch.fx.GraphModule, root: torch.nn.Module | None = None):
        self._graph_module = graph_module
        self.root = root

    def match_sdpa(self, node: torch.fx.Node) -> Candidate:
        query, key, value = node.args[:3]
        mask = arg(node, 3, "attn_mask")
        dropout = arg(node, 4, "dropout_p", 0.0)
        is_causal = arg(node, 5, "is_causal", False)
        scale = arg(node, 6, "scale")
        if not all(isinstance(n, torch.fx.Node) for n in (query, key, value)):
            raise NoMatch("query/key/value are not graph values")
        if not isinstance(is_causal, bool) or (scale is not None and not is_float_scalar(scale)):
            raise NoMatch("is_causal/scale are not constants")
        rank = len(shape_of(query) or ())
        if rank != 4:
            raise NoMatch(f"query has rank {rank}, expected [batch, heads, seq, dim]")
        if isinstance(dropout, (int, float)) and dropout > 0:
            logger.warning("%s: attention dropout %.3g is ignored (sparsify compiles for inference)", node.name, dropout)
        key, value = unrepeat_key_value(key, value)
        segment = Segment(tuple(shape_of(query)[:2]))
        masks = [] if mask is None else [MaskTerm("keep" if is_bool(mask) else "additive", mask, segment)]
        return Candidate(node, query, key, value, False, masks, is_causal,
                          float(scale) if scale is not None else None, "sdpa", heads=shape_of(query)[1],
                          output_segment=segment)

    def match_manual(self, softmax: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> Candidate:
        scores = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
        dim = arg(softmax, 1, "dim")
        score_shape = shape_of(scores)
        if score_shape is None or dim not in (-1, len(score_shape) - 1):
            raise NoMatch(f"softmax over dim {dim}, not the last")
        if len(score_shape) < 3:
            raise NoMatch(f"softmax input of rank {len(score_shape)}; expected [batch(*heads), q, k]")
        shape_users: list[tuple[torch.fx.Node, Segment]] = []
        softmax_segment = Segment(tuple(score_shape[:-2]))
        anchor, value, drops_last_column, output_segment = self._walk_down(softmax, softmax_segment, modules)

        # Upward: softmax input -> ... -> q @ kᵀ, collecting steps (in reverse order).
        steps: list[tuple[str, Any]] = []
        segment = softmax_segment
        sinks = None
        current = scores
        while True:
            if not isinstance(current, torch.fx.Node):
                raise NoMatch("scores are not a graph value")
            self._check_users(current, segment, shape_users, modules)
            kind = op_kind(current, modules)
            if kind == "cast":
                current = current.args[0]
            elif kind == "view":
                above = current.args[0]
                above_shape, below_shape = shape_of(above), shape_of(current)
                if not _splits_or_merges_leading(above_shape, below_shape):
                    raise NoMatch(f"{current.name} reshapes more than the batch·heads dims of the scores")
                segment.args = _reshape_args(current)
                segment = Segment(tuple(above_shape[:-2]))
                current = above
            elif kind in ("mul", "div"):
                left, right = current.args[:2]
                factor = constant_value(right, self._graph_module) if isinstance(left, torch.fx.Node) else None
                if factor is not None:
                    current = left
                elif kind == "mul" and isinstance(right, torch.fx.Node) and constant_value(left, self._graph_module) is not None:
                    factor, current = constant_value(left, self._graph_module), right
                else:
                    raise NoMatch(f"scores scaled by a tensor at {current.name}")
                factor = factor if kind == "mul" else 1.0 / factor
                if not factor > 0:
                    raise NoMatch(f"non-positive score scale {factor}")
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
                    raise NoMatch(f"{kind} with alpha at {current.name}")
                if constant_value(right, self._graph_module) is not None or constant_value(left, self._graph_module) is not None:
                    if sinks is not None:
                        raise NoMatch("a constant shift of the scores but not of the sinks")
                    if kind == "sub" and constant_value(left, self._graph_module) is not None:
                        raise NoMatch(f"scores negated at {current.name}")
                    # A constant shift does not change the softmax.
                    current = left if constant_value(right, self._graph_module) is not None else right
                    continue
                if kind == "sub" and _is_row_max_of(right, left, modules):
                    if sinks is not None:
                        raise NoMatch("a row-max shift of the scores but not of the sinks")
                    current = left  # x - max(x, -1): a per-row shift does not change the softmax
                    continue
                if _reaches_product(left, modules):
                    steps.append(("mask", ("additive", right, segment, -1.0 if kind == "sub" else 1.0)))
                    current = left
                elif kind == "add" and _reaches_product(right, modules):
                    steps.append(("mask", ("additive", left, segment, 1.0)))
                    current = right
                elif kind == "sub" and _reaches_product(right, modules):
                    raise NoMatch(f"scores negated at {current.name}")
                else:
                    raise NoMatch(f"no q @ kᵀ above {current.name}")
            elif kind == "masked_fill":
                source, condition, fill = current.args[:3]
                number = constant_value(fill, self._graph_module)
                if not (number is not None and number <= MASKING_FILL):
                    raise NoMatch(f"masked_fill with {fill!r}, not a masking value")
                steps.append(("mask", ("drop", condition, segment, 1.0, number)))
                current = source
            elif kind == "where":
                condition, when_true, when_false = current.args[:3]
                false_fill = constant_value(when_false, self._graph_module)
                true_fill = constant_value(when_true, self._graph_module)
                if false_fill is not None and false_fill <= MASKING_FILL and isinstance(when_true, torch.fx.Node):
                    steps.append(("mask", ("keep", condition, segment, 1.0, false_fill)))
                    current = when_true
                elif true_fill is not None and true_fill <= MASKING_FILL and isinstance(when_false, torch.fx.Node):
                    steps.append(("mask", ("drop", condition, segment, 1.0, true_fill)))
                    current = when_false
                else:
                    raise NoMatch("where(cond, scores, other) whose `other` is not a constant masking value "
                                   "(<= -1e4); if the model offers attn_implementation='sdpa', use it")
            elif kind == "cat":
                parts, cat_dim = current.args[0], arg(current, 1, "dim", 0)
                rank = len(shape_of(current) or ())
                if sinks is not None or not drops_last_column or len(parts) != 2 or cat_dim not in (-1, rank - 1):
                    raise NoMatch(f"concatenation at {current.name} is not scores + one sink column "
                                   f"whose probability is dropped after the softmax")
                if (shape_of(parts[1]) or (0,))[-1] != 1:
                    raise NoMatch(f"the column concatenated at {current.name} is not one sink per row")
                sinks = _per_head_source(parts[1], modules)
                if sinks is None:
                    raise NoMatch(f"the sink column at {current.name} does not come from one logit per head")
                current = parts[0]
            elif kind == "baddbmm":
                bias, batch1, batch2 = current.args[:3]
                beta = current.kwargs.get("beta", 1)
                alpha = current.kwargs.get("alpha", 1)
                if beta != 1 or not is_float_scalar(alpha) or alpha <= 0:
                    raise NoMatch("baddbmm with beta != 1")
                steps.append(("mask", ("additive", bias, segment, 1.0)))
                if alpha != 1:
                    steps.append(("scale", float(alpha)))
                query, key_transposed = batch1, batch2
                break
            elif kind in ("matmul", "bmm"):
                query, key_transposed = current.args[:2]
                break
            else:
                raise NoMatch(f"scores come from {current.name} ({current.target}), not q @ kᵀ")
        if drops_last_column and sinks is None:
            raise NoMatch("the last probability column is dropped but no sink column was concatenated")
        segment.args = None  # the product's own segment: sizes are those of q
        # Scales applied to q or kᵀ before the product fold into the scale.
        query, query_factor = self._peel_scale(query, modules)
        key_transposed, key_factor = self._peel_scale(key_transposed, modules)
        steps.append(("scale", query_factor * key_factor))

        # Apply the collected steps in forward order: softmax(softcap(S * scale) + masks).
        scale, softcap = 1.0, None
        masks: list[MaskTerm] = []
        for step, payload in reversed(steps):
            if step == "scale":
                scale *= payload
                if softcap is not None:
                    softcap *= payload  # a·c·tanh(sS/c) = c'·tanh(s'S/c') with c' = a·c, s' = a·s
                for term in masks:
                    term.multiplier *= payload
            elif step == "softcap":
                if masks:
                    raise NoMatch("a mask added before the soft-capping tanh")
                if softcap is not None:
                    raise NoMatch("two soft-capping tanh in one chain")
                # tanh(x / B) = (1/B) · softcap_B(x): soft-cap at B, then scale by 1/B.
                softcap = payload
                scale /= payload
                softcap /= payload
            else:
                term_kind, node, term_segment, multiplier, *fill = payload
                if term_kind == "additive" and is_bool(node):
                    term_kind = "keep"
                masks.append(MaskTerm(term_kind, node, term_segment, multiplier, *fill))
        if softcap is not None and not math.isfinite(softcap):
            raise NoMatch("soft-capping value is not finite")

        rank = len(shape_of(query) or ())
        if rank < 3 or len(shape_of(value) or ()) < 3:
            raise NoMatch(f"q/v of rank {rank}; expected [batch(*heads), seq, dim]")
        key, transposed = untranspose(key_transposed)
        source = "multihead_attention" if module_path(softmax)[1].endswith("MultiheadAttention") else "manual"
        if rank == 4 and not transposed:
            key, value = unrepeat_key_value(key, value)
        candidate = Candidate(anchor, query, key, value, transposed, masks, False, scale, source,
                               softcap=softcap, sinks=sinks, output_segment=output_segment, shape_users=shape_users)
        candidate.heads = self._canonical_heads(candidate, [softmax_segment, output_segment, segment], softmax)
        _check_layouts(candidate, [softmax_segment, output_segment, segment])
        return candidate

    def _walk_down(self, softmax: torch.fx.Node, segment: Segment, modules) -> tuple:
        """Probabilities -> (dropout / cast / batch·heads reshape / sink-column drop)* -> matmul with v."""
        current = softmax
        drops_last_column = False
        while True:
            if len(current.users) != 1:
                raise NoMatch("attention probabilities are used elsewhere (e.g. returned as weights)")
            user = next(iter(current.users))
            kind = op_kind(user, modules)
            if kind in ("dropout", "cast") and user.args and user.args[0] is current:
                current = user
                continue
            if kind == "view" and user.args[0] is current and _splits_or_merges_leading(shape_of(current), shape_of(user)):
                segment = Segment(tuple(shape_of(user)[:-2]), _reshape_args(user))
                current = user
                continue
            if not drops_last_column and _drops_last_column(user, current):
                drops_last_column = True
                current = user
                continue
            if kind in ("matmul", "bmm") and user.args[0] is current:
                return user, user.args[1], drops_last_column, segment
            raise NoMatch(f"probabilities flow into {user.name} ({user.target}), not a matmul with v")

    def _check_users(self, node: torch.fx.Node, segment: Segment, shape_users: list, modules) -> None:
        """A chain node may feed the next chain step, reads of its shape, and a row max that shifts it."""
        chain_users = []
        for user in node.users:
            kind = op_kind(user, modules)
            if kind == "shape_only" and user.args and user.args[0] is node:
                if user.op != "call_function" or op_kind(node, modules) == "cat":
                    raise NoMatch(f"the shape of {node.name} is read by {user.name}, which cannot be rewired")
                shape_users.append((user, segment))
            elif kind == "row_max" and user.args[0] is node:
                continue  # x - max(x, -1): checked where the shift is subtracted, removed with the chain
            else:
                chain_users.append(user)
        if len(chain_users) != 1:
            raise NoMatch(f"scores at {node.name} are used elsewhere")

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

    def _canonical_heads(self, candidate: Candidate, segments: Sequence[Segment], node: torch.fx.Node) -> int:
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


def _check_layouts(candidate: Candidate, segments: Sequence[Segment]) -> None:
    """Every segment regroups the same batch·heads; masks applied in one can be brought to canonical."""
    heads = candidate.heads
    total = math.prod(shape_of(candidate.query)[:-2])
    if not heads or total % heads:
        raise NoMatch(f"{heads} heads do not divide the batch·heads size {total}")
    for segment in list(segments) + [term.segment for term in candidate.masks]:
        if math.prod(segment.sizes) != total:
            raise NoMatch("the scores' batch·heads dims change size along the chain")
        if len(segment.sizes) >= 2 and segment.sizes[-1] != heads:
            raise NoMatch(f"a reshape in the chain leaves {segment.sizes[-1]} as the inner dim, not the {heads} heads")
    query_leading = tuple(shape_of(candidate.query)[:-2])

    def resolvable(segment: Segment) -> bool:
        return segment.args is not None or segment.sizes == query_leading

    needs_sizes = [segment for _, segment in candidate.shape_users]
    if len(shape_of(candidate.anchor) or ()) > 4:
        needs_sizes.append(candidate.output_segment)
    needs_sizes += [term.segment for term in candidate.masks if len(term.segment.sizes) >= 3]
    if not all(resolvable(segment) for segment in needs_sizes):
        raise NoMatch("a reshape in the chain has sizes the graph does not spell out")
    if candidate.sinks is not None and math.prod(shape_of(candidate.sinks) or (0,)) != heads:
        raise NoMatch(f"the sinks hold {math.prod(shape_of(candidate.sinks) or (0,))} logits for {heads} heads")


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


def is_bool(node: Any) -> bool:
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


def untranspose(node: torch.fx.Node) -> tuple[torch.fx.Node, bool]:
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
