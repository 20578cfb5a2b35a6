"""The `rewrite_attention` pass: replace canonical attention nodes by block-sparse `SparseAttention` modules."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sparsify.errors import StrategyError, UnsupportedError
from sparsify.ops import dense_attention
from sparsify.passes.infra import SITE_META_KEY, GraphPass, attention_nodes
from sparsify.site import AttentionSite
from sparsify.tables import BlockTables, blocks_for

if TYPE_CHECKING:
    from sparsify.patterns import Pattern
    from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)

# Block tables kept per SparseAttention for sequence lengths other than the captured one.
TABLE_CACHE_SIZE = 16
# Backends backend="auto" considers; among those that support a call, the cost model's fastest serves it.
AUTO_BACKEND_ORDER = ("triton", "flex", "torch")


class StepCounter:
    """Counts forward calls of a compiled model, for strategies that keep the first steps dense.

    Diffusion pipelines call the denoiser once per step; ``steps_per_generation`` (when known)
    wraps the count so each generation starts at step 0 again. `SparsifiedModule.reset_steps`
    resets it by hand.

    Example:
        >>> counter = StepCounter(steps_per_generation=3)
        >>> [counter.advance() for _ in range(4)]
        [0, 1, 2, 0]
    """

    def __init__(self, steps_per_generation: int | None = None):
        if steps_per_generation is not None and steps_per_generation <= 0:
            raise ValueError(f"steps_per_generation must be positive, got {steps_per_generation}")
        self.steps_per_generation = steps_per_generation
        self.step = 0

    def advance(self) -> int:
        """Return the current step and move to the next one."""
        current = self.step
        self.step += 1
        if self.steps_per_generation is not None and self.step >= self.steps_per_generation:
            self.step = 0
        return current

    def reset(self) -> None:
        self.step = 0


class SparseAttention(torch.nn.Module):
    """Attention of one site with per-head patterns: dense heads via SDPA, sparse heads via a backend.

    Block tables for the sequence lengths seen at capture are buffers (they move with
    ``.to(device)``); tables for other lengths are built from the patterns on first use and
    cached per ``(q_len, k_len, device)``.

    Example:
        >>> from sparsify import patterns
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=16, q_len=128, k_len=128)
        >>> layer = SparseAttention(site, [patterns.dense(), patterns.sliding_window(32)], block_size=32)
        >>> q = torch.randn(1, 2, 128, 16)
        >>> layer(q, q, q, None, False, None).shape
        torch.Size([1, 2, 128, 16])
    """

    def __init__(self, site: AttentionSite, head_patterns: list["Pattern"], *, block_size: int, backend: str = "auto",
                 dense_steps: int = 0, step_counter: StepCounter | None = None):
        super().__init__()
        self.dense_steps = dense_steps
        self.step_counter = step_counter
        if len(head_patterns) != site.num_heads:
            raise StrategyError(f"site {site.name!r} has {site.num_heads} heads, got {len(head_patterns)} patterns")
        self.site = site
        self.head_patterns = list(head_patterns)
        self.block_size = block_size
        self.backend = backend
        dense = [h for h, p in enumerate(head_patterns) if _is_dense(p)]
        skipped = [h for h, p in enumerate(head_patterns) if getattr(p, "is_skip", False)]
        sparse = [h for h, p in enumerate(head_patterns) if not _is_dense(p) and h not in skipped]
        group = site.gqa_group_size
        self.register_buffer("dense_heads", torch.tensor(dense, dtype=torch.long), persistent=False)
        self.register_buffer("sparse_heads", torch.tensor(sparse, dtype=torch.long), persistent=False)
        self.register_buffer("skipped_heads", torch.tensor(skipped, dtype=torch.long), persistent=False)
        self.register_buffer("dense_kv_heads", torch.tensor([h // group for h in dense], dtype=torch.long), persistent=False)
        self._table_cache: dict[tuple, BlockTables] = {}
        self._backend_cache: dict[tuple, object] = {}
        tables = self._build_tables(site.q_len, site.k_len, torch.device("cpu"))
        self._captured_lengths = (site.q_len, site.k_len)
        self.register_buffer("kv_indices", tables.kv_indices, persistent=False)
        self.register_buffer("kv_counts", tables.kv_counts, persistent=False)
        self.register_buffer("sparse_kv_heads", tables.kv_head_index, persistent=False)

    def extra_repr(self) -> str:
        return (f"site={self.site.name!r}, heads={self.site.num_heads} (dense {self.dense_heads.numel()}, "
                f"sparse {self.sparse_heads.numel()}, skipped {self.skipped_heads.numel()}), "
                f"block_size={self.block_size}, backend={self.backend!r}")

    def _build_tables(self, q_len: int, k_len: int, device: torch.device) -> BlockTables:
        q_blocks = blocks_for(q_len, self.block_size)
        k_blocks = blocks_for(k_len, self.block_size)
        sparse = [self.head_patterns[h] for h in self.sparse_heads.tolist()]
        if sparse:
            masks = torch.stack([
                p.block_mask(q_blocks, k_blocks, block_size=self.block_size, causal=self.site.causal,
                             q_len=q_len, k_len=k_len)
                for p in sparse
            ])
        else:
            masks = torch.ones(0, q_blocks, k_blocks, dtype=torch.bool)
        group = self.site.gqa_group_size
        kv_heads = torch.tensor([h // group for h in self.sparse_heads.tolist()], dtype=torch.long)
        if not sparse:
            return BlockTables(torch.zeros(0, q_blocks, 1, dtype=torch.int32), torch.ones(0, q_blocks, dtype=torch.int32),
                               kv_heads, self.block_size, q_len, k_len, self.site.causal)
        return BlockTables.from_block_masks(masks, block_size=self.block_size, q_len=q_len, k_len=k_len,
                                            causal=self.site.causal, kv_head_index=kv_heads).to(device)

    def tables(self, q_len: int, k_len: int, device: torch.device) -> BlockTables:
        """Block tables of the sparse heads for these lengths (cached; backends cache plans per tables)."""
        captured = (q_len, k_len) == self._captured_lengths and self.kv_indices.device == device
        key = (q_len, k_len, str(device), self.kv_indices.data_ptr() if captured else 0)
        if key not in self._table_cache:
            if len(self._table_cache) >= TABLE_CACHE_SIZE:
                self._table_cache.pop(next(iter(self._table_cache)))  # oldest length first
            if captured:
                self._table_cache[key] = BlockTables(self.kv_indices, self.kv_counts, self.sparse_kv_heads,
                                                     self.block_size, q_len, k_len, self.site.causal)
            else:
                self._table_cache[key] = self._build_tables(q_len, k_len, device)
        return self._table_cache[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, scale: float | None) -> torch.Tensor:
        if self.sparse_heads.numel() == 0 and self.skipped_heads.numel() == 0:
            return dense_attention(q, k, v, attn_mask, is_causal, scale)
        if self.dense_steps and self.step_counter is not None and self.step_counter.step < self.dense_steps:
            return dense_attention(q, k, v, attn_mask, is_causal, scale)  # an early step stays dense
        if q.shape[1] != self.site.num_heads or k.shape[1] != self.site.num_kv_heads:
            raise UnsupportedError(
                f"site {self.site.name!r} was compiled for {self.site.num_heads} query / {self.site.num_kv_heads} "
                f"key-value heads, got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        if attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if is_causal and not self.site.causal:
            raise UnsupportedError(f"site {self.site.name!r} was compiled as non-causal but is called with is_causal=True")
        output = q.new_empty((*q.shape[:-1], v.shape[-1]))
        if self.skipped_heads.numel():
            output.index_fill_(1, self.skipped_heads, 0)  # a skipped head contributes nothing
        if self.dense_heads.numel():
            dense_mask = _select_heads(attn_mask, self.dense_heads)
            dense_out = dense_attention(q.index_select(1, self.dense_heads), k.index_select(1, self.dense_kv_heads),
                                        v.index_select(1, self.dense_kv_heads), dense_mask, is_causal, scale)
            output.index_copy_(1, self.dense_heads, dense_out)
        if self.sparse_heads.numel() == 0:
            return output
        tables = self.tables(q.shape[2], k.shape[2], q.device)
        backend = self._backend_for(q)
        sparse_out = backend.attention(q.index_select(1, self.sparse_heads), k, v, tables,
                                       attn_mask=_select_heads(attn_mask, self.sparse_heads), scale=scale)
        output.index_copy_(1, self.sparse_heads, sparse_out.to(output.dtype))
        return output

    def _backend_for(self, q: torch.Tensor):
        key = (q.dtype, str(q.device))
        if key not in self._backend_cache:
            self._backend_cache[key] = self._resolve_backend(q)
        return self._backend_cache[key]

    def _resolve_backend(self, q: torch.Tensor):
        from sparsify.backends import available_backends, get_backend

        if self.backend != "auto":
            backend = get_backend(self.backend)
            reason = backend.unsupported_reason(self.site, q.dtype, q.device) if backend.is_available() else "not available in this process"
            if reason:
                raise UnsupportedError(f"backend {self.backend!r} cannot serve site {self.site.name!r}: {reason}")
            return backend
        candidates = []
        for name in AUTO_BACKEND_ORDER:
            if q.device.type == "cpu" and name != "torch":
                continue  # GPU kernels on CPU only run in emulators (Triton's interpreter): tests, not "auto"
            if name in available_backends():
                backend = get_backend(name)
                if backend.supports(self.site, q.dtype, q.device):
                    candidates.append(backend)
        if len(candidates) > 1:
            # The fastest by the cost model (measured hardware profiles where shipped) for these tables.
            from sparsify.cost import CostModel

            cost_model = CostModel.default()
            tables = self.tables(self.site.q_len, self.site.k_len, q.device)
            estimates = {}
            for backend in candidates:
                try:
                    estimates[backend.name] = cost_model.latency(self.site, tables, backend.name, q.device)
                except Exception:  # noqa: BLE001 - a backend without constants is priced last
                    estimates[backend.name] = float("inf")
            candidates.sort(key=lambda b: estimates[b.name])
            logger.debug("site %s: backend estimates %s", self.site.name, estimates)
        if candidates:
            return candidates[0]
        raise UnsupportedError(f"no backend serves site {self.site.name!r} for {q.dtype} on {q.device}")


def _device_of(graph_module: torch.nn.Module) -> torch.device:
    """Where the captured model's weights live (block tables go there too)."""
    for tensor in list(graph_module.parameters()) + list(graph_module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _is_dense(pattern: "Pattern") -> bool:
    return pattern.to_dict().get("pattern") == "dense"


def _select_heads(mask: torch.Tensor | None, heads: torch.Tensor) -> torch.Tensor | None:
    if mask is None or mask.shape[1] == 1:
        return mask
    return mask.index_select(1, heads)


class RewriteAttention(GraphPass):
    """Replace each canonical attention node with a `SparseAttention` submodule per the strategy.

    Sites whose heads are all dense keep the canonical dense op. ``rewritten`` counts the
    replaced nodes after the pass ran.

    Example:
        >>> result = RewriteAttention(strategy).call(graph_module)   # doctest: +SKIP
    """

    name = "rewrite_attention"

    def __init__(self, strategy: "Strategy", *, backend: str = "auto", source: str = "strategy",
                 step_counter: StepCounter | None = None):
        self.strategy = strategy
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

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self.rewritten = 0
        for node in attention_nodes(graph_module):
            site: AttentionSite = node.meta[SITE_META_KEY]
            site_strategy = self.strategy.sites[site.name]
            if all(_is_dense(p) for p in site_strategy.heads):
                continue
            module = SparseAttention(site, site_strategy.heads, block_size=self.strategy.block_size, backend=self.backend,
                                     dense_steps=site_strategy.dense_steps, step_counter=self.step_counter)
            target = f"sparse_attention_{site.index}"
            graph_module.add_submodule(target, module.to(_device_of(graph_module)))
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
