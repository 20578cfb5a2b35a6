"""What the find_attention pass reads from one run of the graph on its example inputs: sizes, site inputs, causal masks."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from sparsify.capture import flat_graph_inputs
from sparsify.passes.graph_utils import EXAMPLE_SHAPE_KEY, MASKING_FILL
from sparsify.passes.observe import AttentionInterpreter

__all__ = ["mask_is_causal", "observe_attention_inputs", "record_example_shapes"]


def record_example_shapes(graph_module: torch.fx.GraphModule, example_inputs: tuple[tuple, dict] | None) -> None:
    """Run the graph once on the example and record every tensor's concrete shape in ``node.meta``.

    Export leaves data-dependent sizes (a text length taken from a mask) without a hint; the
    example run gives the matcher the sizes the model really had.

    Example:
        >>> record_example_shapes(graph_module, ((x,), {}))                 # doctest: +SKIP
        >>> node.meta[EXAMPLE_SHAPE_KEY]                                    # doctest: +SKIP
        (2, 4, 80, 16)
    """
    if example_inputs is None:
        return
    with torch.no_grad():
        _ShapeRecorder(graph_module).run(*flat_graph_inputs(graph_module, *example_inputs))


class _ShapeRecorder(torch.fx.Interpreter):
    """Records every tensor's shape in ``node.meta`` (before matching: there are no attention nodes yet)."""

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta[EXAMPLE_SHAPE_KEY] = tuple(result.shape)
        return result



def mask_is_causal(mask: torch.Tensor, rows_per_chunk: int = 256) -> bool:
    """Whether a mask hides every key after its query (top-left aligned) yet leaves the rest open.

    Checked on the example's concrete mask, chunk by chunk of query rows, so no further
    ``q_len × k_len`` tensor is built.

    Example:
        >>> mask_is_causal(torch.ones(4, 4, dtype=torch.bool).tril()), mask_is_causal(torch.ones(4, 4, dtype=torch.bool))
        (True, False)
    """
    q_len, k_len = mask.shape[-2], mask.shape[-1]
    if q_len < 2 or k_len < 2:
        return False
    any_visible = False
    keys = torch.arange(k_len, device=mask.device)
    for start in range(0, q_len, rows_per_chunk):
        rows = torch.arange(start, min(q_len, start + rows_per_chunk), device=mask.device).unsqueeze(-1)
        chunk = mask[..., start:start + rows_per_chunk, :]
        hidden = ~chunk if chunk.dtype == torch.bool else chunk <= MASKING_FILL
        future = keys > rows
        if not bool((hidden | ~future).all()):
            return False  # some key after its query is visible
        any_visible = any_visible or bool((~hidden & ~future).any())
    return any_visible



def observe_attention_inputs(graph_module: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node],
                             example_inputs: tuple[tuple, dict] | None) -> dict[torch.fx.Node, tuple]:
    """``{node: (q shape, k shape, v shape, mask or None)}`` of each canonical node, from one run on the example.

    Example:
        >>> observe_attention_inputs(graph_module, [node], ((x,), {}))[node][0]   # doctest: +SKIP
        (2, 4, 80, 16)
    """
    if example_inputs is None:
        raise ValueError("find_attention needs the example inputs the graph was captured with")
    recorder = _AttentionInputRecorder(graph_module, set(nodes))
    recorder.run_batch(*example_inputs)
    missing = [n.name for n in nodes if n not in recorder.seen]
    if missing:
        raise RuntimeError(f"attention nodes {missing} did not run on the example inputs")
    return recorder.seen


class _AttentionInputRecorder(AttentionInterpreter):
    """The observe pass's interpreter, watching the new canonical nodes (they carry no site yet)."""

    def __init__(self, graph_module: torch.fx.GraphModule, watched: set[torch.fx.Node]):
        super().__init__(graph_module)
        self.watched = watched
        self.seen: dict[torch.fx.Node, tuple] = {}

    def watches(self, node: torch.fx.Node) -> bool:
        return node in self.watched

    def on_attention(self, node: torch.fx.Node, arguments: tuple) -> None:
        query, key, value, mask = arguments[:4]
        self.seen[node] = (tuple(query.shape), tuple(key.shape), tuple(value.shape),
                           mask.detach() if isinstance(mask, torch.Tensor) else None)
