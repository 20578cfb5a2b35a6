"""`SparseAttention`: the module that owns one attention site at run time — its masks, backends and plans."""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Sequence

import torch

from sparsify.errors import StrategyError, UnsupportedError
from sparsify.ops import dense_attention
from sparsify.runtime.block_mask import RuntimeBlockMask, causal_element_mask
from sparsify.runtime.mask_source import AdaptiveMaskSource, StaticMaskSource
from sparsify.site import AttentionSite

if TYPE_CHECKING:
    from sparsify.backends.base import Backend, BackendPlan
    from sparsify.cost import CostModel
    from sparsify.patterns import Pattern

logger = logging.getLogger(__name__)

__all__ = ["SparseAttention", "StepCounter", "MASK_CACHE_SIZE", "PLAN_CACHE_SIZE"]

#: Runtime masks a site keeps (one per query length, key length, query offset and device).
MASK_CACHE_SIZE = 16
#: Backend plans a site keeps (one per mask, backend and call shape).
PLAN_CACHE_SIZE = 32


class StepCounter:
    """Counts forward calls of a compiled model, for strategies that keep the first steps dense.

    Diffusion pipelines call the denoiser once per step; ``steps_per_generation`` (when known)
    wraps the count so each generation starts at step 0 again. `SparsifiedModule.reset_steps`
    resets it by hand.

    Under ``torch.compile`` the count stays out of the graph: sites register their
    ``dense_steps`` (`register`) and read ``dense_phase`` (``dense_steps -> step < dense_steps``),
    so a compiled model guards on one bool per site instead of on the step (which would recompile
    it every call); with no site registered nothing is counted inside a compiled graph.

    Example:
        >>> counter = StepCounter(steps_per_generation=3)
        >>> [counter.advance() for _ in range(4)]
        [0, 1, 2, 0]
    """

    def __init__(self, steps_per_generation: int | None = None):
        if steps_per_generation is not None and steps_per_generation <= 0:
            raise ValueError(f"steps_per_generation must be positive, got {steps_per_generation}")
        self.steps_per_generation = steps_per_generation
        self.dense_phase: dict[int, bool] = {}
        self._step = 0

    @property
    def step(self) -> int:
        """The current step (0 is the first call of a generation)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = value
        for dense_steps in self.dense_phase:
            self.dense_phase[dense_steps] = value < dense_steps

    def register(self, dense_steps: int) -> None:
        """A site keeps its first ``dense_steps`` steps dense: keep ``dense_phase[dense_steps]`` up to date."""
        if dense_steps:
            self.dense_phase[dense_steps] = self._step < dense_steps

    def advance(self) -> int:
        """Return the current step and move to the next one."""
        if torch.compiler.is_compiling():
            return _advance_outside_graph(self) if self.dense_phase else self._step
        current = self.step
        following = current + 1
        if self.steps_per_generation is not None and following >= self.steps_per_generation:
            following = 0
        self.step = following
        return current

    def reset(self) -> None:
        self.step = 0


@torch._disable_dynamo  # like torch.compiler.disable, but imports dynamo at the first call, not at `import sparsify`
def _advance_outside_graph(counter: StepCounter) -> int:
    """`StepCounter.advance` for a compiled model whose sites keep dense steps: runs eagerly (one graph break)."""
    return counter.advance()


def is_dense_pattern(pattern: "Pattern") -> bool:
    """Whether ``pattern`` keeps every block (the head runs dense attention)."""
    return pattern.to_dict().get("pattern") == "dense"


class SparseAttention(torch.nn.Module):
    """Attention of one site with per-head patterns: dense heads via SDPA, sparse heads via a backend, skipped heads as zeros.

    The module owns everything the site needs at run time: one `RuntimeBlockMask` per (query
    length, key length, query offset, device), built from the patterns on first use and kept
    in a bounded cache; the backend chosen per (dtype, device); and the backend's plan per mask
    and call shape. Nothing is global.

    ``forward`` has the signature of the canonical op ``torch.ops.sparsify.attention`` (it
    replaces it in a rewritten graph); `attend` is the general entry, with a query offset for
    decode steps and prefill chunks.

    Example:
        >>> from sparsify import patterns
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=16, q_len=128, k_len=128)
        >>> layer = SparseAttention(site, [patterns.dense(), patterns.sliding_window(32)], block_size=32)
        >>> q = torch.randn(1, 2, 128, 16)
        >>> layer(q, q, q, None, False, None).shape
        torch.Size([1, 2, 128, 16])
    """

    def __init__(self, site: AttentionSite, head_patterns: Sequence["Pattern"], *, block_size: int,
                 backend: str = "auto", dense_steps: int = 0, step_counter: StepCounter | None = None,
                 cost_model: "CostModel | None" = None):
        super().__init__()
        if len(head_patterns) != site.num_heads:
            raise StrategyError(f"site {site.name!r} has {site.num_heads} heads, got {len(head_patterns)} patterns")
        self.site = site
        self.head_patterns = list(head_patterns)
        self.block_size = block_size
        self.backend = backend
        self.dense_steps = dense_steps
        self.step_counter = step_counter
        if dense_steps and step_counter is not None and hasattr(step_counter, "register"):
            step_counter.register(dense_steps)
        self.cost_model = cost_model
        dense = [h for h, p in enumerate(head_patterns) if is_dense_pattern(p)]
        skipped = [h for h, p in enumerate(head_patterns) if getattr(p, "is_skip", False)]
        adaptive = [h for h, p in enumerate(head_patterns) if getattr(p, "is_adaptive", False)]
        sparse = [h for h, p in enumerate(head_patterns)
                  if not is_dense_pattern(p) and h not in skipped and h not in adaptive]
        group = site.gqa_group_size
        self.register_buffer("dense_heads", torch.tensor(dense, dtype=torch.long), persistent=False)
        self.register_buffer("sparse_heads", torch.tensor(sparse, dtype=torch.long), persistent=False)
        self.register_buffer("skipped_heads", torch.tensor(skipped, dtype=torch.long), persistent=False)
        self.register_buffer("dense_kv_heads", torch.tensor([h // group for h in dense], dtype=torch.long),
                             persistent=False)
        self.register_buffer("adaptive_heads", torch.tensor(adaptive, dtype=torch.long), persistent=False)
        self.adaptive_source = None
        if adaptive:
            self.adaptive_source = AdaptiveMaskSource(
                [head_patterns[h] for h in adaptive], block_size=block_size, causal=site.causal,
                kv_head_index=torch.tensor([h // group for h in adaptive], dtype=torch.long),
                self_attention=site.is_self_attention)
        #: Set to a list to collect, per call, the mean kept-block share of the adaptive heads (device
        #: tensors, read when the caller wants them: the search and reports use it).
        self.adaptive_density_log: list | None = None
        self.mask_source = StaticMaskSource([head_patterns[h] for h in sparse], block_size=block_size,
                                            causal=site.causal,
                                            kv_head_index=torch.tensor([h // group for h in sparse], dtype=torch.long))
        self._masks: collections.OrderedDict[tuple, RuntimeBlockMask] = collections.OrderedDict()
        self._plans: collections.OrderedDict[tuple, tuple["Backend", "BackendPlan"]] = collections.OrderedDict()
        self._backends: dict[tuple, "Backend"] = {}
        self._make_trace_time_calls()
        if sparse:  # patterns are checked here, at build time, not at the first call
            self.runtime_mask(site.q_len, site.k_len, torch.device("cpu"))

    def extra_repr(self) -> str:
        return (f"site={self.site.name!r}, heads={self.site.num_heads} (dense {self.dense_heads.numel()}, "
                f"sparse {self.sparse_heads.numel()}, adaptive {self.adaptive_heads.numel()}, "
                f"skipped {self.skipped_heads.numel()}), "
                f"block_size={self.block_size}, backend={self.backend!r}")

    # --- state that must not be copied ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_masks"] = collections.OrderedDict()
        state["_plans"] = collections.OrderedDict()
        state["_backends"] = {}
        for name in ("_trace_time_ensure_mask", "_trace_time_backend_name"):  # bound to this instance: made anew
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._make_trace_time_calls()

    def _make_trace_time_calls(self) -> None:
        """The functions `compiled_attend` calls while dynamo traces (see `TraceTimeCalls`), bound to this site."""
        from sparsify.runtime.compiled import TraceTimeCalls

        calls = TraceTimeCalls(self)
        self._trace_time_ensure_mask, self._trace_time_backend_name = calls.ensure_mask, calls.backend_name

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): cached device state is stale
        self._plans.clear()
        self._backends.clear()
        return super()._apply(fn, recurse)

    # --- masks, backends, plans -----------------------------------------------------------------

    def runtime_mask(self, q_len: int, k_len: int, device: torch.device | str, q_offset: int = 0) -> RuntimeBlockMask:
        """The runtime mask of the sparse heads for these lengths (built once, then cached; bounded).

        Example:
            >>> layer.runtime_mask(256, 256, "cpu").num_heads          # doctest: +SKIP
            1
        """
        device = torch.device(device)
        key = (q_len, k_len, q_offset, str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = self.mask_source.mask(q_len=q_len, k_len=k_len, q_offset=q_offset, device=device)
            if len(self._masks) >= MASK_CACHE_SIZE:
                self._masks.popitem(last=False)  # the least recently used lengths go first
            self._masks[key] = mask
        else:
            self._masks.move_to_end(key)
        return mask

    def backend_for(self, dtype: torch.dtype, device: torch.device | str, *, needs_grad: bool = False) -> "Backend":
        """The backend that serves this site's sparse heads for inputs of ``dtype`` on ``device`` (resolved once)."""
        device = torch.device(device)
        key = (dtype, str(device), needs_grad)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._resolve_backend(dtype, device, needs_grad)
            self._backends[key] = backend
        return backend

    def _resolve_backend(self, dtype: torch.dtype, device: torch.device, needs_grad: bool) -> "Backend":
        from sparsify.backends.base import auto_candidates, require_backend

        site = self.site
        if self.backend != "auto":
            backend = require_backend(self.backend, device)
            reason = backend.unsupported_reason(site, dtype, device)
            if reason:
                raise UnsupportedError(f"backend {self.backend!r} cannot serve site {site.name!r} "
                                       f"({str(dtype).replace('torch.', '')} on {device}): {reason}")
            if needs_grad and not backend.features.training:
                raise UnsupportedError(
                    f"site {site.name!r}: backend {self.backend!r} computes no gradients; train with backend='torch' "
                    f"(or 'auto'), or run the forward under torch.no_grad()")
            return backend
        candidates = [b for b in auto_candidates(device) if b.supports(site, dtype, device)
                      and (b.features.training or not needs_grad)]
        if not candidates:
            raise UnsupportedError(f"no backend serves site {site.name!r} for {dtype} on {device}")
        if len(candidates) == 1:
            return candidates[0]
        from sparsify.cost import CostModel

        cost_model = self.cost_model or CostModel.default()
        kept = self.runtime_mask(site.q_len, site.k_len, torch.device("cpu")).kept_blocks_per_head()
        estimates = {}
        for backend in candidates:
            try:
                estimates[backend.name] = cost_model.sparse_latency(site, kept, backend=backend.cost_key, device=device,
                                                                    block_size=self.block_size)
            except Exception:  # noqa: BLE001 - a backend without cost constants is priced last
                estimates[backend.name] = float("inf")
        logger.debug("site %s: backend estimates %s", site.name, estimates)
        return min(candidates, key=lambda b: (estimates[b.name], b.auto_priority))

    def _dense_backend(self, q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                       needs_grad: bool) -> "Backend | None":
        """The site's backend when it runs this call's dense heads faster than SDPA (cost model), else ``None``."""
        if is_causal != self.site.causal:
            return None  # the block mask follows the site's causality; this call asks for another
        key = ("dense", q.dtype, str(q.device), needs_grad)
        if key not in self._backends:
            backend = self.backend_for(q.dtype, q.device, needs_grad=needs_grad)
            self._backends[key] = backend if self._dense_pays(backend, q.device) else None
        backend = self._backends[key]
        if backend is not None and attn_mask is not None and backend.attn_mask_problem(attn_mask) is not None:
            return None
        return backend

    def _dense_pays(self, backend: "Backend", device: torch.device) -> bool:
        if backend.name == "torch" or backend.block_size_problem(self.block_size, self.site.head_dim, device):
            return False
        from sparsify.cost import CostModel

        cost_model = self.cost_model or CostModel.default()
        site = self.site
        full = RuntimeBlockMask.dense(1, block_size=self.block_size, q_len=site.q_len, k_len=site.k_len,
                                      causal=site.causal).kept_blocks_per_head()[0]
        try:
            ours = cost_model.sparse_head_latency(site, full, backend=backend.cost_key, device=device,
                                                  block_size=self.block_size)
            sdpa = cost_model.dense_head_latency(site, backend=backend.cost_key, device=device)
        except Exception:  # noqa: BLE001 - no cost constants: keep SDPA
            return False
        return ours < sdpa

    def _full_mask(self, q_len: int, k_len: int, q_offset: int, device: torch.device) -> RuntimeBlockMask:
        """Every block, for dense heads run by the site's backend (cached beside the sparse masks)."""
        key = ("dense", q_len, k_len, q_offset, str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = RuntimeBlockMask.dense(self.dense_heads.numel(), block_size=self.block_size, q_len=q_len,
                                          k_len=k_len, causal=self.site.causal, q_offset=q_offset,
                                          kv_head_index=self.dense_kv_heads.cpu(), device=device)
            if len(self._masks) >= MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
            self._masks[key] = mask
        return mask

    def _backend_for_mask(self, backend: "Backend", attn_mask: torch.Tensor, dtype: torch.dtype, device: torch.device,
                          needs_grad: bool) -> "Backend":
        """The backend for a call whose user mask the resolved backend does not take: the next one ``auto`` would
        consider (cached), or an error naming the site when the backend was asked for by name."""
        problem = backend.attn_mask_problem(attn_mask)
        if self.backend != "auto":
            raise UnsupportedError(f"site {self.site.name!r}: backend {self.backend!r} cannot take this call's "
                                   f"attn_mask: {problem}. Use backend='auto' (it falls back per call) or 'triton'")
        key = (dtype, str(device), needs_grad, "mask", attn_mask.dim(), tuple(s == 1 or st == 0 for s, st in
                                                                          zip(attn_mask.shape, attn_mask.stride())))
        fallback = self._backends.get(key)
        if fallback is None:
            from sparsify.backends.base import auto_candidates

            for candidate in auto_candidates(device):
                if (candidate.supports(self.site, dtype, device) and candidate.attn_mask_problem(attn_mask) is None
                        and (candidate.features.training or not needs_grad)):
                    fallback = candidate
                    break
            if fallback is None:
                raise UnsupportedError(f"site {self.site.name!r}: no backend takes this call's attn_mask ({problem})")
            logger.info("site %s: %s cannot take an attn_mask of shape %s; %s serves those calls", self.site.name,
                        backend.name, tuple(attn_mask.shape), fallback.name)
            self._backends[key] = fallback
        return fallback

    def plan_for(self, mask_key: tuple, mask: RuntimeBlockMask, backend: "Backend", q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> "BackendPlan":
        """The backend's plan for this mask and call shape (prepared once, then cached; bounded)."""
        key = (mask_key, backend.name, id(backend), tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype)
        entry = self._plans.get(key)
        if entry is not None and entry[0] is backend:
            self._plans.move_to_end(key)
            return entry[1]
        plan = backend.prepare(mask, q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
                               dtype=q.dtype, device=q.device)
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        self._plans[key] = (backend, plan)
        return plan

    # --- forward ----------------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, scale: float | None, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(q, k, v, attn_mask, scale, is_causal=is_causal, softcap=softcap, sinks=sinks)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               scale: float | None = None, *, is_causal: bool = False, q_offset: int = 0,
               softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the site for one call: ``q`` ``[B, H, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]``.

        ``q_offset`` places query ``i`` at absolute position ``q_offset + i`` (decode steps and
        prefill chunks against a cache: ``k_len - q_len``); causal masking, of dense heads too,
        follows it. The result has the layout of ``q``.
        """
        if torch.compiler.is_compiling():  # torch.compile: the traceable path, kernel as a custom op
            from sparsify.runtime.compiled import compiled_attend

            return compiled_attend(self, q, k, v, attn_mask, scale, is_causal=is_causal, q_offset=q_offset,
                                   softcap=softcap, sinks=sinks)
        dense_only = (self.sparse_heads.numel() == 0 and self.skipped_heads.numel() == 0
                      and self.adaptive_heads.numel() == 0)
        early_step = self.dense_steps and self.step_counter is not None and self.step_counter.step < self.dense_steps
        if dense_only or early_step:
            return _dense(q, k, v, attn_mask, is_causal, scale, q_offset, softcap, sinks)
        attn_mask = self.checked_call(q, k, attn_mask, is_causal)
        output = q.new_empty((*q.shape[:-1], v.shape[-1]))
        if self.skipped_heads.numel():
            output.index_fill_(1, self.skipped_heads, 0)  # a skipped head contributes nothing
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if self.dense_heads.numel():
            dense_mask = _select_heads(attn_mask, self.dense_heads)
            dense_sinks = sinks.index_select(0, self.dense_heads) if sinks is not None else None
            backend = self._dense_backend(q, dense_mask, is_causal, needs_grad)
            if backend is None:
                dense_out = _dense(q.index_select(1, self.dense_heads), k.index_select(1, self.dense_kv_heads),
                                   v.index_select(1, self.dense_kv_heads), dense_mask, is_causal, scale, q_offset,
                                   softcap, dense_sinks)
            else:  # the site's backend runs dense heads faster than SDPA (by the cost model): a full mask
                dense_q = q.index_select(1, self.dense_heads)
                mask_key = ("dense", q.shape[2], k.shape[2], q_offset, str(q.device))
                mask = self._full_mask(q.shape[2], k.shape[2], q_offset, q.device)
                plan = self.plan_for(mask_key, mask, backend, dense_q, k, v)
                dense_out = backend.run(plan, dense_q, k, v, attn_mask=dense_mask, scale=scale, softcap=softcap,
                                        sinks=dense_sinks)
            output.index_copy_(1, self.dense_heads, dense_out.to(output.dtype))
        if self.sparse_heads.numel():
            output.index_copy_(1, self.sparse_heads, self._static_heads(q, k, v, attn_mask, scale, q_offset, softcap,
                                                                        sinks, needs_grad).to(output.dtype))
        if self.adaptive_heads.numel():
            output.index_copy_(1, self.adaptive_heads, self._adaptive_heads(q, k, v, attn_mask, scale, q_offset,
                                                                            softcap, sinks, needs_grad).to(output.dtype))
        return output

    def checked_call(self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                     is_causal: bool) -> torch.Tensor | None:
        """Refuse a call the site cannot serve (heads, causality, device); returns ``attn_mask`` as 4-D (or ``None``)."""
        site = self.site
        if q.shape[1] != site.num_heads or k.shape[1] != site.num_kv_heads:
            raise UnsupportedError(
                f"site {site.name!r} was compiled for {site.num_heads} query / {site.num_kv_heads} key-value heads, "
                f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
        if is_causal and not site.causal:
            raise UnsupportedError(f"site {site.name!r} was compiled as non-causal but is called with is_causal=True")
        if self.sparse_heads.device != q.device:
            raise UnsupportedError(f"site {site.name!r} is on {self.sparse_heads.device} but was called with tensors on "
                                   f"{q.device}: move the compiled module there first (`.to({str(q.device)!r})`)")
        if attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        return attn_mask

    def _static_heads(self, q, k, v, attn_mask, scale, q_offset, softcap, sinks, needs_grad) -> torch.Tensor:
        """The heads with static patterns: the mask and the plan are cached per length and call shape."""
        q_len, k_len = q.shape[2], k.shape[2]
        mask_key = (q_len, k_len, q_offset, str(q.device))
        mask = self.runtime_mask(q_len, k_len, q.device, q_offset)
        backend = self.backend_for(q.dtype, q.device, needs_grad=needs_grad)
        sparse_mask = _select_heads(attn_mask, self.sparse_heads)
        if sparse_mask is not None and backend.attn_mask_problem(sparse_mask) is not None:
            backend = self._backend_for_mask(backend, sparse_mask, q.dtype, q.device, needs_grad)
        sparse_q = q.index_select(1, self.sparse_heads)
        plan = self.plan_for(mask_key, mask, backend, sparse_q, k, v)
        return backend.run(plan, sparse_q, k, v, attn_mask=sparse_mask, scale=scale, softcap=softcap,
                           sinks=sinks.index_select(0, self.sparse_heads) if sinks is not None else None)

    def _adaptive_heads(self, q, k, v, attn_mask, scale, q_offset, softcap, sinks, needs_grad) -> torch.Tensor:
        """The heads with input-adaptive patterns: the mask is estimated from this call's q and k, on the device."""
        adaptive_q = q.index_select(1, self.adaptive_heads)
        head_mask = _select_heads(attn_mask, self.adaptive_heads)
        mask = self.adaptive_source.mask(adaptive_q, k, attn_mask=head_mask, q_offset=q_offset, scale=scale)
        if self.adaptive_density_log is not None:
            self.adaptive_density_log.append(mask.kept_counts().float().mean((0, 2)) / mask.k_blocks)
        backend = self.backend_for(q.dtype, q.device, needs_grad=needs_grad)
        if head_mask is not None and backend.attn_mask_problem(head_mask) is not None:
            backend = self._backend_for_mask(backend, head_mask, q.dtype, q.device, needs_grad)
        plan = backend.prepare(mask, q_shape=tuple(adaptive_q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
                               dtype=q.dtype, device=q.device)
        return backend.run(plan, adaptive_q, k, v, attn_mask=head_mask, scale=scale, softcap=softcap,
                           sinks=sinks.index_select(0, self.adaptive_heads) if sinks is not None else None)


def _dense(q, k, v, attn_mask, is_causal, scale, q_offset, softcap, sinks) -> torch.Tensor:
    """Dense attention; a causal call at a query offset gets its (bottom-right) causal mask explicitly."""
    if is_causal and q_offset:
        causal = causal_element_mask(q.shape[2], k.shape[2], q_offset, q.device)
        if attn_mask is None:
            attn_mask = causal
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    if softcap is None and sinks is None:
        return dense_attention(q, k, v, attn_mask, is_causal, scale)
    return dense_attention(q, k, v, attn_mask, is_causal, scale, softcap=softcap, sinks=sinks)


def _select_heads(mask: torch.Tensor | None, heads: torch.Tensor) -> torch.Tensor | None:
    if mask is None or mask.shape[1] == 1:
        return mask
    return mask.index_select(1, heads)
