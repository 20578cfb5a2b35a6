"""The diffusers door: a strategy runs inside a diffusers model (and so its pipelines) through attention processors.

`attach_diffusers` makes a copy of the model that shares every parameter and buffer, gives each
attention module of the copy that the strategy names its `SparseAttention` as a child module,
and installs, with the module's own ``set_processor`` (diffusers' processor extension point), a
`SparseAttentionProcessor` that wraps the module's processor. The wrapper runs that processor as it is — its projections,
norms, rotary embeddings, masks, the dispatch to PyTorch's native SDPA — inside a
``TorchFunctionMode`` (PyTorch's documented override mechanism, active for that one call only)
that routes its ``scaled_dot_product_attention`` call to the site. No diffusers class or function
is patched and no per-model code is needed; the user's model keeps its processors.

Dense warm-up steps (``dense_steps`` of a site) are keyed by the pipeline's denoising step: a
`DenoisingStepTracker` reads the ``timestep`` every call receives (a forward pre-hook of the
copy), counts a step each time the timestep changes and starts over when it rises (a new
generation). Classifier-free guidance run as one doubled batch or as two calls per step counts
once per step either way.

Calibration through a pipeline: `pipeline_forward_loop` turns pipeline calls into the
``forward_loop(model)`` that `sparsify.compile` takes.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sparsify.errors import UnsupportedError
from sparsify.integrations.common import (
    WrappingProcessor,
    processor_class_for,
    RUNTIME_ATTRIBUTE,
    build_runtime,
    check_call_shapes,
    check_fingerprints,
    install_runtime,
    load_strategy,
    match_sites,
    shared_weight_copy,
)
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)

__all__ = ["DenoisingStepTracker", "SparseAttentionProcessor", "attach_diffusers", "pipeline_forward_loop"]

_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


class _RouteAttention(TorchFunctionMode):
    """Routes the ``scaled_dot_product_attention`` of one processor call to a site; everything else runs as is.

    A processor that calls it a second time in one call (e.g. an IP-Adapter's attention over
    image keys) is refused: the strategy holds one site per module (graph capture of the model
    found one attention there), so the second would run with no strategy of its own.
    """

    def __init__(self, runtime: SparseAttention, processor: Any):
        super().__init__()
        self.runtime = runtime
        self.processor = processor
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            name = getattr(func, "__name__", "")
            if args and isinstance(args[0], torch.Tensor) and getattr(torch.Tensor, name, None) is func:
                # A tensor method: called as one, which dynamo records directly (calling `func` would make it
                # trace the Python body of e.g. Tensor.unflatten, whose super() call it cannot follow).
                return getattr(args[0], name)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 1:
            raise UnsupportedError(
                f"site {self.runtime.site.name!r}: its processor {type(self.processor).__name__} calls "
                f"scaled_dot_product_attention more than once per call (e.g. an IP-Adapter's attention over image "
                f"keys), but the strategy has one site for this module, searched where it attended once; the "
                f"diffusers door runs one attention per module. Search the strategy on the model as it runs now and "
                f"apply it with sparsify.compile (the graph door gives every attention its own site), or remove "
                f"the extra attention (e.g. unload the IP-Adapter)")
        call = dict(_SDPA_DEFAULTS)
        call.update(zip(_SDPA_PARAMETERS, args))
        call.update(kwargs)
        runtime = self.runtime
        if call["dropout_p"]:
            raise UnsupportedError(f"site {runtime.site.name!r}: attention dropout ({call['dropout_p']}) is not "
                                   f"supported by sparse attention; call model.eval()")
        query, key, value = call["query"], call["key"], call["value"]
        check_call_shapes(runtime, query, key, framework="diffusers")
        return runtime.attend(query, key, value, call["attn_mask"], call["scale"], is_causal=bool(call["is_causal"]))


class SparseAttentionProcessor(WrappingProcessor):
    """A diffusers attention processor: the module's own processor, its attention on the module's sparse site.

    Construct it with `processor_for`, which gives the wrapper the call signature of the
    processor it wraps (diffusers' ``Attention.forward`` passes a processor only the keyword
    arguments its ``__call__`` declares).

    Example:
        >>> processor = SparseAttentionProcessor.processor_for(module.processor)     # doctest: +SKIP
    """

    def __init__(self, inner: Any):
        self.inner = inner

    @classmethod
    def processor_for(cls, inner: Any) -> "SparseAttentionProcessor":
        """A wrapper of ``inner`` whose ``__call__`` has ``inner.__call__``'s signature."""
        return processor_class_for(SparseAttentionProcessor, type(inner), "Sparse")(inner)

    def __reduce__(self):
        return (SparseAttentionProcessor.processor_for, (self.inner,))

    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, *args, **kwargs)

    def _run(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime = attn._modules.get(RUNTIME_ATTRIBUTE)
        if runtime is None:
            return self.inner(attn, *args, **kwargs)
        route = _RouteAttention(runtime, self.inner)
        with route:
            output = self.inner(attn, *args, **kwargs)
        if route.calls == 0:
            raise UnsupportedError(
                f"site {runtime.site.name!r}: its processor {type(self.inner).__name__} computed attention without "
                f"torch's scaled_dot_product_attention (another attention backend is set, e.g. with "
                f"set_attention_backend, or context parallelism is on), so the strategy cannot run there; use the "
                f"native backend (model.reset_attention_backend())")
        return output


class DenoisingStepTracker:
    """The denoising step a diffusers model is at, from the timesteps a pipeline calls it with.

    ``observe(timestep)`` runs before each call: the step advances when the timestep changes and
    starts over at 0 when it rises (a new generation: schedules run from high to low noise), so
    the two calls of guidance done in two passes count as one step. ``dense_phase`` maps each
    site's ``dense_steps`` to whether the current step is one of them (what a compiled graph
    guards on: one extra variant, not one per step).

    Example:
        >>> tracker = DenoisingStepTracker([2])
        >>> for t in (999, 999, 500, 500, 10, 999):
        ...     tracker.observe(t)
        >>> tracker.step, tracker.dense_phase
        (0, {2: True})
    """

    def __init__(self, dense_steps: Any = ()):
        self.dense_phase: dict[int, bool] = {int(d): True for d in dense_steps if d}
        self.step = 0
        self._last: float | None = None

    def register(self, dense_steps: int) -> None:
        """A site keeps its first ``dense_steps`` denoising steps dense: keep ``dense_phase[dense_steps]`` up to date."""
        if dense_steps:
            self.dense_phase[int(dense_steps)] = self.step < dense_steps

    def observe(self, timestep: Any) -> None:
        """Account for one model call at ``timestep`` (a number or a tensor; its largest value counts)."""
        if isinstance(timestep, torch.Tensor):
            value = float(timestep.detach().max())
        else:
            value = float(timestep)
        if self._last is None or value > self._last:
            self.step = 0
        elif value < self._last:
            self.step += 1
        self._last = value
        for dense_steps in self.dense_phase:
            self.dense_phase[dense_steps] = self.step < dense_steps

    def reset(self) -> None:
        """Start over: the next call is step 0."""
        self.step = 0
        self._last = None
        for dense_steps in self.dense_phase:
            self.dense_phase[dense_steps] = True


class _TimestepHook:
    """Forward pre-hook of the attached copy that hands each call's ``timestep`` to the tracker."""

    def __init__(self, tracker: DenoisingStepTracker, position: int | None, model_name: str):
        self.tracker = tracker
        self.position = position
        self.model_name = model_name

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif self.position is not None and len(args) > self.position:
            timestep = args[self.position]
        else:
            raise UnsupportedError(f"{self.model_name} was called without a timestep; the strategy keeps its first "
                                   f"denoising steps dense, which needs the step (pass timestep=...)")
        if timestep is not None:
            self.tracker.observe(timestep)


def _is_attention_module(module: torch.nn.Module) -> bool:
    """A diffusers attention module: it has a processor, set and read through its own methods."""
    return callable(getattr(module, "set_processor", None)) and callable(getattr(module, "get_processor", None))


def _module_readout(module: torch.nn.Module) -> dict[str, Any]:
    """What a diffusers attention module says about its shape (missing fields are checked on the first call)."""
    heads = getattr(module, "heads", None)
    inner = getattr(module, "inner_dim", None)
    readout: dict[str, Any] = {}
    if isinstance(heads, int) and heads > 0:
        readout["num_heads"] = heads
        if isinstance(inner, int) and inner % heads == 0:
            readout["head_dim"] = inner // heads
            kv_inner = getattr(module, "inner_kv_dim", None)
            if isinstance(kv_inner, int) and kv_inner % readout["head_dim"] == 0:
                readout["num_kv_heads"] = kv_inner // readout["head_dim"]
    if isinstance(getattr(module, "is_causal", None), bool):
        readout["causal"] = module.is_causal
    if isinstance(getattr(module, "is_cross_attention", None), bool):
        readout["kind"] = "cross" if module.is_cross_attention else "self"
    return readout


def attach_diffusers(model: torch.nn.Module, strategy: Strategy | str, *, backend: str = "auto",
                     cost_model: Any = None) -> torch.nn.Module:
    """A copy of ``model`` (a diffusers ``ModelMixin``) whose attention processors run ``strategy``.

    The copy shares every parameter and buffer with ``model``; ``model`` keeps its processors.
    Use `sparsify.attach`, which picks this door for diffusers models:
    ``pipe.transformer = sparsify.attach(pipe.transformer, strategy)``.

    Example:
        >>> pipe.transformer = attach_diffusers(pipe.transformer, "strategy.json")   # doctest: +SKIP
        >>> frames = pipe(prompt_embeds=embeds, num_inference_steps=30).frames       # doctest: +SKIP
    """
    modules = dict(model.named_modules())
    attention_modules = [path for path, module in modules.items() if _is_attention_module(module)]
    if not attention_modules:
        raise UnsupportedError(f"{type(model).__name__} has no diffusers attention modules (modules with "
                               f"get_processor / set_processor); use the graph door: sparsify.compile(model, "
                               f"strategy=..., example_inputs=...)")
    strategy, source = load_strategy(strategy)
    mapping = match_sites(strategy, attention_modules, source=source, framework="diffusers")
    check_fingerprints(strategy, mapping, {name: _module_readout(modules[path]) for name, path in mapping.items()},
                       source=source)
    if backend != "auto":
        from sparsify.backends import get_backend

        get_backend(backend)
    dense_steps = {site.dense_steps for site in strategy.sites.values() if site.dense_steps}
    tracker = DenoisingStepTracker() if dense_steps else None       # the sites register their dense_steps
    runtimes = {name: build_runtime(strategy, name, index, backend=backend, step_counter=tracker,
                                    cost_model=cost_model)
                for index, name in enumerate(mapping)}

    attached = shared_weight_copy(model)
    copied = dict(attached.named_modules())
    for name, runtime in runtimes.items():
        if runtime is None:
            continue
        module = copied[mapping[name]]
        install_runtime(module, runtime)
        module.set_processor(SparseAttentionProcessor.processor_for(module.get_processor()))
    if tracker is not None:
        attached.register_forward_pre_hook(_TimestepHook(tracker, _timestep_position(attached),
                                                         type(model).__name__), with_kwargs=True)
    sparse = sum(runtime is not None for runtime in runtimes.values())
    logger.info("attached %s to %s: %d of %d sites run sparse%s", source, type(model).__name__, sparse, len(runtimes),
                f", dense steps {sorted(dense_steps)} keyed by the timestep" if dense_steps else "")
    return attached


def step_tracker(model: torch.nn.Module) -> DenoisingStepTracker | None:
    """The `DenoisingStepTracker` of an attached diffusers model (``None`` without dense warm-up steps).

    Example:
        >>> step_tracker(pipe.transformer).reset()          # doctest: +SKIP
    """
    for module in model.modules():
        runtime = module._modules.get(RUNTIME_ATTRIBUTE)
        if isinstance(runtime, SparseAttention) and isinstance(runtime.step_counter, DenoisingStepTracker):
            return runtime.step_counter
    return None


def _timestep_position(model: torch.nn.Module) -> int | None:
    """Index of ``timestep`` among the positional parameters of ``model.forward`` (``None`` if it has none)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index("timestep") if "timestep" in positional else None


def pipeline_forward_loop(pipeline: Any, calls: list[Mapping[str, Any]] | Mapping[str, Any], *,
                          component: str = "transformer") -> Callable[[torch.nn.Module], None]:
    """A ``forward_loop(model)`` for `sparsify.compile` that runs ``pipeline`` with ``model`` as its ``component``.

    ``calls`` holds the keyword arguments of each pipeline call (a few denoising steps each is
    enough to calibrate). During the loop the pipeline's component is the model sparsify passes
    in; it is put back afterwards, also when a call fails.

    Example:
        >>> loop = pipeline_forward_loop(pipe, [dict(prompt_embeds=e, num_inference_steps=4) for e in embeds])
        ...                                                                      # doctest: +SKIP
        >>> compiled = sparsify.compile(pipe.transformer, loop, max_error=0.05)   # doctest: +SKIP
    """
    if isinstance(calls, Mapping):
        calls = [calls]
    calls = [dict(call) for call in calls]
    if not calls:
        raise UnsupportedError("pipeline_forward_loop needs at least one pipeline call")
    if not hasattr(pipeline, component):
        raise UnsupportedError(f"{type(pipeline).__name__} has no component {component!r}")

    def forward_loop(model: torch.nn.Module) -> None:
        original = getattr(pipeline, component)
        setattr(pipeline, component, model)
        try:
            for call in calls:
                pipeline(**call)
        finally:
            setattr(pipeline, component, original)

    return forward_loop
