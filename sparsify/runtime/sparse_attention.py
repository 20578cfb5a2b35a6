"""`SparseAttention`: the module that owns one attention site at run time — its masks, backends, plans and its one attend path."""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar

from sparsify.errors import StrategyError, UnsupportedError
from sparsify.ops import dense_attention
from sparsify.block_mask import RuntimeBlockMask, causal_element_mask
from sparsify.runtime.kernel_op import SITE_HANDLES, may_skip_custom_op
from sparsify.runtime.mask_source import AdaptiveMaskSource, StaticMaskSource
from sparsify.site import AttentionSite

if TYPE_CHECKING:
    from sparsify.backends.base import Backend, BackendPlan
    from sparsify.patterns import Pattern

logger = logging.getLogger(__name__)

__all__ = ["SparseAttention", "Pricing", "StepCounter", "TraceTimeCalls", "MASK_CACHE_SIZE", "PLAN_CACHE_SIZE"]

#: Runtime masks a site keeps (one per query length, key length, query offset and device).
MASK_CACHE_SIZE = 16
#: Backend plans a site keeps (one per mask, backend and call shape).
PLAN_CACHE_SIZE = 32


class Pricing(Protocol):
    """What a site asks of the cost model it is handed (`sparsify.cost.CostModel` has it; the runtime imports none)."""

    def latency(self, site: AttentionSite, mask: RuntimeBlockMask | None, backend: str, device, *, batch: int = 1,
                dense_heads: int | None = None) -> float: ...

    def head_latency(self, site: AttentionSite, mask: RuntimeBlockMask | None, head: int = 0, *, backend: str,
                     device, batch: int = 1, kept_blocks: float | None = None) -> float: ...


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


