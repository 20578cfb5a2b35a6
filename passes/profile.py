"""The observe pass: run calibration batches through the captured graph and hand each site's inputs to observers.

The canonical attention nodes run their dense computation as usual; before that, every observer
registered for the run receives ``(site, q, k, v, attn_mask, is_causal, scale, softcap, sinks)`` —
the canonical op's arguments, with ``softcap``/``sinks`` None where the node omits them. The graph is
not edited: an `torch.fx.Interpreter` intercepts the canonical nodes, so the same captured graph
serves profiling, candidate scoring and, afterwards, the rewrite.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from sparsify.capture import flat_graph_inputs
from sparsify.errors import SparsifyError
from sparsify.ops import dense_attention
from sparsify.passes.infra import SITE_META_KEY
from sparsify.site import AttentionSite

CANONICAL_ATTENTION = torch.ops.sparsify.attention.default

SiteObserver = Callable[[AttentionSite, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool, "float | None",
                         "float | None", "torch.Tensor | None"], "torch.Tensor | None"]


def canonical_arguments(node: torch.fx.Node, env: dict) -> tuple:
    """``(q, k, v, attn_mask, is_causal, scale, softcap, sinks)`` of a canonical node, values from ``env``.

    Canonical nodes may omit the two trailing optional arguments; they come back as None.
    """
    values = [env[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
    names = ("q", "k", "v", "attn_mask", "is_causal", "scale", "softcap", "sinks")
    for name in names[len(values):]:
        value = node.kwargs.get(name)
        values.append(env[value] if isinstance(value, torch.fx.Node) else value)
    return tuple(values)


class ObservingInterpreter(torch.fx.Interpreter):
    """Runs a captured graph, calling ``observer`` at every canonical attention node.

    Example:
        >>> seen = []
        >>> interpreter = ObservingInterpreter(graph_module, lambda site, *inputs: seen.append(site.name))  # doctest: +SKIP
        >>> interpreter.run_batch(args, kwargs)                                                             # doctest: +SKIP
    """

    def __init__(self, graph_module: torch.fx.GraphModule, observer: SiteObserver, batch_index: int = 0):
        super().__init__(graph_module)
        self.observer = observer
        self.batch_index = batch_index

    def run_node(self, node: torch.fx.Node) -> Any:
        if node.op == "call_function" and node.target is CANONICAL_ATTENTION and SITE_META_KEY in node.meta:
            site: AttentionSite = node.meta[SITE_META_KEY]
            q, k, v, attn_mask, is_causal, scale, softcap, sinks = canonical_arguments(node, self.env)
            for name, tensor in (("query", q), ("key", k), ("value", v)):
                # One reduction is enough: NaN or inf anywhere makes the sum non-finite.
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
                    raise SparsifyError(
                        f"calibration batch {self.batch_index}: the {name} of site {site.name!r} holds NaN or inf; "
                        f"check the inputs and the model's dtype (fp16 overflow?) before calibrating"
                    )
            output = self.observer(site, q, k, v, attn_mask, is_causal, scale, softcap, sinks)
            # An observer that computed the dense output anyway may return it (saves a second pass).
            if isinstance(output, torch.Tensor):
                return output
            return dense_attention(q, k, v, attn_mask, is_causal, scale, softcap, sinks)
        return super().run_node(node)

    def run_batch(self, args: tuple, kwargs: dict) -> Any:
        with torch.no_grad():
            try:
                return self.run(*flat_graph_inputs(self.module, args, kwargs))
            except SparsifyError as error:
                # torch.fx.Interpreter appends its node dump ("While executing ..., Original traceback ...,
                # tlparse") to every error's message; ours already says what went wrong and where.
                message = str(error.args[0]) if error.args else ""
                raise type(error)(message.split("\n\nWhile executing ", 1)[0]) from None


def observe(graph_module: torch.fx.GraphModule, batches: Sequence[tuple[tuple, dict]], observer: SiteObserver,
            progress: Iterable[int] | None = None) -> None:
    """Run every batch through the graph, calling ``observer`` at each attention site."""
    indices = progress if progress is not None else range(len(batches))
    for index in indices:
        args, kwargs = batches[index]
        ObservingInterpreter(graph_module, observer, index).run_batch(args, kwargs)
