"""The Python front door: `find_attention`, `compile` and the `SparsifiedModule` it returns."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from sparsify.capture import Captured, FoundSites, capture, eval_mode, flat_graph_inputs, normalize_inputs
from sparsify.cost import CostModel
from sparsify.distributed import CalibrationGroup, calibration_group
from sparsify.errors import InputError, SparsifyError, StrategyError, UnsupportedError
from sparsify.options import CompileOptions
from sparsify.passes.find_attention import FindAttention
from sparsify.passes.infra import SITE_META_KEY, PassManager, PassResult, attention_nodes
from sparsify.passes.rewrite import RewriteAttention, StepCounter
from sparsify.site import AttentionSite
from sparsify.search import SearchResult, collect_batches, search
from sparsify.output_metrics import first_output_tensor
from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)

# Options that only shape a search; applying a saved strategy has nothing for them to do.
_SEARCH_ONLY_OPTIONS = ("max_output_error", "output_metric", "max_error", "target_density", "target_speedup",
                        "target_overrides_max_error", "block_size",
                        "dense_steps", "min_recall", "holdout_fraction", "seed", "profile_rows_per_block",
                        "score_rows_per_block", "hardware_profiles", "adaptive", "price_for")


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

    The graph is the model's *inference* graph (captured in eval mode), so a compiled module
    starts in eval mode. ``train()`` sets the flag as usual; a call in training mode runs when
    the original model computes the same in both modes, and is refused with an explanation
    when it does not (dropout, batch-norm statistics) — it never silently drops dropout.

    Attributes:
        graph_module: the rewritten ``torch.fx.GraphModule``.
        strategy: the `Strategy` applied.
        sites: the attention sites, in graph order.
        rewritten_sites: how many sites run sparse attention.
        training_differs: whether the original model computes differently in training mode
            (measured at compile time on the example inputs).

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True)   # dropout 0.1
        >>> x = torch.randn(2, 64, 32)
        >>> compiled = compile(layer, strategy=Strategy.dense(find_attention(layer, (x,))), example_inputs=(x,))
        >>> compiled.training, compiled.training_differs
        (False, True)
    """

    def __init__(self, graph_module: torch.fx.GraphModule, strategy: Strategy, sites: list[AttentionSite],
                 fixed_kwargs: dict[str, Any], rewritten_sites: int, step_counter: StepCounter | None = None,
                 *, training_differs: bool = True, captured_signature: str = ""):
        super().__init__()
        self.step_counter = step_counter or StepCounter()
        self.graph_module = graph_module
        self.strategy = strategy
        self.sites = sites
        self.fixed_kwargs = dict(fixed_kwargs)
        self.rewritten_sites = rewritten_sites
        self.training_differs = training_differs
        self.captured_signature = captured_signature
        self.training = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and self.training_differs:
            raise SparsifyError(
                "this compiled module is in training mode, but it runs the model's inference graph (captured in "
                "eval mode, without dropout), and the original model computes differently in training mode "
                "(dropout or batch-norm statistics). Call compiled.eval() for inference; to train, train the "
                "original model and compile it again afterwards"
            )
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
            problem = input_mismatch(self.graph_module, args, kwargs)
            if problem is None and not any(sign in str(error) for sign in
                                           ("Guard failed", "keyword mismatch", "tree spec", "pytree")):
                raise
            # The message is ours; torch's own text stays on the chained exception (traceback).
            raise InputError(
                f"{problem or 'the call does not match the captured graph'}: the compiled module was captured for "
                f"calls like the example inputs {self.captured_signature}, got {_describe_call(args, kwargs)}. "
                f"Compile with example inputs of the form you will call it with"
            ) from error
        finally:
            self.step_counter.advance()

    def train(self, mode: bool = True) -> "SparsifiedModule":
        """Set the training flag (the captured graph has no mode of its own; see the class docstring)."""
        self.training = bool(mode)
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
    options: CompileOptions | None = None,
    cost_model: CostModel | None = None,
    process_group: Any = None,
    **option_values: Any,
) -> SparsifiedModule:
    """Compile ``model`` so that its attentions run block-sparse.

    Two ways in:

    * ``compile(model, calib_loader, max_output_error=...)`` profiles the calibration data,
      measures how much each site's error reaches the model's output, picks per site and head
      the cheapest patterns whose model-level error (``output_metric``: relative L2 of the
      output by default, or next-token KL, or a callable) stays within the budget, verifies
      the whole sparsified model on held-out batches and rewrites the graph (``max_error``
      alone: each site's output within it, as in earlier versions);
    * ``compile(model, strategy="strategy.json", example_inputs=...)`` applies a saved strategy
      without data.

    Every other keyword argument is an option of `sparsify.options.CompileOptions` — the one
    place their defaults and checks live (``backend``, ``max_output_error``, ``output_metric``,
    ``max_error``, ``target_density``,
    ``target_speedup``, ``target_overrides_max_error``, ``block_size``, ``dense_steps``,
    ``steps_per_generation``, ``min_recall``, ``holdout_fraction``, ``seed``,
    ``hardware_profiles``, ``progress``, ``dynamic``, ...); or pass a whole ``options`` object
    (keyword arguments then override its fields). Unknown names are refused, listing the known.

    Everything that can be checked without running the model is checked before calibration:
    the options, the backend (installed, available, serving every site's dtype and device) and
    every calibration batch against the captured graph (structure, fixed sizes, dtype, device).

    Args:
        model: any ``nn.Module``; it is not modified (the result shares its weights).
        calib_loader: an iterable of batches (a tensor, a tuple of positional arguments or a
            dict of keyword arguments each), or a ``forward_loop(model)`` callable that runs
            the model on calibration data.
        strategy: a `Strategy` or the path of a strategy JSON file.
        example_inputs: inputs to capture the graph with (defaults to the first batch), or the
            result of ``find_attention(model, ...)``, whose captured graph is then reused.
        options: a `CompileOptions`.
        cost_model: a `CostModel` (default: analytic constants plus shipped hardware profiles
            and the ``hardware_profiles`` option).
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
    options = CompileOptions.from_keywords(option_values, options)
    if strategy is not None:
        given = sorted(set(option_values) & set(_SEARCH_ONLY_OPTIONS))
        if given:
            raise SparsifyError(f"{', '.join(given)} shape a search and have no effect when a saved strategy is "
                                f"applied (strategy=...); leave them out, or search again without strategy=")
        return _apply_strategy(model, strategy, calib_loader, example_inputs, options)
    if calib_loader is None:
        raise SparsifyError(
            "sparsify.compile needs calibration data to search a strategy (compile(model, calib_loader)), or a "
            "saved strategy (compile(model, strategy='strategy.json', example_inputs=...))"
        )
    return search_model(model, calib_loader, options, example_inputs=example_inputs, cost_model=cost_model,
                        process_group=process_group).compiled


@dataclasses.dataclass
class ModelSearchResult:
    """`search_model`'s output: the compiled module and everything the search measured."""

    compiled: "SparsifiedModule"
    search: SearchResult


