"""The Python front door: `find_attention`, `compile` and the `SparsifiedModule` it returns."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from sparsify.capture import Captured, FoundSites, capture, eval_mode, normalize_inputs
from sparsify.cost import CostModel
from sparsify.distributed import CalibrationGroup, calibration_group
from sparsify.errors import InputError, SparsifyError, StrategyError
from sparsify.passes.find_attention import FindAttention
from sparsify.passes.infra import SITE_META_KEY, PassManager, attention_nodes
from sparsify.passes.rewrite import RewriteAttention, StepCounter
from sparsify.site import AttentionSite
from sparsify.search import DEFAULT_MAX_ERROR, SearchConfig, SearchResult, collect_batches, search
from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)


def capture_attention(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True) -> tuple[Captured, list[AttentionSite]]:
    """Capture ``model`` and canonicalise its attentions; returns the capture and its sites.

    ``example_inputs`` may be the `FoundSites` of an earlier `find_attention` on this model:
    its graph is then reused (a copy) instead of capturing again.
    """
    if isinstance(example_inputs, FoundSites):
        return example_inputs.reuse_for(model, dynamic), list(example_inputs)
    captured = capture(model, example_inputs, dynamic=dynamic)
    finder = FindAttention((captured.args, captured.kwargs), root=model)
    PassManager([finder]).run(captured.graph_module)
    sites = [node.meta[SITE_META_KEY] for node in attention_nodes(captured.graph_module)]
    return captured, sites


def find_attention(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True) -> FoundSites:
    """Every attention of ``model`` as an `AttentionSite`, in graph order.

    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword
    arguments — the same convention as calibration batches. Raises `NoAttentionFoundError` when
    the model has no attention sparsify recognises and `CaptureError` when it cannot be captured.
    The returned list (a `FoundSites`) holds the captured graph: give it to `compile` as
    ``example_inputs`` to skip a second capture.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True)
        >>> [site.name for site in find_attention(layer, (torch.randn(2, 16, 32),))]
        ['self_attn']
    """
    captured, sites = capture_attention(model, example_inputs, dynamic=dynamic)
    inputs = example_inputs.inputs if isinstance(example_inputs, FoundSites) else normalize_inputs(example_inputs)
    return FoundSites(sites, captured, model, inputs, dynamic)


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
                 fixed_kwargs: dict[str, Any], rewritten_sites: int, step_counter: StepCounter | None = None):
        super().__init__()
        self.step_counter = step_counter or StepCounter()
        self.graph_module = graph_module
        self.strategy = strategy
        self.sites = sites
        self.fixed_kwargs = dict(fixed_kwargs)
        self.rewritten_sites = rewritten_sites
        self.captured_signature = ""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, value in self.fixed_kwargs.items():
            if name not in kwargs:
                kwargs[name] = value
            elif kwargs[name] != value:
                raise SparsifyError(
                    f"this module was compiled with {name}={value!r}; it cannot be called with {name}={kwargs[name]!r}"
                )
        try:
            return self.graph_module(*args, **kwargs)
        except (AssertionError, ValueError, TypeError, RuntimeError) as error:
            text = str(error)
            if any(sign in text for sign in ("Guard failed", "keyword mismatch", "tree spec", "pytree")):
                raise InputError(
                    f"the compiled module was captured for calls like the example inputs ({self.captured_signature}); "
                    f"got {_describe_call(args, kwargs)}. Compile with example inputs of the form you will call "
                    f"it with ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                ) from error
            raise
        finally:
            self.step_counter.advance()

    def train(self, mode: bool = True) -> "SparsifiedModule":
        """Set the training flag; the captured graph always computes in inference mode."""
        self.training = mode
        return self

    def reset_steps(self) -> None:
        """Start a new generation: the next call is step 0 (strategies with ``dense_steps``)."""
        self.step_counter.reset()

    def report(self) -> str:
        """A table per site: heads, chosen patterns, density, measured error, estimated speedup."""
        from sparsify.report import strategy_table

        return strategy_table(self.strategy)


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module,
    calib_loader: Iterable[Any] | Callable[[torch.nn.Module], None] | None = None,
    *,
    strategy: Strategy | str | os.PathLike | None = None,
    example_inputs: Any = None,
    backend: str = "auto",
    max_error: float = DEFAULT_MAX_ERROR,
    target_density: float | None = None,
    target_speedup: float | None = None,
    block_size: int | None = None,
    dense_steps: int = 0,
    steps_per_generation: int | None = None,
    min_recall: float = 0.7,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    adaptive: bool = True,
    cost_model: CostModel | None = None,
    progress: bool = True,
    dynamic: bool = True,
    process_group: Any = None,
) -> SparsifiedModule:
    """Compile ``model`` so that its attentions run block-sparse.

    Two ways in:

    * ``compile(model, calib_loader, max_error=...)`` profiles the calibration data, searches
      per site and head the cheapest pattern within ``max_error`` (relative L2 error of each
      site's output against dense) and rewrites the graph;
    * ``compile(model, strategy="strategy.json", example_inputs=...)`` applies a saved strategy
      without data.

    Args:
        model: any ``nn.Module``; it is not modified (the result shares its weights).
        calib_loader: an iterable of batches (a tensor, a tuple of positional arguments or a
            dict of keyword arguments each), or a ``forward_loop(model)`` callable that runs
            the model on calibration data.
        strategy: a `Strategy` or the path of a strategy JSON file.
        example_inputs: inputs to capture the graph with (defaults to the first batch), or the
            result of ``find_attention(model, ...)``, whose captured graph is then reused.
        backend: ``"auto"`` (fastest available per site and device) or a backend name.
        max_error: per-site output error budget in [0, 1); 0 keeps everything dense.
        target_density / target_speedup: optional global target, allocated over heads.
        block_size: block edge in tokens (default 64 on CPU, 128 on GPU).
        dense_steps: leading forward calls of each generation (diffusion steps) that stay dense;
            calibration calls of those steps are not profiled.
        steps_per_generation: forward calls per generation (diffusion steps); the step count
            wraps after it. Without it, call ``compiled.reset_steps()`` between generations.
        min_recall: candidates keeping less attention mass on the profile are not scored.
        holdout_fraction: share of batches held out to score candidates and check the result.
        cost_model: a `CostModel` (default: analytic constants plus shipped hardware profiles).
        adaptive: also consider input-adaptive patterns (masks estimated per input on the device);
            ``False`` keeps every chosen pattern static (required for ONNX export).
        progress: show tqdm progress bars.
        dynamic: capture with dynamic batch and sequence dimensions.
        process_group: data-parallel calibration. When ``torch.distributed`` is initialised,
            every rank calls ``compile`` with its own shard of the calibration data; the
            statistics are summed over the default group (or this ``torch.distributed``
            process group) and every rank gets the strategy one process would find on the
            rank-major concatenation of the shards. ``False`` calibrates on this rank's data
            alone. See `sparsify.distributed`.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True)
        >>> x = torch.randn(1, 256, 64)
        >>> sites = find_attention(layer, (x,))
        >>> compiled = compile(layer, strategy=Strategy.dense(sites), example_inputs=(x,))
        >>> torch.allclose(compiled(x), layer.eval()(x), atol=1e-5)
        True
    """
    if strategy is not None:
        return _apply_strategy(model, strategy, calib_loader, example_inputs, backend, dynamic, steps_per_generation)
    if calib_loader is None:
        raise SparsifyError(
            "sparsify.compile needs calibration data to search a strategy (compile(model, calib_loader)), or a "
            "saved strategy (compile(model, strategy='strategy.json', example_inputs=...))"
        )
    config = SearchConfig(max_error=max_error, target_density=target_density, target_speedup=target_speedup,
                          block_size=block_size, min_recall=min_recall, holdout_fraction=holdout_fraction,
                          backend=backend, dense_steps=dense_steps, steps_per_generation=steps_per_generation, seed=seed,
                          adaptive=adaptive)
    result = search_model(model, calib_loader, config, example_inputs=example_inputs, cost_model=cost_model,
                          progress=progress, dynamic=dynamic, process_group=process_group)
    return result.compiled


@dataclasses.dataclass
class ModelSearchResult:
    """`search_model`'s output: the compiled module and everything the search measured."""

    compiled: "SparsifiedModule"
    search: SearchResult


