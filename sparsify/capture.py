"""Capture: turn a model and example inputs into a `torch.fx.GraphModule` (torch.export first)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import traceback
from typing import Any

import torch
import torch.fx
from torch.export import Dim

from sparsify.errors import CaptureError, InputError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Captured:
    """A captured model: the graph, how it was captured, and the inputs it expects.

    ``args``/``kwargs`` are the example inputs as captured (with ``use_cache=False`` added for
    models whose ``forward`` takes ``use_cache``); ``fixed_kwargs`` are the non-tensor keyword
    arguments the graph was specialised on, which every call must repeat.
    """

    graph_module: torch.fx.GraphModule
    method: str  # "export" or "symbolic_trace"
    args: tuple
    kwargs: dict[str, Any]
    fixed_kwargs: dict[str, Any]
    dynamic: bool


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


def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True) -> Captured:
    """Capture ``model`` as a GraphModule with ``torch.export`` (non-strict), else ``symbolic_trace``.

    With ``dynamic=True`` every tensor dimension is exported as ``Dim.AUTO`` so the graph serves
    other batch sizes and sequence lengths; export falls back to static shapes where the model
    forces it. Models whose ``forward`` takes ``use_cache`` are captured with ``use_cache=False``.
    The model is not modified (it is put in ``eval()`` for the capture and restored after).

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True)
        >>> captured = capture(layer, (torch.randn(2, 16, 32),))
        >>> captured.method
        'export'
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparsify captures torch.nn.Module objects, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    signature = _forward_signature(model)
    if signature is not None and "use_cache" in signature.parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    fixed_kwargs = {k: v for k, v in kwargs.items() if not _has_tensor(v)}
    errors: list[tuple[str, BaseException]] = []
    with eval_mode(model):
        attempts = []
        if dynamic and _has_batch_of_one(args, kwargs):
            # Export specialises sizes of 1; capture with the batch doubled so batch stays dynamic.
            attempts.append(("export (dynamic shapes, batch doubled)", True, *_double_batch(args, kwargs)))
        if dynamic:
            attempts.append(("export (dynamic shapes)", True, args, kwargs))
        attempts.append(("export (static shapes)", False, args, kwargs))
        for label, use_dynamic, export_args, export_kwargs in attempts:
            try:
                graph_module = _export(model, export_args, export_kwargs, signature, use_dynamic)
                return Captured(graph_module, "export", export_args, export_kwargs, fixed_kwargs, use_dynamic)
            except Exception as error:  # noqa: BLE001 - every failure is reported below
                logger.debug("%s failed: %s", label, error)
                errors.append((label, error))
        try:
            graph_module = _symbolic_trace(model, args, kwargs)
            return Captured(graph_module, "symbolic_trace", args, kwargs, fixed_kwargs, False)
        except Exception as error:  # noqa: BLE001
            errors.append(("torch.fx.symbolic_trace", error))
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


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


def _dynamic_shapes(args: tuple, kwargs: dict, signature: inspect.Signature | None) -> Any:
    def spec(value: Any) -> Any:
        return torch.utils._pytree.tree_map(
            # Sizes 0 and 1 would be specialised anyway (with a warning); keep them static.
            lambda leaf: {i: Dim.AUTO for i in range(leaf.dim()) if leaf.shape[i] > 1} if isinstance(leaf, torch.Tensor) else None,
            value,
        )

    if signature is None or any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        if kwargs:
            raise ValueError("cannot name dynamic dimensions of a forward with *args and keyword inputs")
        return tuple(spec(a) for a in args)
    bound = signature.bind_partial(*args, **kwargs)
    shapes = {}
    for name, value in bound.arguments.items():
        parameter = signature.parameters[name]
        if parameter.kind == parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


def _export(model, args, kwargs, signature, dynamic: bool) -> torch.fx.GraphModule:
    dynamic_shapes = _dynamic_shapes(args, kwargs, signature) if dynamic else None
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    graph_module = program.module()
    if dynamic:
        _views_to_reshapes(graph_module)
    return graph_module


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


def _failing_module(error: BaseException, model: torch.nn.Module) -> str | None:
    """Dotted path of the innermost module of ``model`` whose code was running when it failed."""
    names = {id(module): name for name, module in model.named_modules()}
    found = None
    current: BaseException | None = error
    while current is not None:
        for frame, _ in traceback.walk_tb(current.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and id(owner) in names:
                found = names[id(owner)] or f"<root {type(model).__name__}>"
        current = current.__cause__ or current.__context__
    return found


def _capture_failure_message(model: torch.nn.Module, errors: list[tuple[str, BaseException]]) -> str:
    lines = [f"could not capture {type(model).__name__} as a graph."]
    for label, error in errors:
        where = _failing_module(error, model)
        location = f" in module {where!r}" if where else ""
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        lines.append(f"  {label} failed{location}: {type(error).__name__}: {first_line[:300]}")
    lines.append(
        "What to try: pass example inputs exactly as the model is called (a tuple of positional "
        "tensors or a dict of keyword arguments); make data-dependent Python control flow in that "
        "module depend on shapes only; or wrap the model in a module whose forward takes and "
        "returns tensors. Run with logging at DEBUG level for the full traces."
    )
    return "\n".join(lines)
