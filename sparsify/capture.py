"""Capture: turn a model and example inputs into a `torch.fx.GraphModule` (torch.export first)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import linecache
import logging
import os
import re
import traceback
import weakref
from typing import Any, Literal

import torch
import torch.fx
from torch.export import Dim

from sparsify.errors import CaptureError, InputError

logger = logging.getLogger(__name__)

# The one entry for models whose own Python cannot be captured as a graph.
FRAMEWORK_DOOR = "sparsify.attach(model, strategy)"
Dynamic = bool | Literal["all"]

# Calls in model code that turn tensor data into Python values; a graph capture cannot follow them.
_DATA_DEPENDENT_CALLS = re.compile(r"\.(tolist|numpy|item)\(\)")
# Messages of errors that come from data-dependent Python in the model.
_DATA_DEPENDENT_SIGNS = ("data-dependent", "data dependent", ".numpy() is not supported", "tensor subclasses",
                         "Could not guard on", "Could not extract specialized integer")
# A symbolic size used where Python needs a plain value: data-dependent when model code made it from values.
_SYMBOLIC_VALUE_SIGNS = ("unhashable type: non-nested SymInt",)


@dataclasses.dataclass
class Captured:
    """A captured model: the graph, how it was captured, and the inputs it expects.

    ``args``/``kwargs`` are the example inputs as captured (with ``use_cache=False`` added for
    models whose ``forward`` takes ``use_cache``); ``fixed_kwargs`` are the non-tensor keyword
    arguments the graph was specialised on, which every call must repeat. ``static_inputs``
    names the inputs whose shapes the graph fixed although a dynamic capture was asked for.
    """

    graph_module: torch.fx.GraphModule
    method: str  # "export" or "symbolic_trace"
    args: tuple
    kwargs: dict[str, Any]
    fixed_kwargs: dict[str, Any]
    dynamic: bool
    static_inputs: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        """Where the model runs: its weights' device, else (a model without weights) its example inputs', else CPU.

        Example:
            >>> capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).device
            device(type='cpu')
        """
        device = weights_device(self.graph_module)
        if device is not None:
            return device
        leaves = torch.utils._pytree.tree_leaves((self.args, self.kwargs))
        return next((leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor)), torch.device("cpu"))

    def copy(self) -> "Captured":
        """The same capture with its own graph (weights shared), so a pass may edit it freely.

        Example:
            >>> captured = capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
            >>> captured.copy().graph_module is captured.graph_module
            False
        """
        return dataclasses.replace(self, graph_module=copy_graph_module(self.graph_module),
                                   kwargs=dict(self.kwargs), fixed_kwargs=dict(self.fixed_kwargs))


def weights_device(module: torch.nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer; ``None`` for a module with neither.

    Example:
        >>> weights_device(torch.nn.Linear(2, 2)), weights_device(torch.nn.ReLU())
        (device(type='cpu'), None)
    """
    return next((tensor.device for tensor in itertools.chain(module.parameters(), module.buffers())), None)