def search_model(model: torch.nn.Module, calib_loader: Any, config: SearchConfig, *, example_inputs: Any = None,
                 cost_model: CostModel | None = None, progress: bool = True, dynamic: bool = True,
                 process_group: Any = None) -> ModelSearchResult:
    """Capture, profile, search and rewrite; measures the end-to-end error on held-out batches.

    Under ``torch.distributed`` (see ``compile``'s ``process_group``), an error on any rank
    makes every rank raise `sparsify.distributed.DistributedCalibrationError` naming it.

    Example:
        >>> result = search_model(model, batches, SearchConfig(max_error=0.05))   # doctest: +SKIP
        >>> result.compiled.strategy.summary()["mean_density"]                    # doctest: +SKIP
    """
    group = calibration_group(process_group)
    with group.guard("calibration"):
        return _search_model(model, calib_loader, config, example_inputs, cost_model, progress, dynamic, group)


def _search_model(model: torch.nn.Module, calib_loader: Any, config: SearchConfig, example_inputs: Any,
                  cost_model: CostModel | None, progress: bool, dynamic: bool,
                  group: CalibrationGroup) -> ModelSearchResult:
    batches = collect_batches(model, calib_loader)
    if example_inputs is not None:
        example_args, example_kwargs = (example_inputs.inputs if isinstance(example_inputs, FoundSites)
                                        else normalize_inputs(example_inputs))
        batch_args, batch_kwargs = batches[0]
        if len(example_args) != len(batch_args) or sorted(example_kwargs) != sorted(batch_kwargs):
            raise InputError(
                f"example_inputs {_describe_call(example_args, example_kwargs)} and the calibration batches "
                f"{_describe_call(batch_args, batch_kwargs)} have different structures; give both in one form"
            )
    captured, sites = capture_attention(model, example_inputs if example_inputs is not None else batches[0],
                                        dynamic=dynamic)
    result = search(captured, sites, [_with_fixed(b, captured.fixed_kwargs) for b in batches], config,
                    cost_model=cost_model, progress=progress, process_group=group)
    counter = StepCounter(config.steps_per_generation)
    rewrite = RewriteAttention(result.strategy, backend=config.backend, source="search", step_counter=counter)
    rewritten = PassManager([rewrite]).run(captured.graph_module).graph_module
    compiled = SparsifiedModule(rewritten, result.strategy, sites, captured.fixed_kwargs, rewrite.rewritten, counter)
    compiled.captured_signature = _describe_call(captured.args, captured.kwargs)
    error = end_to_end_error(compiled, model, result.held_out, steps=result.held_out_steps, process_group=group)
    metadata = dict(result.strategy.metadata, end_to_end_error=round(error, 6))
    compiled.strategy = dataclasses.replace(result.strategy, metadata=metadata)
    result.strategy = compiled.strategy
    logger.info("search done: %s; end-to-end relative error %.3e", compiled.strategy.summary(), error)
    return ModelSearchResult(compiled, result)


