"""Pass infrastructure: `PassResult`, the `GraphPass` base class and the `PassManager`."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

import sparsify.ops  # noqa: F401  (registers torch.ops.sparsify.attention)
from sparsify.errors import PassError, SparsifyError

logger = logging.getLogger(__name__)

__all__ = ["CANONICAL_ATTENTION", "SITE_META_KEY", "GraphPass", "PassManager", "PassResult", "attention_nodes"]

#: Where a canonical attention node keeps its `AttentionSite`.
SITE_META_KEY = "sparsify"
#: The canonical attention op every matched attention becomes (`sparsify.ops`).
CANONICAL_ATTENTION = torch.ops.sparsify.attention.default


def attention_nodes(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes of the graph that carry an `AttentionSite` in ``node.meta["sparsify"]``."""
    return [node for node in graph_module.graph.nodes if SITE_META_KEY in node.meta]


class GraphPass:
    """A pass with one job over a ``GraphModule``.

    Subclasses implement ``call`` and may override ``requires`` (checked before) and
    ``ensures`` (checked after) to state what the pass relies on and promises.

    Example:
        >>> class CountNodes(GraphPass):
        ...     name = "count_nodes"
        ...     def call(self, graph_module):
        ...         return PassResult(graph_module, False)
    """

    name: str = "graph_pass"

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        """Raise when the graph does not hold what this pass relies on."""

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        """Raise when the pass did not deliver what it promises."""

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result


class PassManager:
    """Runs passes in order; a failure names the failing pass and those that ran before it.

    Errors that are already a `SparsifyError` keep their type (so a user catching
    ``NoAttentionFoundError`` still can); their message gains the pass context.

    Example:
        >>> manager = PassManager([])
        >>> manager.run(torch.fx.symbolic_trace(torch.nn.Identity())).modified
        False
    """

    def __init__(self, passes: Sequence[Callable[[torch.fx.GraphModule], PassResult]]):
        self.passes = list(passes)

    def run(self, graph_module: torch.fx.GraphModule) -> PassResult:
        modified = False
        done: list[str] = []
        for graph_pass in self.passes:
            name = getattr(graph_pass, "name", getattr(graph_pass, "__name__", type(graph_pass).__name__))
            try:
                result = graph_pass(graph_module)
            except SparsifyError as error:
                context = f"error in pass {name!r} after: {', '.join(done) or '(none)'}"
                error.args = (f"{error.args[0] if error.args else ''}\n({context})", *error.args[1:])
                raise
            except Exception as error:
                raise PassError(
                    f"error in pass {name!r} after: {', '.join(done) or '(none)'}: "
                    f"{type(error).__name__}: {error}"
                ) from error
            graph_module = result.graph_module
            modified = modified or result.modified
            done.append(name)
            logger.debug("pass %s done (modified=%s)", name, result.modified)
        return PassResult(graph_module, modified)