def copy_graph_module(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a copy of the graph (node meta included) that shares parameters and buffers.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
        >>> twin = copy_graph_module(gm)
        >>> twin.weight is gm.weight, twin.graph is gm.graph
        (True, False)
    """
    import copy

    source = graph_module.graph
    graph = torch.fx.Graph(tracer_cls=source._tracer_cls)
    output_value, source_output = graph.graph_copy(source, {}, return_output_node=True)
    output = graph.output(output_value, type_expr=getattr(source_output, "type", None))
    output.meta = copy.copy(source_output.meta)
    # The code generator (input/output specs) is shared, not copied: nothing edits it after capture.
    graph._codegen = source._codegen
    twin = torch.fx.GraphModule(graph_module, graph, class_name=type(graph_module).__name__)
    for name in ("_in_spec", "_out_spec", "range_constraints", "module_call_graph"):
        if name in graph_module.__dict__:
            setattr(twin, name, graph_module.__dict__[name])
    twin.meta = dict(getattr(graph_module, "meta", {}))
    twin.training = graph_module.training
    return twin


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional args, or a dict of kwargs.

    Example:
        >>> normalize_inputs(torch.zeros(2))[0][0].shape
        torch.Size([2])
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise InputError(
        f"example inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(example_inputs).__name__}"
    )


def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic: Dynamic = True) -> Captured:
    """Capture ``model`` as a GraphModule with ``torch.export`` (non-strict), else ``symbolic_trace``.

    ``dynamic=True`` exports the batch and sequence dimensions as ``Dim.AUTO`` so the graph
    serves other batch sizes and lengths: every dimension of inputs of rank ≤ 3 (token ids,
    masks, ``[batch, tokens, features]``), and the batch dimension of image- and video-like
    inputs of rank ≥ 4, whose other dimensions stay as in the example unless they equal a
    sequence length (a ``[batch, 1, seq, seq]`` mask follows its sequence). ``dynamic="all"``
    makes every dimension dynamic (other resolutions too; capturing models that partition
    windows, such as Swin, then takes minutes); ``dynamic=False`` fixes every shape. Export
    specialises what the model forces; where the dynamic export fails and a static one works,
    a warning names the inputs whose shapes became fixed.

    Models whose ``forward`` takes ``use_cache`` (by name, or through ``**kwargs`` with a
    ``config.use_cache``) are captured with ``use_cache=False``. Data-dependent Python in the
    model (a decision on tensor values) is taken on the example's values where export can
    re-check it in the graph; where it cannot (``.tolist()``, ``.numpy()``), the `CaptureError`
    names the module and points to the framework door. The model is not modified (it is put in
    ``eval()`` for the capture and restored after).

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True)
        >>> captured = capture(layer, (torch.randn(2, 16, 32),))
        >>> captured.method, captured.dynamic
        ('export', True)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparsify captures torch.nn.Module objects, got {type(model).__name__}")
    if dynamic not in (True, False, "all"):
        raise InputError(f"dynamic must be True, False or 'all', got {dynamic!r}")
    args, kwargs = normalize_inputs(example_inputs)
    signature = _forward_signature(model)
    if "use_cache" not in kwargs and _takes_use_cache(model, signature):
        kwargs["use_cache"] = False
    fixed_kwargs = {k: v for k, v in kwargs.items() if not _has_tensor(v)}
    errors: list[tuple[str, BaseException]] = []
    with eval_mode(model):
        attempts = []
        if dynamic and _has_batch_of_one(args, kwargs):
            # Export specialises sizes of 1; capture with the batch doubled so batch stays dynamic.
            attempts.append(("export (dynamic shapes, batch doubled)", dynamic, *_double_batch(args, kwargs)))
        if dynamic:
            attempts.append(("export (dynamic shapes)", dynamic, args, kwargs))
        attempts.append(("export (static shapes)", False, args, kwargs))
        for label, use_dynamic, export_args, export_kwargs in attempts:
            try:
                graph_module = _export(model, export_args, export_kwargs, signature, use_dynamic, label)
            except Exception as error:  # noqa: BLE001 - every failure is reported below
                logger.debug("%s failed", label, exc_info=error)
                errors.append((label, error))
                continue
            static_inputs: tuple[str, ...] = ()
            if dynamic and not use_dynamic:
                static_inputs = _describe_tensor_inputs(signature, args, kwargs)
                logger.warning(
                    "capture of %s: the dynamic-shape export failed (%s), so the graph was captured with static "
                    "shapes: %s keep their example shapes and the compiled module accepts no other batch size or "
                    "length. Run with logging at DEBUG level for the export error.",
                    type(model).__name__, _first_line(errors[-1][1]), ", ".join(static_inputs) or "the inputs")
            return Captured(graph_module, "export", export_args, export_kwargs, fixed_kwargs, bool(use_dynamic),
                            static_inputs)
        if not any(_is_data_dependent(error) for _, error in errors):
            try:
                graph_module = _symbolic_trace(model, args, kwargs)
                return Captured(graph_module, "symbolic_trace", args, kwargs, fixed_kwargs, False)
            except Exception as error:  # noqa: BLE001
                errors.append(("torch.fx.symbolic_trace", error))
    for label, error in errors:
        logger.debug("%s failed:\n%s", label, "".join(traceback.format_exception(error)))
    data_dependent = next((error for _, error in errors if _is_data_dependent(error)), None)
    if data_dependent is None:
        data_dependent = next((error for _, error in errors if any(sign in str(error) for sign in _SYMBOLIC_VALUE_SIGNS)
                               and _data_dependent_origin(model, error)[1]), None)
    if data_dependent is not None:
        raise CaptureError(_data_dependent_message(model, data_dependent)) from data_dependent
    raise CaptureError(_capture_failure_message(model, errors)) from errors[0][1]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put ``model`` in eval mode and restore every submodule's own training flag afterwards.

    Example:
        >>> layer = torch.nn.Dropout()
        >>> with eval_mode(layer):
        ...     layer.training
        False
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _has_batch_of_one(args: tuple, kwargs: dict) -> bool:
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    return bool(leaves) and any(leaf.dim() >= 2 and leaf.shape[0] == 1 for leaf in leaves)