def end_to_end_error(compiled: torch.nn.Module, model: torch.nn.Module, batches: Sequence[tuple[tuple, dict]],
                     steps: Sequence[int] | None = None, process_group: Any = False) -> float:
    """Relative L2 error of the first output tensor of ``compiled`` against ``model`` over ``batches``.

    ``steps`` gives each batch's generation step (for strategies with ``dense_steps``); the
    compiled module's step count is restored afterwards. ``process_group`` (as for
    `sparsify.distributed.calibration_group`; default ``False``: this process's batches only)
    sums the errors over every rank's batches.
    """
    squared = reference = 0.0
    counter = getattr(compiled, "step_counter", None)
    saved = counter.step if counter is not None else 0
    # The reference runs in eval mode, as the captured graph does (dropout off).
    with torch.no_grad(), eval_mode(model):
        for index, (args, kwargs) in enumerate(batches):
            if counter is not None and steps:
                counter.step = steps[index]
            output = first_output_tensor(compiled(*args, **kwargs)).double()
            expected = first_output_tensor(model(*args, **kwargs)).double()
            squared += float((output - expected).pow(2).sum())
            reference += float(expected.pow(2).sum())
    if counter is not None:
        counter.step = saved
    squared, reference = calibration_group(process_group).sum_floats([squared, reference], "summing end-to-end errors")
    return math.sqrt(squared / max(reference, 1e-300))


def _with_fixed(batch: tuple[tuple, dict], fixed_kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    args, kwargs = batch
    return args, {**fixed_kwargs, **kwargs}


def _describe_call(args: tuple, kwargs: dict) -> str:
    def describe(value: Any) -> str:
        return f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__

    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def first_output_tensor(value: Any) -> torch.Tensor:
    """The first tensor of a model output: a tensor, tuple/list, dict or HF ``ModelOutput``."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value:
        return first_output_tensor(value[0])
    raise SparsifyError(f"the model's output holds no tensor to compare ({type(value).__name__})")


def _apply_strategy(model, strategy, calib_loader, example_inputs, backend, dynamic,
                    steps_per_generation=None) -> SparsifiedModule:
    source = "strategy"
    if isinstance(strategy, (str, os.PathLike)):
        source = os.fspath(strategy)
        strategy = Strategy.load(strategy)
    if not isinstance(strategy, Strategy):
        raise StrategyError(f"strategy must be a Strategy or a path, got {type(strategy).__name__}")
    if example_inputs is None:
        if calib_loader is None:
            raise SparsifyError("compile needs example_inputs (or a calib_loader whose first batch serves) to capture the model")
        args, kwargs = collect_batches(model, calib_loader)[0]
        example_inputs = (args, kwargs)
    captured, _ = capture_attention(model, example_inputs, dynamic=dynamic)
    counter = StepCounter(steps_per_generation or strategy.metadata.get("steps_per_generation"))
    rewrite = RewriteAttention(strategy, backend=backend, source=source, step_counter=counter)
    result = PassManager([rewrite]).run(captured.graph_module)
    sites = [node.meta[SITE_META_KEY] for node in result.graph_module.graph.nodes if SITE_META_KEY in node.meta]
    compiled = SparsifiedModule(result.graph_module, strategy, sites, captured.fixed_kwargs, rewrite.rewritten, counter)
    compiled.captured_signature = _describe_call(captured.args, captured.kwargs)
    return compiled


__all__ = ["SparsifiedModule", "capture_attention", "compile", "find_attention", "normalize_inputs"]