class SparseAttention(torch.nn.Module):
    """Attention of one site with per-head patterns: dense heads via SDPA (or the site's backend), sparse heads via a backend, skipped heads as zeros.

    The module owns everything the site needs at run time: one `RuntimeBlockMask` per (query
    length, key length, query offset, device), built from the patterns on first use and kept
    in a bounded cache; the backend chosen per (dtype, device) and its instance (compiled
    kernels); and the backend's plan per mask and call shape, prepared once. Nothing is global
    but the weak handle by which the kernel op finds this module (`sparsify.runtime.kernel_op`).

    `attend` is one path for eager calls and calls under ``torch.compile``: every group of
    heads that runs on a backend is one call of ``torch.ops.sparsify.block_sparse_attention``;
    masks, backend names and the choice for dense heads are resolved by functions dynamo runs
    while it traces (`TraceTimeCalls`), so a compiled graph has no break for them and holds
    their results as constants.

    ``forward`` has the signature of the canonical op ``torch.ops.sparsify.attention`` (it
    replaces it in a rewritten graph); `attend` is the general entry, with a query offset for
    decode steps and prefill chunks.

    ``cost_model`` (`Pricing`: a `sparsify.cost.CostModel`) prices what ``backend="auto"`` picks and whether
    dense heads run on the site's backend rather than SDPA. Whoever builds the site hands it in
    (the rewrite pass, the framework doors and the search do, with the default cost model when the
    user gave none): the cost model stands above the runtime, which imports none. Without one,
    ``auto`` takes the most preferred backend that serves the site and dense heads run SDPA.

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
                 cost_model: Pricing | None = None):
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
        dense = [h for h, p in enumerate(head_patterns) if p.is_dense]
        skipped = [h for h, p in enumerate(head_patterns) if getattr(p, "is_skip", False)]
        adaptive = [h for h, p in enumerate(head_patterns) if getattr(p, "is_adaptive", False)]
        sparse = [h for h, p in enumerate(head_patterns)
                  if not p.is_dense and h not in skipped and h not in adaptive]
        group = site.gqa_group_size
        self.register_buffer("dense_heads", torch.tensor(dense, dtype=torch.long), persistent=False)
        self.register_buffer("sparse_heads", torch.tensor(sparse, dtype=torch.long), persistent=False)
        self.register_buffer("skipped_heads", torch.tensor(skipped, dtype=torch.long), persistent=False)
        self.register_buffer("dense_kv_heads", torch.tensor([h // group for h in dense], dtype=torch.long),
                             persistent=False)
        self.register_buffer("adaptive_heads", torch.tensor(adaptive, dtype=torch.long), persistent=False)
        #: Whether one group (all sparse, or all adaptive) holds every head: its kernel then takes the
        #: query as it is and its output is the site's, with no head gather or scatter.
        self.one_group = len(sparse) == site.num_heads or len(adaptive) == site.num_heads
        #: Only dense and static sparse heads, both kinds present: when the backend runs dense heads faster than
        #: SDPA, every head goes in one launch under one mask (`_static_mask`'s "every").
        self.dense_and_sparse_only = bool(dense) and bool(sparse) and not adaptive and not skipped
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
        self._backends: dict[tuple, "Backend | None"] = {}
        self._instances: dict[str, "Backend"] = {}
        self._attach_run_time_state()
        if sparse:  # patterns are checked here, at build time, not at the first call
            self.runtime_mask(site.q_len, site.k_len, torch.device("cpu"))
        if sparse or adaptive:
            self._refuse_a_named_backend_that_cannot_serve()

    def _refuse_a_named_backend_that_cannot_serve(self) -> None:
        """A backend asked for by name that cannot take this site's block size on this process's GPU is refused
        now, naming the site and the reason, before any work (``auto`` falls back per site instead)."""
        if self.backend == "auto" or not torch.cuda.is_available():
            return
        from sparsify.backends.base import get_backend

        backend = get_backend(self.backend)
        if "cuda" not in backend.features.devices or backend.availability("cuda") is not None:
            return  # refused at the first call, with what is missing, where the call's device is known
        head_dim = max(self.site.head_dim, self.site.value_head_dim or self.site.head_dim)
        problem = backend.block_size_problem(self.block_size, head_dim, torch.device("cuda"))
        if problem:
            raise UnsupportedError(f"backend {self.backend!r} cannot serve site {self.site.name!r} (block_size "
                                   f"{self.block_size}, head dim {head_dim}, {torch.cuda.get_device_name()}): "
                                   f"{problem}; use backend='auto' (it falls back per site) or another backend")

    def extra_repr(self) -> str:
        return (f"site={self.site.name!r}, heads={self.site.num_heads} (dense {self.dense_heads.numel()}, "
                f"sparse {self.sparse_heads.numel()}, adaptive {self.adaptive_heads.numel()}, "
                f"skipped {self.skipped_heads.numel()}), "
                f"block_size={self.block_size}, backend={self.backend!r}")

    # --- state that must not be copied ------------------------------------------------------------

    _NOT_COPIED = ("_trace_time_calls", "_site_handle")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_masks"] = collections.OrderedDict()
        state["_plans"] = collections.OrderedDict()
        state["_backends"] = {}
        state["_instances"] = {}
        for name in self._NOT_COPIED:  # bound to this instance: made anew for a copy
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._attach_run_time_state()

    def _attach_run_time_state(self) -> None:
        """The trace-time calls bound to this module and its handle for the kernel op (anew for every copy)."""
        self._trace_time_calls = TraceTimeCalls(self)
        self._site_handle = SITE_HANDLES.register(self)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): cached device state is stale
        self._plans.clear()
        self._backends.clear()
        return super()._apply(fn, recurse)

    # --- masks ----------------------------------------------------------------------------------

    def runtime_mask(self, q_len: int, k_len: int, device: torch.device | str, q_offset: int = 0) -> RuntimeBlockMask:
        """The runtime mask of the sparse heads for these lengths (built once, then cached; bounded).

        Example:
            >>> layer.runtime_mask(256, 256, "cpu").num_heads          # doctest: +SKIP
            1
        """
        return self._static_mask("sparse", q_len, k_len, q_offset, torch.device(device))

    def _static_mask(self, slot: str, q_len: int, k_len: int, q_offset: int, device: torch.device) -> RuntimeBlockMask:
        """The cached static mask of ``slot`` for these lengths, built on a miss; the least recently used goes first.

        ``"sparse"``: the sparse heads' patterns; ``"dense"``: every block of the dense heads (run by the
        site's backend); ``"every"``: every head, sparse heads their patterns and dense heads every block
        (one launch over all heads).
        """
        key = _mask_key(slot, q_len, k_len, q_offset, str(device))
        mask = self._masks.get(key)
        if mask is not None:
            self._masks.move_to_end(key)
            return mask
        if slot == "sparse":
            mask = self.mask_source.mask(q_len=q_len, k_len=k_len, q_offset=q_offset, device=device)
        elif slot == "dense":
            mask = RuntimeBlockMask.dense(self.dense_heads.numel(), block_size=self.block_size, q_len=q_len,
                                          k_len=k_len, causal=self.site.causal, q_offset=q_offset,
                                          kv_head_index=self.dense_kv_heads.cpu(), device=device)
        else:
            every = StaticMaskSource(self.head_patterns, block_size=self.block_size, causal=self.site.causal,
                                     kv_head_index=torch.arange(self.site.num_heads) // self.site.gqa_group_size)
            mask = every.mask(q_len=q_len, k_len=k_len, q_offset=q_offset, device=device)
        if len(self._masks) >= MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        self._masks[key] = mask
        return mask

    def ensure_mask(self, slot: str, q_len: int, k_len: int, q_offset: int, device: str) -> None:
        """Build the cached mask of ``slot`` (``"sparse"``, ``"dense"`` or ``"every"``) for these lengths unless it is there.

        Under ``torch.compile`` this runs while dynamo traces (`TraceTimeCalls`), so the dict read
        that follows finds the mask without a graph break.
        """
        self._static_mask(slot, q_len, k_len, q_offset, torch.device(device))

    # --- backends -------------------------------------------------------------------------------

    def backend_for(self, dtype: torch.dtype, device: torch.device | str) -> "Backend":
        """The backend that serves this site's sparse heads for inputs of ``dtype`` on ``device`` (resolved once).

        Gradients do not narrow the choice: the kernel op's backward recomputes with the ``torch``
        backend, so the forward may run on a kernel that computes none.
        """
        device = torch.device(device)
        key = (dtype, str(device))
        backend = self._backends.get(key)
        if backend is None:
            backend = self._own(self._resolve_backend(dtype, device))
            self._backends[key] = backend
        return backend

    def _own(self, backend: "Backend") -> "Backend":
        """The module's one instance of ``backend``'s kind (instances hold compiled kernels: one per name)."""
        return self._instances.setdefault(backend.name, backend)

    def _backend_named(self, name: str) -> "Backend":
        backend = self._instances.get(name)
        if backend is None:
            from sparsify.backends.base import get_backend

            backend = self._instances[name] = get_backend(name)
        return backend

    def _resolve_backend(self, dtype: torch.dtype, device: torch.device) -> "Backend":
        from sparsify.backends.base import auto_candidates, require_backend

        site = self.site
        where = f"{str(dtype).replace('torch.', '')} on {device}, block_size {self.block_size}"
        if self.backend != "auto":
            backend = require_backend(self.backend, device)
            reason = self._serving_problem(backend, dtype, device)
            if reason:
                raise UnsupportedError(f"backend {self.backend!r} cannot serve site {site.name!r} ({where}): {reason}; "
                                       f"use backend='auto' (it falls back per site) or another backend")
            return backend
        candidates, passed_over = [], []
        for backend in auto_candidates(device):
            reason = self._serving_problem(backend, dtype, device)
            if reason:
                passed_over.append((backend, reason))
            else:
                candidates.append(backend)
        if not candidates:
            reasons = "; ".join(f"{b.name}: {reason}" for b, reason in passed_over)
            raise UnsupportedError(f"no backend serves site {site.name!r} ({where}): {reasons}")
        chosen = candidates[0] if len(candidates) == 1 else self._cheapest(candidates, device)
        preferred = [(b, reason) for b, reason in passed_over if b.auto_priority < chosen.auto_priority]
        if preferred:  # once per site, dtype and device: the resolution is cached
            logger.info("site %s (%s): %s; %s serves it instead", site.name, where,
                        "; ".join(f"backend {b.name!r} cannot ({reason})" for b, reason in preferred), chosen.name)
        return chosen

    def _serving_problem(self, backend: "Backend", dtype: torch.dtype, device: torch.device) -> str | None:
        """Why ``backend`` cannot serve this site's inputs of ``dtype`` on ``device`` at its block size, or ``None``."""
        head_dim = max(self.site.head_dim, self.site.value_head_dim or self.site.head_dim)
        return (backend.unsupported_reason(self.site, dtype, device)
                or backend.block_size_problem(self.block_size, head_dim, device))

    def _cheapest(self, candidates: list["Backend"], device: torch.device) -> "Backend":
        """The candidate the cost model prices lowest for the sparse heads; without one, the most preferred."""
        if self.cost_model is None:
            return candidates[0]
        site = self.site
        cost_model = self.cost_model
        mask = self.runtime_mask(site.q_len, site.k_len, torch.device("cpu"))
        estimates = {}
        for backend in candidates:
            try:  # the sparse heads only: whichever backend serves them, the dense heads run SDPA
                estimates[backend.name] = cost_model.latency(site, mask, backend.cost_key, device, dense_heads=0)
            except Exception:  # noqa: BLE001 - a backend without cost constants is priced last
                estimates[backend.name] = float("inf")
        logger.debug("site %s: backend estimates %s", site.name, estimates)
        return min(candidates, key=lambda b: (estimates[b.name], b.auto_priority))

    def backend_name(self, dtype: torch.dtype, device: torch.device | str, mask_layout: tuple | None) -> str:
        """The name of the backend that runs this site's sparse heads for these inputs (a graph constant under compile).

        ``mask_layout`` is ``None`` or ``(shape, stride, dtype)`` of the user's ``attn_mask`` for
        those heads: a backend that cannot take that mask is replaced by the next one ``auto``
        would consider (or refused, naming the site, when the backend was asked for by name).
        """
        device = torch.device(device)
        backend = self.backend_for(dtype, device)
        if mask_layout is not None:
            probe = _mask_probe(mask_layout)
            if backend.attn_mask_problem(probe) is not None:
                backend = self._backend_for_mask(backend, probe, dtype, device)
        return backend.name

    def dense_backend_name(self, dtype: torch.dtype, device: torch.device | str, is_causal: bool,
                           mask_layout: tuple | None) -> str:
        """The backend that runs this call's dense heads when it beats SDPA (by the cost model), else ``""`` (SDPA)."""
        if is_causal != self.site.causal:
            return ""  # the block mask follows the site's causality; this call asks for another
        device = torch.device(device)
        key = ("dense", dtype, str(device))
        if key not in self._backends:
            backend = self.backend_for(dtype, device)
            self._backends[key] = backend if self._dense_pays(backend, device) else None
        backend = self._backends[key]
        if backend is None or (mask_layout is not None and backend.attn_mask_problem(_mask_probe(mask_layout))):
            return ""
        return backend.name

    def _dense_pays(self, backend: "Backend", device: torch.device) -> bool:
        if (self.cost_model is None or backend.name == "torch"
                or backend.block_size_problem(self.block_size, self.site.head_dim, device)):
            return False
        cost_model = self.cost_model
        site = self.site
        full = RuntimeBlockMask.dense(1, block_size=self.block_size, q_len=site.q_len, k_len=site.k_len,
                                      causal=site.causal)
        try:
            ours = cost_model.head_latency(site, full, backend=backend.cost_key, device=device)
            sdpa = cost_model.head_latency(site, None, backend=backend.cost_key, device=device)
        except Exception:  # noqa: BLE001 - no cost constants: keep SDPA
            return False
        return ours < sdpa

    def _backend_for_mask(self, backend: "Backend", attn_mask: torch.Tensor, dtype: torch.dtype,
                          device: torch.device) -> "Backend":
        """The backend for a call whose user mask the resolved backend does not take: the next one ``auto`` would
        consider (cached), or an error naming the site when the backend was asked for by name."""
        problem = backend.attn_mask_problem(attn_mask)
        if self.backend != "auto":
            raise UnsupportedError(f"site {self.site.name!r}: backend {self.backend!r} cannot take this call's "
                                   f"attn_mask: {problem}. Use backend='auto' (it falls back per call) or 'triton'")
        key = (dtype, str(device), "mask", attn_mask.dim(), tuple(s == 1 or st == 0 for s, st in
                                                                 zip(attn_mask.shape, attn_mask.stride())))
        fallback = self._backends.get(key)
        if fallback is None:
            from sparsify.backends.base import auto_candidates

            for candidate in auto_candidates(device):
                if self._serving_problem(candidate, dtype, device) is None and \
                        candidate.attn_mask_problem(attn_mask) is None:
                    fallback = self._own(candidate)
                    break
            if fallback is None:
                raise UnsupportedError(f"site {self.site.name!r}: no backend takes this call's attn_mask ({problem})")
            logger.info("site %s: %s cannot take an attn_mask of shape %s; %s serves those calls", self.site.name,
                        backend.name, tuple(attn_mask.shape), fallback.name)
            self._backends[key] = fallback
        return fallback

    # --- plans and the kernel op ----------------------------------------------------------------

    def plan_for(self, mask_key: tuple, mask: RuntimeBlockMask, backend: "Backend", q_shape: tuple, k_shape: tuple,
                 v_shape: tuple, dtype: torch.dtype, device: torch.device) -> "BackendPlan":
        """The backend's plan for this mask and call shape (prepared once, then cached; bounded)."""
        key = (mask_key, backend.name, id(backend), q_shape, k_shape, v_shape, dtype)
        entry = self._plans.get(key)
        if entry is not None and entry[0] is backend:
            self._plans.move_to_end(key)
            return entry[1]
        plan = backend.prepare(mask, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape, dtype=dtype, device=device)
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        self._plans[key] = (backend, plan)
        return plan

    def ensure_plan(self, mask_slot: str, backend: str, q_shape: tuple, k_shape: tuple, v_shape: tuple,
                    dtype: torch.dtype, q_offset: int, device: str) -> None:
        """Prepare the plan the kernel op will ask for (a static mask of ``mask_slot`` and these shapes) unless cached.

        Under ``torch.compile`` this runs while dynamo traces (`TraceTimeCalls`): a plan prepared on
        the op's first call would be allocated inside a CUDA-graph pool during ``reduce-overhead``'s
        warm-up and outlive it untracked (cudagraph trees refuse that).
        """
        mask_key = _mask_key(mask_slot, q_shape[2], k_shape[2], q_offset, device)
        self.plan_for(mask_key, self._masks[mask_key], self._backend_named(backend), q_shape, k_shape, v_shape, dtype,
                      torch.device(device))

    def run_kernel(self, mask_slot: str, mask: RuntimeBlockMask, backend: str, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None, softcap: float | None,
                   sinks: torch.Tensor | None) -> torch.Tensor:
        """What the kernel op runs for this site: the cached plan of a static mask (``mask_slot`` ``"sparse"`` or
        ``"dense"``), or a plan for this call only (``""``: a mask estimated from this call's inputs)."""
        kernel = self._backend_named(backend)
        if mask_slot:
            mask_key = _mask_key(mask_slot, mask.q_len, mask.k_len, mask.q_offset, str(q.device))
            mask = self._masks.get(mask_key, mask)  # the cached object: it knows its heads on the host
            plan = self.plan_for(mask_key, mask, kernel, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype,
                                 q.device)
        else:
            if mask.kv_heads is None and self.adaptive_source is not None:  # the op passed tensors only: give the
                mask = dataclasses.replace(mask, kv_heads=self.adaptive_source.kv_heads)  # head map without a device read
            plan = kernel.prepare(mask, q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
                                  dtype=q.dtype, device=q.device)
        return kernel.run(plan, q, k, v, attn_mask=attn_mask, scale=scale, softcap=softcap, sinks=sinks)

    def _kernel(self, mask_slot: str, backend: str, heads: torch.Tensor, mask: RuntimeBlockMask, q, k, v, head_mask,
                scale, softcap, sinks) -> torch.Tensor:
        """One call of the kernel op for the query heads ``heads`` of the site under ``mask`` (``None``: every head)."""
        if heads is not None and not self.one_group:  # (one group: every head, in order)
            q = q.index_select(1, heads)
            sinks = sinks.index_select(0, heads) if sinks is not None else None
        if may_skip_custom_op(q, k, v, sinks):
            # Eager and without autograd, the op's implementation directly, sparing the dispatcher's custom-op
            # machinery its host time on every call (the same result: the op runs exactly this).
            return self.run_kernel(mask_slot, mask, backend, q, k, v, head_mask, scale, softcap, sinks)
        if mask_slot and torch.compiler.is_compiling():   # the plan, prepared while tracing (`ensure_plan`); its
            sizes = (guard_scalar(size) for t in (q, k, v) for size in t.shape)  # shapes specialise, as the lengths do
            self._trace_time_calls.ensure_plan(mask_slot, backend, q.dtype, mask.q_offset, str(q.device), *sizes)
        return torch.ops.sparsify.block_sparse_attention(
            q, k, v, head_mask, mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
            mask.full_kv_indices, mask.kv_head_index, mask.block_size, mask.q_len, mask.k_len, mask.causal,
            mask.q_offset, mask.per_input, scale, softcap, sinks, backend, self._site_handle, mask_slot)

    def _cached_mask(self, slot: str, q: torch.Tensor, k: torch.Tensor, q_offset: int) -> RuntimeBlockMask:
        """The site's static mask of ``slot`` for this call's lengths; a dict read dynamo guards on under compile."""
        # Masks are per length: symbolic lengths (dynamic shapes) specialise here, with a guard on their values.
        lengths = (guard_scalar(q.shape[2]), guard_scalar(k.shape[2]), guard_scalar(q_offset))
        self._trace_time_calls.ensure_mask(slot, *lengths, str(q.device))
        return self._masks[_mask_key(slot, *lengths, str(q.device))]

    # --- forward ----------------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, scale: float | None, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(q, k, v, attn_mask, scale, is_causal=is_causal, softcap=softcap, sinks=sinks)

    def in_dense_steps(self) -> bool:
        """Whether the site runs dense now because of its dense warm-up steps.

        The step counter's ``dense_phase`` (``dense_steps -> bool``, kept up to date outside a
        compiled graph by `StepCounter` and the diffusers door's tracker) is read, so a compiled
        model guards on one bool per site instead of on the step; a counter without it is read as an int.
        """
        if not self.dense_steps or self.step_counter is None:
            return False
        phases = getattr(self.step_counter, "dense_phase", None)
        if phases is not None and self.dense_steps in phases:
            return bool(phases[self.dense_steps])
        return self.step_counter.step < self.dense_steps

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               scale: float | None = None, *, is_causal: bool = False, q_offset: int = 0,
               softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the site for one call: ``q`` ``[B, H, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]``.

        ``q_offset`` places query ``i`` at absolute position ``q_offset + i`` (decode steps and
        prefill chunks against a cache: ``k_len - q_len``); causal masking, of dense heads too,
        follows it. The result has the layout of ``q``. The same code runs eagerly and under
        ``torch.compile`` (no graph break, except one for the estimator of input-adaptive heads).
        """
        dense_only = (self.sparse_heads.numel() == 0 and self.skipped_heads.numel() == 0
                      and self.adaptive_heads.numel() == 0)
        if dense_only or self.in_dense_steps():
            return _dense(q, k, v, attn_mask, is_causal, scale, q_offset, softcap, sinks)
        attn_mask = self.checked_call(q, k, attn_mask, is_causal)
        calls = self._trace_time_calls
        if self.one_group:
            return self._one_group_attend(q, k, v, attn_mask, scale, q_offset, softcap, sinks)
        output = q.new_empty((*q.shape[:-1], v.shape[-1]))
        if self.skipped_heads.numel():
            output.index_fill_(1, self.skipped_heads, 0)  # a skipped head contributes nothing
        if self.dense_and_sparse_only:
            # Dense heads that the site's backend runs faster than SDPA (by the cost model) join the sparse heads
            # in one launch over every head: no head gather, no scatter of the output.
            backend = calls.backend_name(q.dtype, q.device, _mask_layout(attn_mask))
            if backend and calls.dense_backend_name(q.dtype, q.device, is_causal, _mask_layout(attn_mask)) == backend:
                mask = self._cached_mask("every", q, k, q_offset)
                return self._kernel("every", backend, None, mask, q, k, v, attn_mask, scale, softcap, sinks).to(q.dtype)
        if self.dense_heads.numel():
            heads = self.dense_heads
            dense_mask = _select_heads(attn_mask, heads)
            backend = calls.dense_backend_name(q.dtype, q.device, is_causal, _mask_layout(dense_mask))
            if backend:  # the site's backend runs dense heads faster than SDPA (by the cost model): a full mask
                mask = self._cached_mask("dense", q, k, q_offset)
                dense_out = self._kernel("dense", backend, heads, mask, q, k, v, dense_mask, scale, softcap, sinks)
            else:
                dense_out = _dense(q.index_select(1, heads), k.index_select(1, self.dense_kv_heads),
                                   v.index_select(1, self.dense_kv_heads), dense_mask, is_causal, scale, q_offset,
                                   softcap, sinks.index_select(0, heads) if sinks is not None else None)
            output.index_copy_(1, heads, dense_out.to(output.dtype))
        if self.sparse_heads.numel():
            heads = self.sparse_heads
            head_mask = _select_heads(attn_mask, heads)
            backend = calls.backend_name(q.dtype, q.device, _mask_layout(head_mask))
            mask = self._cached_mask("sparse", q, k, q_offset)
            output.index_copy_(1, heads, self._kernel("sparse", backend, heads, mask, q, k, v, head_mask, scale,
                                                      softcap, sinks).to(output.dtype))
        if self.adaptive_heads.numel():
            heads = self.adaptive_heads
            head_mask = _select_heads(attn_mask, heads)
            mask = estimate_adaptive_mask(self, q.index_select(1, heads), k, head_mask, q_offset, scale)
            backend = calls.backend_name(q.dtype, q.device, _mask_layout(head_mask))
            output.index_copy_(1, heads, self._kernel("", backend, heads, mask, q, k, v, head_mask, scale, softcap,
                                                      sinks).to(output.dtype))
        return output

    def _one_group_attend(self, q, k, v, attn_mask, scale, q_offset, softcap, sinks) -> torch.Tensor:
        """`attend` when every head is sparse, or every head adaptive: one kernel call on the whole query."""
        backend = self._trace_time_calls.backend_name(q.dtype, q.device, _mask_layout(attn_mask))
        if self.sparse_heads.numel():
            heads, slot, mask = self.sparse_heads, "sparse", self._cached_mask("sparse", q, k, q_offset)
        else:
            heads, slot = self.adaptive_heads, ""
            mask = estimate_adaptive_mask(self, q, k, attn_mask, q_offset, scale)
        return self._kernel(slot, backend, heads, mask, q, k, v, attn_mask, scale, softcap, sinks).to(q.dtype)

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


class TraceTimeCalls:
    """A site's calls that dynamo runs while it traces, their results graph constants: one set per `SparseAttention`.

    ``torch.compiler.assume_constant_result`` needs arguments dynamo can turn into Python
    constants, and torch 2.11 cannot do that for a module; so each site gets plain functions
    closed over a weak reference to it, called with slots, lengths, dtypes and devices only. The
    site makes them at construction and again when it is copied (``copy.deepcopy`` or
    unpickling), so a copy never reaches the original's caches. Eager calls run them directly.

    Example:
        >>> calls = TraceTimeCalls(layer)                                        # doctest: +SKIP
        >>> calls.backend_name(torch.bfloat16, torch.device("cuda:0"), None)    # doctest: +SKIP
        'fa4'
    """

    def __init__(self, layer: SparseAttention):
        owner = weakref.ref(layer)

        @torch.compiler.assume_constant_result
        def ensure_mask(slot: str, q_len: int, k_len: int, q_offset: int, device: str) -> bool:
            owner().ensure_mask(slot, q_len, k_len, q_offset, device)
            return True

        @torch.compiler.assume_constant_result
        def ensure_plan(slot: str, backend: str, dtype: torch.dtype, q_offset: int, device: str,
                        q0: int, q1: int, q2: int, q3: int, k0: int, k1: int, k2: int, k3: int,
                        v0: int, v1: int, v2: int, v3: int) -> bool:   # shapes as ints: dynamo takes no tuples here
            owner().ensure_plan(slot, backend, (q0, q1, q2, q3), (k0, k1, k2, k3), (v0, v1, v2, v3), dtype,
                                q_offset, device)
            return True

        @torch.compiler.assume_constant_result
        def backend_name(dtype: torch.dtype, device: torch.device, mask_layout: tuple | None) -> str:
            return owner().backend_name(dtype, device, mask_layout)

        @torch.compiler.assume_constant_result
        def dense_backend_name(dtype: torch.dtype, device: torch.device, is_causal: bool,
                               mask_layout: tuple | None) -> str:
            return owner().dense_backend_name(dtype, device, is_causal, mask_layout)

        self.ensure_mask = ensure_mask
        self.ensure_plan = ensure_plan
        self.backend_name = backend_name
        self.dense_backend_name = dense_backend_name


@torch.compiler.disable
def estimate_adaptive_mask(layer: SparseAttention, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                           q_offset: int, scale: float | None) -> RuntimeBlockMask:
    """The per-input mask of ``layer``'s adaptive heads for this call (outside a compiled graph: one break).

    The estimators are device work, but not all of them trace (e.g. the vertical-slash estimator
    reads its probe size from a tensor), so they run eagerly. Their kernel call is in the graph.
    """
    mask = layer.adaptive_source.mask(q, k, attn_mask=attn_mask, q_offset=int(q_offset), scale=scale)
    if layer.adaptive_density_log is not None:
        layer.adaptive_density_log.append(mask.kept_counts().float().mean((0, 2)) / mask.k_blocks)
    return mask


def _mask_key(slot: str, q_len: int, k_len: int, q_offset: int, device: str) -> tuple:
    """The key of a cached static mask: the sparse heads' by lengths; the dense heads' full mask (``"dense"``) and
    every head's (``"every"``: sparse heads' patterns, dense heads full) prefixed with their slot."""
    return (q_len, k_len, q_offset, device) if slot == "sparse" else (slot, q_len, k_len, q_offset, device)


def _mask_layout(mask: torch.Tensor | None) -> tuple | None:
    """``(shape, stride, dtype)`` of a user mask, as host ints (what the backend choice depends on), or ``None``."""
    if mask is None:
        return None
    return tuple(int(s) for s in mask.shape), tuple(int(s) for s in mask.stride()), mask.dtype


def _mask_probe(layout: tuple) -> torch.Tensor:
    shape, stride, dtype = layout
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


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
