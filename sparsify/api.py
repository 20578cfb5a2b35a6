"""The Python front door: `find_attention`, `compile` and the `SparsifiedModule` it returns."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch
import torch.fx
from tabulate import tabulate

from sparsify.capture import Captured, capture, normalize_inputs
from sparsify.errors import SparsifyError, StrategyError
from sparsify.passes.find_attention import FindAttention
from sparsify.passes.infra import SITE_META_KEY, PassManager, attention_nodes
from sparsify.passes.rewrite import RewriteAttention
from sparsify.site import AttentionSite
from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)


def capture_attention(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True) -> tuple[Captured, list[AttentionSite]]:
    """Capture ``model`` and canonicalise its attentions; returns the capture and its sites."""
    captured = capture(model, example_inputs, dynamic=dynamic)
    finder = FindAttention((captured.args, captured.kwargs), root=model)
    PassManager([finder]).run(captured.graph_module)
    sites = [node.meta[SITE_META_KEY] for node in attention_nodes(captured.graph_module)]
    return captured, sites


def find_attention(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True) -> list[AttentionSite]:
    """Every attention of ``model`` as an `AttentionSite`, in graph order.

    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword
    arguments — the same convention as calibration batches. Raises `NoAttentionFoundError` when
    the model has no attention sparsify recognises and `CaptureError` when it cannot be captured.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True)
        >>> [site.name for site in find_attention(layer, (torch.randn(2, 16, 32),))]
        ['self_attn']
    """
    return capture_attention(model, example_inputs, dynamic=dynamic)[1]


class SparsifiedModule(torch.nn.Module):
    """A compiled model: the rewritten graph plus the strategy it was built from.

    Call it like the original model. Non-tensor keyword arguments the graph was specialised
    on (e.g. ``use_cache=False``) are filled in when omitted and must match when given.

    Attributes:
        graph_module: the rewritten ``torch.fx.GraphModule``.
        strategy: the `Strategy` applied.
        sites: the attention sites, in graph order.
        rewritten_sites: how many sites run sparse attention.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, strategy: Strategy, sites: list[AttentionSite],
                 fixed_kwargs: dict[str, Any], rewritten_sites: int):
        super().__init__()
        self.graph_module = graph_module
        self.strategy = strategy
        self.sites = sites
        self.fixed_kwargs = dict(fixed_kwargs)
        self.rewritten_sites = rewritten_sites

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, value in self.fixed_kwargs.items():
            if name not in kwargs:
                kwargs[name] = value
            elif kwargs[name] != value:
                raise SparsifyError(
                    f"this module was compiled with {name}={value!r}; it cannot be called with {name}={kwargs[name]!r}"
                )
        return self.graph_module(*args, **kwargs)

    def report(self) -> str:
        """A table per site: heads, chosen patterns, block density at the captured lengths."""
        rows = []
        for site in self.sites:
            site_strategy = self.strategy.sites[site.name]
            counts: dict[str, int] = {}
            for pattern in site_strategy.heads:
                counts[str(pattern)] = counts.get(str(pattern), 0) + 1
            q_blocks = -(-site.q_len // self.strategy.block_size)
            k_blocks = -(-site.k_len // self.strategy.block_size)
            densities = [p.density(q_blocks, k_blocks, block_size=self.strategy.block_size, causal=site.causal)
                         for p in site_strategy.heads]
            rows.append([
                site.name, f"{site.num_heads}/{site.num_kv_heads}", "causal" if site.causal else site.kind,
                "; ".join(f"{n}× {p}" for p, n in counts.items()), f"{sum(densities) / len(densities):.3f}",
            ])
        return tabulate(rows, headers=["site", "heads (q/kv)", "kind", "patterns", "density"], tablefmt="github")


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module,
    calib_loader: Iterable[Any] | None = None,
    *,
    strategy: Strategy | str | os.PathLike | None = None,
    example_inputs: Any = None,
    backend: str = "auto",
    dynamic: bool = True,
) -> SparsifiedModule:
    """Compile ``model`` so that its attentions run block-sparse per ``strategy``.

    Args:
        model: any ``nn.Module``; it is not modified (the result shares its weights).
        calib_loader: calibration batches for the search (tensor / tuple of args / dict of
            kwargs per batch). The search that uses them arrives with the search pipeline;
            today pass ``strategy``.
        strategy: a `Strategy` or the path of a strategy JSON file written earlier.
        example_inputs: inputs to capture the graph with; defaults to the first calibration
            batch.
        backend: ``"auto"`` (fastest available per site and device) or a backend name
            (``sparsify.backends.available_backends()``).
        dynamic: capture with dynamic batch and sequence dimensions.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True)
        >>> x = torch.randn(1, 256, 64)
        >>> sites = find_attention(layer, (x,))
        >>> compiled = compile(layer, strategy=Strategy.dense(sites), example_inputs=(x,))
        >>> torch.allclose(compiled(x), layer.eval()(x), atol=1e-5)
        True
    """
    if strategy is None:
        if calib_loader is None:
            raise SparsifyError(
                "sparsify.compile needs a strategy (a Strategy or the path of a strategy JSON file), or calibration "
                "data to search one: sparsify.compile(model, strategy='strategy.json', example_inputs=...)"
            )
        raise SparsifyError(
            "calibration-driven search is not available in this version yet; pass strategy=... "
            "(e.g. Strategy.uniform(sparsify.find_attention(model, batch), pattern))"
        )
    source = "strategy"
    if isinstance(strategy, (str, os.PathLike)):
        source = os.fspath(strategy)
        strategy = Strategy.load(strategy)
    if not isinstance(strategy, Strategy):
        raise StrategyError(f"strategy must be a Strategy or a path, got {type(strategy).__name__}")
    if example_inputs is None:
        if calib_loader is None:
            raise SparsifyError("compile needs example_inputs (or a calib_loader whose first batch serves) to capture the model")
        example_inputs = _first_batch(calib_loader)
    captured = capture(model, example_inputs, dynamic=dynamic)
    finder = FindAttention((captured.args, captured.kwargs), root=model)
    rewrite = RewriteAttention(strategy, backend=backend, source=source)
    result = PassManager([finder, rewrite]).run(captured.graph_module)
    sites = [node.meta[SITE_META_KEY] for node in result.graph_module.graph.nodes if SITE_META_KEY in node.meta]
    return SparsifiedModule(result.graph_module, strategy, sites, captured.fixed_kwargs, rewrite.rewritten)


def _first_batch(calib_loader: Iterable[Any]) -> Any:
    try:
        return next(iter(calib_loader))
    except StopIteration:
        raise SparsifyError("the calibration loader is empty: it yielded no batch") from None
    except TypeError:
        raise SparsifyError(f"calib_loader must be iterable, got {type(calib_loader).__name__}") from None


__all__ = ["SparsifiedModule", "capture_attention", "compile", "find_attention", "normalize_inputs"]