def search_model(model: torch.nn.Module, calib_loader: Any, options: CompileOptions | None = None, *,
                 example_inputs: Any = None, cost_model: CostModel | None = None, progress: bool | None = None,
                 dynamic: bool | None = None, process_group: Any = None) -> ModelSearchResult:
    """Capture, profile, search and rewrite; measures the end-to-end error on held-out batches.

    ``progress`` / ``dynamic``, when given, replace those fields of ``options``. Under
    ``torch.distributed`` (see ``compile``'s ``process_group``), an error on any rank makes
    every rank raise `sparsify.distributed.DistributedCalibrationError` naming it.

    Example:
        >>> result = search_model(model, batches, CompileOptions(max_error=0.05))     # doctest: +SKIP
        >>> result.compiled.strategy.summary()["mean_density"]                       # doctest: +SKIP
    """
    options = options or CompileOptions()
    overrides = {name: value for name, value in (("progress", progress), ("dynamic", dynamic)) if value is not None}
    options = dataclasses.replace(options, **overrides) if overrides else options
    group = calibration_group(process_group)
    with group.guard("calibration"):
        return _search_model(model, calib_loader, options, example_inputs, cost_model, group)


def _search_model(model: torch.nn.Module, calib_loader: Any, options: CompileOptions, example_inputs: Any,
                  cost_model: CostModel | None, group: CalibrationGroup) -> ModelSearchResult:
    check_backend_available(options.backend)
    cost_model = _cost_model_for(options, cost_model)
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
                                        dynamic=options.dynamic)
    batches = [_with_fixed(b, captured.fixed_kwargs) for b in batches]
    check_batches(captured.graph_module, batches, _describe_call(captured.args, captured.kwargs))
    check_backend_serves(options.backend, captured.graph_module)
    training_differs = training_changes_outputs(model, batches[0])
    result = search(captured, sites, batches, options, cost_model=cost_model, progress=options.progress,
                    process_group=group)
    counter = StepCounter(options.steps_per_generation)
    rewrite = RewriteAttention(result.strategy, backend=options.backend, source="search", step_counter=counter,
                               cost_model=cost_model, device=captured.device)
    rewritten = PassManager([rewrite]).run(captured.graph_module).graph_module
    compiled = SparsifiedModule(rewritten, result.strategy, sites, captured.fixed_kwargs, rewrite.rewritten, counter,
                                training_differs=training_differs,
                                captured_signature=_describe_call(captured.args, captured.kwargs))
    error = end_to_end_error(compiled, model, result.held_out, steps=result.held_out_steps,
                             ignored_positions=result.held_out_padding, process_group=group)
    metadata = dict(result.strategy.metadata, end_to_end_error=round(error, 6))
    compiled.strategy = dataclasses.replace(result.strategy, metadata=metadata)
    result.strategy = compiled.strategy
    logger.info("search done: %s; end-to-end relative error %.3e", compiled.strategy.summary(), error)
    return ModelSearchResult(compiled, result)


