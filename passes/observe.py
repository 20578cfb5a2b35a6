"""The observe pass: run batches through the captured graph and hand each canonical attention's inputs to observers.

The canonical attention nodes run their dense computation as usual; before that, every observer
registered for the run receives ``(site, q, k, v, attn_mask, is_causal, scale, softcap, sinks)`` —
the canonical op's arguments, with ``softcap``/``sinks`` None where the node omits them. The graph is
not edited: an `torch.fx.Interpreter` intercepts the canonical nodes, so the same captured graph
serves profiling, candidate scoring and, afterwards, the rewrite. `AttentionInterpreter` is the one
interpreter that does so; `find_attention` reads its sites' example inputs through it too
(`sparsify.passes.example_run`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from sparsify.capture import flat_graph_inputs
from sparsify.errors import SparsifyError
from sparsify.ops import dense_attention
from sparsify.passes.infra import CANONICAL_ATTENTION, SITE_META_KEY
from sparsify.site import AttentionSite

__all__ = ["AttentionInterpreter", "ObservingInterpreter", "SiteObserver", "canonical_arguments", "observe"]

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


class AttentionInterpreter(torch.fx.Interpreter):
    """Runs a captured graph and hands every canonical attention node's arguments to `on_attention`.

    `on_attention` may return the node's output (an observer that computed it anyway); otherwise
    the dense op runs. `watches` says which nodes are intercepted (default: every canonical node).
    Subclasses override those two; `run_batch` runs one ``(args, kwargs)`` batch without grad.

    Example:
        >>> class CountSites(AttentionInterpreter):
        ...     def on_attention(self, node, arguments):
        ...         self.count = getattr(self, "count", 0) + 1
        >>> CountSites(graph_module).run_batch(args, kwargs)                  # doctest: +SKIP
    """

    def __init__(self, graph_module: torch.fx.GraphModule, batch_index: int = 0):
        super().__init__(graph_module)
        self.batch_index = batch_index

    def watches(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` is intercepted: a canonical attention node."""
        return node.op == "call_function" and node.target is CANONICAL_ATTENTION

    def on_attention(self, node: torch.fx.Node, arguments: tuple) -> torch.Tensor | None:
        """Called at each watched node with ``(q, k, v, attn_mask, is_causal, scale, softcap, sinks)``."""
        return None

    def run_node(self, node: torch.fx.Node) -> Any:
        if self.watches(node):
            arguments = canonical_arguments(node, self.env)
            output = self.on_attention(node, arguments)
            # An observer that computed the dense output anyway may return it (saves a second pass).
            if isinstance(output, torch.Tensor):
                return output
            return dense_attention(*arguments)
        return super().run_node(node)

    def run_batch(self, args: tuple, kwargs: dict, initial_env: dict | None = None) -> Any:
        """Run one batch through the graph (no grad); errors keep sparsify's message without the node dump.

        ``initial_env`` (node -> value) resumes a run: nodes it holds are not run again (a copy is used).
        """
        with torch.no_grad():
            try:
                environment = dict(initial_env) if initial_env is not None else None
                return self.run(*flat_graph_inputs(self.module, args, kwargs), initial_env=environment)
            except SparsifyError as error:
                # torch.fx.Interpreter appends its node dump ("While executing ..., Original traceback ...,
                # tlparse") to every error's message; ours already says what went wrong and where.
                message = str(error.args[0]) if error.args else ""
                raise type(error)(message.split("\n\nWhile executing ", 1)[0]) from None


class ObservingInterpreter(AttentionInterpreter):
    """Runs a captured graph, calling ``observer`` at every canonical attention node that carries a site.

    Example:
        >>> seen = []
        >>> interpreter = ObservingInterpreter(graph_module, lambda site, *inputs: seen.append(site.name))  # doctest: +SKIP
        >>> interpreter.run_batch(args, kwargs)                                                             # doctest: +SKIP
    """

    def __init__(self, graph_module: torch.fx.GraphModule, observer: SiteObserver, batch_index: int = 0):
        super().__init__(graph_module, batch_index)
        self.observer = observer

    def watches(self, node: torch.fx.Node) -> bool:
        return super().watches(node) and SITE_META_KEY in node.meta

    def on_attention(self, node: torch.fx.Node, arguments: tuple) -> torch.Tensor | None:
        site: AttentionSite = node.meta[SITE_META_KEY]
        for name, tensor in zip(("query", "key", "value"), arguments[:3]):
            # One reduction is enough: NaN or inf anywhere makes the sum non-finite.
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
                raise SparsifyError(
                    f"calibration batch {self.batch_index}: the {name} of site {site.name!r} holds NaN or inf; "
                    f"check the inputs and the model's dtype (fp16 overflow?) before calibrating"
                )
        return self.observer(site, *arguments)


def observe(graph_module: torch.fx.GraphModule, batches: Sequence[tuple[tuple, dict]], observer: SiteObserver,
            progress: Iterable[int] | None = None) -> None:
    """Run every batch through the graph, calling ``observer`` at each attention site."""
    indices = progress if progress is not None else range(len(batches))
    for index in indices:
        args, kwargs = batches[index]
        ObservingInterpreter(graph_module, observer, index).run_batch(args, kwargs)