def _double_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def double(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == 1:
            return torch.cat([leaf, leaf])
        return leaf

    return torch.utils._pytree.tree_map(double, (args, kwargs))


def flat_graph_inputs(graph_module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The flat placeholder values of a captured graph for ``(args, kwargs)``."""
    in_spec = getattr(graph_module, "_in_spec", None)
    if in_spec is not None:
        from torch.fx import _pytree as fx_pytree

        return list(fx_pytree.tree_flatten_spec((args, kwargs), in_spec))
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    values = list(args) + [kwargs[p.target] for p in placeholders[len(args):] if p.target in kwargs]
    return values


def _forward_signature(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _takes_use_cache(model: torch.nn.Module, signature: inspect.Signature | None) -> bool:
    """``forward`` names ``use_cache``, or takes ``**kwargs`` on a model configured with ``use_cache``."""
    if signature is None:
        return False
    if "use_cache" in signature.parameters:
        return True
    takes_keywords = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    config = getattr(model, "config", None)
    if not takes_keywords or config is None:
        return False
    if isinstance(getattr(config, "use_cache", None), bool):
        return True
    # Composite models (vision + text) keep use_cache on the text model's config.
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    return isinstance(getattr(text_config, "use_cache", None), bool)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


def _sequence_sizes(args: tuple, kwargs: dict) -> set[int]:
    """Sizes of the sequence dimensions of inputs of rank ≤ 3 (not batch, not the feature dim of floats)."""
    sizes = set()
    for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and 2 <= leaf.dim() <= 3:
            last = leaf.dim() - 1 if leaf.is_floating_point() and leaf.dim() == 3 else leaf.dim()
            sizes.update(int(leaf.shape[d]) for d in range(1, last))
    return sizes - {0, 1}


def _dynamic_dims(leaf: torch.Tensor, dynamic: Dynamic, sequence_sizes: set[int]) -> dict[int, Any]:
    # Sizes 0 and 1 would be specialised anyway (with a warning); keep them static.
    dims = [i for i in range(leaf.dim()) if leaf.shape[i] > 1]
    if dynamic != "all" and leaf.dim() >= 4:
        dims = [i for i in dims if i == 0 or int(leaf.shape[i]) in sequence_sizes]
    return {i: Dim.AUTO for i in dims}


def _dynamic_shapes(args: tuple, kwargs: dict, signature: inspect.Signature | None, dynamic: Dynamic) -> Any:
    sequence_sizes = _sequence_sizes(args, kwargs)

    def spec(value: Any) -> Any:
        return torch.utils._pytree.tree_map(
            lambda leaf: _dynamic_dims(leaf, dynamic, sequence_sizes) if isinstance(leaf, torch.Tensor) else None, value)

    if signature is None or any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        if kwargs:
            raise ValueError("cannot name dynamic dimensions of a forward with *args and keyword inputs")
        return tuple(spec(a) for a in args)
    bound = signature.bind_partial(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


class _CallWithKeywords(torch.nn.Module):
    """Calls ``model(*args, **kwargs)`` from two plain arguments.

    Export cannot name dynamic dimensions of inputs that reach ``forward`` through
    ``**kwargs``; exported through this wrapper they are entries of a plain dict.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return self.model(*args, **kwargs)


def _keywords_reach_var_keyword(signature: inspect.Signature | None, kwargs: dict) -> bool:
    """Keyword inputs that export cannot give dynamic shapes to directly (``**kwargs``, or next to ``*args``)."""
    if signature is None or not kwargs:
        return False
    kinds = {p.kind for p in signature.parameters.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return True
    named = {name for name, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return inspect.Parameter.VAR_KEYWORD in kinds and any(name not in named for name in kwargs)


def _export(model, args, kwargs, signature, dynamic: Dynamic, label: str = "export") -> torch.fx.GraphModule:
    wrapped = _keywords_reach_var_keyword(signature, kwargs)
    if wrapped:
        target, export_args, export_kwargs = _CallWithKeywords(model), (tuple(args), dict(kwargs)), {}
        dynamic_shapes = _dynamic_shapes((tuple(args), dict(kwargs)), {}, None, dynamic) if dynamic else None
    else:
        target, export_args, export_kwargs = model, args, kwargs
        dynamic_shapes = _dynamic_shapes(args, kwargs, signature, dynamic) if dynamic else None
    try:
        program = _export_program(target, export_args, export_kwargs, dynamic_shapes)
    except Exception as error:  # noqa: BLE001
        if not isinstance(error, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode):
            raise
        # A decision on tensor values (e.g. "is this mask causal?"): take it on the example's real
        # values; export re-checks the assumption in the graph on every call.
        program = _export_program(target, export_args, export_kwargs, dynamic_shapes, real_values=True)
        logger.warning("capture of %s: the model decides on tensor values (%s); %s took the example's values and "
                       "the graph checks them again on every call", type(model).__name__,
                       _first_line(error)[:160], label)
    graph_module = program.module()
    if wrapped:
        _unwrap_keywords(graph_module, args, kwargs)
    if dynamic:
        _views_to_reshapes(graph_module)
    return graph_module


def _export_program(target, args, kwargs, dynamic_shapes, real_values: bool = False):
    real_tensors = contextlib.nullcontext()
    if real_values:
        import torch._functorch.config as functorch_config

        real_tensors = functorch_config.patch(fake_tensor_propagate_real_tensors=True)
    # Fresh tensor objects for every attempt: a failed dynamic export leaves its dynamic-dimension
    # markers on the tensors it was given, and a later static export would trace symbolic sizes.
    args, kwargs = torch.utils._pytree.tree_map(
        lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf, (args, kwargs))
    with torch.no_grad(), real_tensors:
        return torch.export.export(target, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def _unwrap_keywords(graph_module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Make a graph exported through `_CallWithKeywords` callable and named like the model itself.

    Its inputs become ``(*args, **kwargs)`` again, and module paths lose the wrapper's ``model.``
    prefix (site names are those of the model).
    """
    codegen = graph_module.graph._codegen
    spec = graph_module._in_spec  # ((args, kwargs), {}) -> (args, kwargs)
    in_spec = spec.child(0) if hasattr(spec, "child") else spec.children_specs[0]
    names = [f"arg{i}" for i in range(len(args))] + list(kwargs)
    codegen.pytree_info = codegen.pytree_info._replace(orig_args=names, in_spec=in_spec)
    graph_module._in_spec = in_spec
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        unwrapped = {}
        for key, (path, module_type) in stack.items():
            path = str(path)
            if path in ("", "L['self']"):
                continue  # the wrapper itself
            path = re.sub(r"^(L\['self'\]\.)?model\.?", "", path)
            unwrapped[key] = (path, module_type)
        node.meta["nn_module_stack"] = unwrapped
    graph_module.recompile()


def _views_to_reshapes(graph_module: torch.fx.GraphModule) -> None:
    """Turn ``aten.view`` into ``aten.reshape`` in a dynamically captured graph.

    Export drops ``.contiguous()`` calls that were no-ops on the example's strides; at another
    batch or length (or after a kernel that returns another layout, as cuBLAS may) the ``view``
    that followed can then fail. ``reshape`` is the same view where one exists and a copy
    otherwise; the captured graph is functional, so nothing relies on the aliasing.
    """
    changed = False
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        graph_module.recompile()


def _symbolic_trace(model, args, kwargs) -> torch.fx.GraphModule:
    if kwargs:
        raise CaptureError("symbolic_trace fallback takes positional example inputs only")
    graph_module = torch.fx.symbolic_trace(model)
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(graph_module).propagate(*args)
    return graph_module


def _describe_tensor_inputs(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """``("input_ids (2, 32)", ...)``: each tensor input by name with its example shape."""
    names = []
    if signature is not None:
        positional = [name for name, p in signature.parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = positional[:len(args)]
    names += [f"arg{i}" for i in range(len(names), len(args))]
    described = []
    for name, value in list(zip(names, args)) + list(kwargs.items()):
        for path, leaf in torch.utils._pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                described.append(f"{name}{torch.utils._pytree.keystr(path)} {tuple(leaf.shape)}")
    return tuple(described)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _is_data_dependent(error: BaseException) -> bool:
    """Whether capture failed on Python that depends on tensor values (not on shapes)."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode):
            return True
        if any(sign in str(current) for sign in _DATA_DEPENDENT_SIGNS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _model_frames(error: BaseException, model: torch.nn.Module) -> list[tuple[Any, str]]:
    """``(frame, module path)`` of every traceback frame running code of one of ``model``'s modules."""
    names = {id(module): name for name, module in model.named_modules()}
    frames = []
    current: BaseException | None = error
    while current is not None:
        for frame, _ in traceback.walk_tb(current.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and id(owner) in names:
                frames.append((frame, names[id(owner)] or f"<root {type(model).__name__}>"))
        current = current.__cause__ or current.__context__
    return frames


def _failing_module(error: BaseException, model: torch.nn.Module) -> str | None:
    """Dotted path of the innermost module of ``model`` whose code was running when it failed."""
    frames = _model_frames(error, model)
    return frames[-1][1] if frames else None


def _data_dependent_calls(code: Any, line: int | None = None) -> list[str]:
    """``.tolist()`` / ``.numpy()`` / ``.item()`` calls in a function's source, with file:line."""
    try:
        lines, first = inspect.getsourcelines(code)
    except (OSError, TypeError):
        if line is None:
            return []
        lines, first = [linecache.getline(code.co_filename, line)], line
    found = []
    for offset, text in enumerate(lines):
        for match in _DATA_DEPENDENT_CALLS.finditer(text):
            found.append(f"`.{match.group(1)}()` at {os.path.basename(code.co_filename)}:{first + offset}")
    return found


def _data_dependent_message(model: torch.nn.Module, error: BaseException) -> str:
    """One line: the module, the data-dependent calls in its code, the error, and the framework door."""
    where, calls = _data_dependent_origin(model, error)
    cause = f" with {', '.join(calls[:3])}" if calls else ""
    return (f"could not capture {type(model).__name__}: {where} runs data-dependent Python{cause} "
            f"({_first_line(error)[:160]}), which a graph capture cannot follow; "
            f"use the framework door {FRAMEWORK_DOOR} for this model.")


def _data_dependent_origin(model: torch.nn.Module, error: BaseException) -> tuple[str, list[str]]:
    """The failing module (as words) and the ``.tolist()``-like calls in its code or its submodules' code."""
    frames = _model_frames(error, model)
    where = "its forward"
    calls: list[str] = []
    if frames:
        frame, path = frames[-1]
        owner = frame.f_locals.get("self")
        where = f"module {path!r} ({type(owner).__name__})"
        for candidate_frame, _ in reversed(frames):
            calls = _data_dependent_calls(candidate_frame.f_code, candidate_frame.f_lineno)
            if calls:
                break
        if not calls:
            # The value was made earlier, in a submodule that already returned: look at their code.
            failing = owner if isinstance(owner, torch.nn.Module) else model
            seen: set[type] = set()
            for name, module in failing.named_modules():
                if type(module) in seen or not name:
                    continue
                seen.add(type(module))
                forward = getattr(type(module), "forward", None)
                found = _data_dependent_calls(forward.__code__) if hasattr(forward, "__code__") else []
                calls += [f"{call} (in {path + '.' if frames[-1][1][0] != '<' else ''}{name})" for call in found]
    return where, calls


def _capture_failure_message(model: torch.nn.Module, errors: list[tuple[str, BaseException]]) -> str:
    lines = [f"could not capture {type(model).__name__} as a graph."]
    for label, error in errors:
        where = _failing_module(error, model)
        location = f" in module {where!r}" if where else ""
        lines.append(f"  {label} failed{location}: {_first_line(error)}")
    lines.append(
        "What to try: pass example inputs exactly as the model is called (a tuple of positional "
        "tensors or a dict of keyword arguments); make data-dependent Python control flow in that "
        "module depend on shapes only; or wrap the model in a module whose forward takes and "
        f"returns tensors; or use the framework door {FRAMEWORK_DOOR}. Run with logging at DEBUG "
        "level for the full traces."
    )
    return "\n".join(lines)


class FoundSites(list):
    """The `AttentionSite` list `find_attention` returns, holding the graph it found them in.

    Pass it to `sparsify.compile` as ``example_inputs`` (with the same model) and the graph is
    reused instead of being captured again; each use gets its own copy, so one `FoundSites`
    serves any number of compiles. Otherwise it is a plain list of sites.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True)
        >>> sites = sparsify.find_attention(layer, (torch.randn(2, 16, 32),))       # doctest: +SKIP
        >>> compiled = sparsify.compile(layer, strategy=sparsify.Strategy.dense(sites),
        ...                             example_inputs=sites)                        # doctest: +SKIP
    """

    def __init__(self, sites: list, captured: Captured, model: torch.nn.Module, inputs: tuple[tuple, dict],
                 dynamic: Dynamic):
        super().__init__(sites)
        self.captured = captured
        self.inputs = inputs  # (args, kwargs) as the caller gave them
        self.dynamic = dynamic
        self._model = weakref.ref(model)

    def reuse_for(self, model: torch.nn.Module, dynamic: Dynamic) -> Captured:
        """A copy of the captured graph for ``model``; raises when it was found on another model or setting."""
        if self._model() is not model:
            raise InputError("these attention sites were found on another model; pass that model, or example "
                             "inputs to capture this one")
        if dynamic != self.dynamic:
            raise InputError(f"these attention sites were captured with dynamic={self.dynamic!r}, not {dynamic!r}; "
                             f"find them again with dynamic={dynamic!r} or pass example inputs")
        return self.captured.copy()