def end_to_end_error(compiled: torch.nn.Module, model: torch.nn.Module, batches: Sequence[tuple[tuple, dict]],
                     steps: Sequence[int] | None = None,
                     ignored_positions: Sequence[torch.Tensor | None] | None = None,
                     process_group: Any = False) -> float:
    """Relative L2 error of the first output tensor of ``compiled`` against ``model`` over ``batches``.

    ``steps`` gives each batch's generation step (for strategies with ``dense_steps``); the
    compiled module's step count is restored afterwards. ``process_group`` (as for
    `sparsify.distributed.calibration_group`; default ``False``: this process's batches only)
    sums the errors over every rank's batches. ``ignored_positions[i]`` (bool
    ``[batch, seq]``, True = padding) leaves those positions of batch ``i`` out when the output
    is ``[batch, seq, ...]``: padded query rows carry no meaning, so their error is not counted.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True).eval()
        >>> end_to_end_error(layer, layer, [((torch.randn(1, 8, 32),), {})])
        0.0
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
            difference = output - expected
            ignored = ignored_positions[index] if ignored_positions else None
            if ignored is not None and expected.dim() >= 2 and tuple(expected.shape[:2]) == tuple(ignored.shape):
                keep = (~ignored.to(expected.device)).to(expected.dtype).reshape(*ignored.shape, *[1] * (expected.dim() - 2))
                difference, expected = difference * keep, expected * keep
            squared += float(difference.pow(2).sum())
            reference += float(expected.pow(2).sum())
    if counter is not None:
        counter.step = saved
    squared, reference = calibration_group(process_group).sum_floats([squared, reference], "summing end-to-end errors")
    return math.sqrt(squared / max(reference, 1e-300))


# -- checks before calibration ------------------------------------------------------------------------

def check_backend_available(name: str) -> None:
    """Raise `UnsupportedError` unless backend ``name`` (or ``"auto"``) can run in this process.

    The message says what is missing and how to install it (the backend's ``install_hint``).

    Example:
        >>> check_backend_available("torch")
    """
    if name == "auto":
        return
    from sparsify.backends import get_backend

    backend = get_backend(name)  # unknown names: UnsupportedError listing the known ones
    reason = backend.availability()
    if reason is not None:
        hint = f" ({backend.install_hint})" if backend.install_hint else ""
        raise UnsupportedError(f"backend {name!r} is not available in this process: {reason}{hint}; use "
                               f"backend='auto' or 'torch'")


def check_backend_serves(name: str, graph_module: torch.fx.GraphModule) -> None:
    """Raise `UnsupportedError` naming the first site backend ``name`` cannot serve (dtype, device, shape)."""
    if name == "auto":
        return
    from sparsify.backends import get_backend

    backend = get_backend(name)
    for node in attention_nodes(graph_module):
        site = node.meta[SITE_META_KEY]
        query = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if not isinstance(query, torch.Tensor):
            continue
        reason = backend.unsupported_reason(site, query.dtype, query.device)
        if reason:
            raise UnsupportedError(f"backend {name!r} cannot serve site {site.name!r} ({query.dtype} on "
                                   f"{query.device.type}): {reason}; use backend='auto' or another backend")


def input_mismatch(graph_module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> str | None:
    """What about a call does not fit the captured graph (structure, fixed sizes, dtype, device), or ``None``.

    Sizes the capture made dynamic may vary; sizes it fixed, the number of dimensions, the dtype
    and the device must match what the graph was captured with.

    Example:
        >>> captured = capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
        >>> input_mismatch(captured.graph_module, (torch.randn(2, 5),), {})
        'input 0 (x): dimension 1 is 5, but the graph was captured with it fixed at 4'
    """
    try:
        values = flat_graph_inputs(graph_module, args, kwargs)
    except Exception:  # noqa: BLE001 - any failure to map the call onto the graph's inputs is a structure mismatch
        return "the arguments do not have the structure the graph was captured with (positional/keyword, nesting)"
    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    if len(values) != len(placeholders):
        return f"the call gives {len(values)} inputs, the graph takes {len(placeholders)}"
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    for position, (node, value) in enumerate(zip(placeholders, values)):
        expected = node.meta.get("val")
        where = f"input {position} ({node.target})"
        if not isinstance(expected, torch.Tensor):
            continue
        if not isinstance(value, torch.Tensor):
            return f"{where}: expected a tensor, got {type(value).__name__}"
        if value.dim() != expected.dim():
            return f"{where}: has {value.dim()} dimensions {tuple(value.shape)}, the graph was captured with {expected.dim()}"
        for dim, size in enumerate(expected.shape):
            if is_concrete_int(size) and int(size) != value.shape[dim]:
                return f"{where}: dimension {dim} is {value.shape[dim]}, but the graph was captured with it fixed at {int(size)}"
        if value.dtype != expected.dtype:
            return f"{where}: dtype {value.dtype}, but the graph was captured with {expected.dtype}"
        if value.device.type != expected.device.type:
            return f"{where}: on {value.device}, but the graph was captured on {expected.device}"
    return None


def check_batches(graph_module: torch.fx.GraphModule, batches: Sequence[tuple[tuple, dict]], captured_as: str) -> None:
    """Raise `InputError` naming the first calibration batch that does not fit the captured graph."""
    for index, (args, kwargs) in enumerate(batches):
        problem = input_mismatch(graph_module, args, kwargs)
        if problem is not None:
            raise InputError(f"calibration batch {index} {_describe_call(args, kwargs)}: {problem} (captured from "
                             f"{captured_as}). Give batches of the example's form; sizes other than batch and "
                             f"sequence length must match")


def training_changes_outputs(model: torch.nn.Module, batch: tuple[tuple, dict]) -> bool:
    """Whether ``model`` computes differently in training mode than in eval mode on ``batch``.

    Runs the model once in each mode without gradients, with the random generators forked (the
    caller's random streams are untouched) and every buffer restored afterwards (batch-norm
    statistics), so the model is left as it was. A model whose training-mode call fails counts
    as different.

    Example:
        >>> training_changes_outputs(torch.nn.Dropout(0.5), ((torch.ones(64),), {}))
        True
        >>> training_changes_outputs(torch.nn.Linear(4, 4), ((torch.ones(2, 4),), {}))
        False
    """
    args, kwargs = batch
    flags = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    devices = sorted({leaf.device.index for leaf in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.eval()
            expected = _tensor_leaves(model(*args, **kwargs))
            model.train()
            torch.manual_seed(12345)
            got = _tensor_leaves(model(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - a model that cannot run in training mode is treated as different
        logger.debug("training-mode call failed (%s): treating training mode as different", error)
        return True
    finally:
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    if len(expected) != len(got):
        return True
    for reference, output in zip(expected, got):
        if reference.shape != output.shape:
            return True
        if reference.is_floating_point() and reference.numel():
            scale = float(reference.double().abs().max())
            if float((output.double() - reference.double()).abs().max()) > 1e-6 * max(scale, 1e-30):
                return True
        elif not torch.equal(reference, output):
            return True
    return False


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    return [leaf for leaf in torch.utils._pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _cost_model_for(options: CompileOptions, cost_model: CostModel | None) -> CostModel:
    if cost_model is not None and options.hardware_profiles:
        raise SparsifyError("give either cost_model or hardware_profiles, not both")
    if cost_model is not None and options.price_for is not None:
        raise SparsifyError("give either cost_model or price_for, not both (price_for replaces the cost model of the "
                            "search)")
    if cost_model is not None:
        return cost_model
    return CostModel.default(options.hardware_profiles)


def _with_fixed(batch: tuple[tuple, dict], fixed_kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    args, kwargs = batch
    return args, {**fixed_kwargs, **kwargs}


def _describe_call(args: tuple, kwargs: dict) -> str:
    def describe(value: Any) -> str:
        return f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__

    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _apply_strategy(model, strategy, calib_loader, example_inputs, options: CompileOptions) -> SparsifiedModule:
    source = "strategy"
    if isinstance(strategy, (str, os.PathLike)):
        source = os.fspath(strategy)
        strategy = Strategy.load(strategy)
    if not isinstance(strategy, Strategy):
        raise StrategyError(f"strategy must be a Strategy or a path, got {type(strategy).__name__}")
    check_backend_available(options.backend)
    if example_inputs is None:
        if calib_loader is None:
            raise SparsifyError("compile needs example_inputs (or a calib_loader whose first batch serves) to capture the model")
        args, kwargs = collect_batches(model, calib_loader)[0]
        example_inputs = (args, kwargs)
    captured, _ = capture_attention(model, example_inputs, dynamic=options.dynamic)
    counter = StepCounter(options.steps_per_generation or strategy.metadata.get("steps_per_generation"))
    rewrite = RewriteAttention(strategy, backend=options.backend, source=source, step_counter=counter,
                               cost_model=_cost_model_for(options, None) if options.hardware_profiles else None,
                               device=captured.device)

    def check_backend(graph_module: torch.fx.GraphModule) -> PassResult:
        check_backend_serves(options.backend, graph_module)
        return PassResult(graph_module, False)

    result = PassManager([check_backend, rewrite]).run(captured.graph_module)
    sites = [node.meta[SITE_META_KEY] for node in result.graph_module.graph.nodes if SITE_META_KEY in node.meta]
    example = _with_fixed(normalize_inputs(example_inputs), captured.fixed_kwargs)
    return SparsifiedModule(result.graph_module, strategy, sites, captured.fixed_kwargs, rewrite.rewritten, counter,
                            training_differs=training_changes_outputs(model, example),
                            captured_signature=_describe_call(captured.args, captured.kwargs))


__all__ = ["ModelSearchResult", "SparsifiedModule", "capture_attention", "check_backend_available",
           "check_backend_serves", "check_batches", "compile", "end_to_end_error", "find_attention",
           "first_output_tensor", "input_mismatch", "normalize_inputs", "search_model", "training_changes_outputs"]
