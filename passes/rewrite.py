"""The `rewrite_attention` pass: replace canonical attention nodes by `SparseAttention` runtime modules."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sparsify.capture import weights_device
from sparsify.cost import CostModel
from sparsify.passes.infra import SITE_META_KEY, GraphPass, attention_nodes
from sparsify.runtime.sparse_attention import SparseAttention, StepCounter
from sparsify.site import AttentionSite

if TYPE_CHECKING:
    from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)


class RewriteAttention(GraphPass):
    """Replace each canonical attention node with a `SparseAttention` submodule per the strategy.

    Sites whose heads are all dense keep the canonical dense op. ``rewritten`` counts the
    replaced nodes after the pass ran.

    Example:
        >>> result = RewriteAttention(strategy).call(graph_module)   # doctest: +SKIP
    """

    name = "rewrite_attention"

    def __init__(self, strategy: "Strategy", *, backend: str = "auto", source: str = "strategy",
                 step_counter: StepCounter | None = None, cost_model=None, device: torch.device | str | None = None):
        self.strategy = strategy
        # Where the runtime modules go: the model's device (`Captured.device`); None: the graph's weights', else CPU.
        self.device = device
        # Prices backend="auto" per site (None: analytic defaults and the shipped hardware profiles).
        self.cost_model = cost_model if cost_model is not None else CostModel.default()
        self.step_counter = step_counter
        self.backend = backend
        self.source = source
        self.rewritten = 0

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        sites = [node.meta[SITE_META_KEY] for node in attention_nodes(graph_module)]
        self.strategy.validate_for(sites, source=self.source)
        if self.backend != "auto":
            from sparsify.backends import get_backend

            get_backend(self.backend)  # unknown names fail here, listing the known ones

    def _device(self, graph_module: torch.fx.GraphModule) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return weights_device(graph_module) or torch.device("cpu")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self.rewritten = 0
        for node in attention_nodes(graph_module):
            site: AttentionSite = node.meta[SITE_META_KEY]
            site_strategy = self.strategy.sites[site.name]
            if all(p.is_dense for p in site_strategy.heads):
                continue
            module = SparseAttention(site, site_strategy.heads, block_size=self.strategy.block_size, backend=self.backend,
                                     dense_steps=site_strategy.dense_steps, step_counter=self.step_counter,
                                     cost_model=self.cost_model)
            target = f"sparse_attention_{site.index}"
            graph_module.add_submodule(target, module.to(self._device(graph_module)))
            with graph_module.graph.inserting_before(node):
                replacement = graph_module.graph.call_module(target, node.args, node.kwargs)
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph_module.graph.erase_node(node)
            self.rewritten += 1
        graph_module.graph.lint()
        graph_module.recompile()
        logger.info("rewrote %d attention site(s) to sparse attention", self.rewritten)
        return PassResult(graph_module, self.rewritten > 0)
