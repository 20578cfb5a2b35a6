"""Small helpers the graph passes share: op classification, argument access, shapes, module paths, constants."""

from __future__ import annotations

import functools
import operator
import re
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

aten = torch.ops.aten

# Each kind lists the targets (aten overloads, torch functions, Tensor method names) that mean it.
_FUNCTION_KINDS: dict[str, tuple[Any, ...]] = {
    "sdpa": (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention),
    "matmul": (aten.matmul.default, torch.matmul, operator.matmul),
    "bmm": (aten.bmm.default, torch.bmm),
    "baddbmm": (aten.baddbmm.default, torch.baddbmm),
    "einsum": (aten.einsum.default, torch.einsum),
    "softmax": (aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax),
    # In-place forms (``scores += bias``, ``add_``) stay in export's graph; they compute the same.
    "mul": (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar, torch.mul, operator.mul, operator.imul),
    "div": (aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar, torch.div, operator.truediv,
            operator.itruediv),
    "add": (aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar, torch.add, operator.add, operator.iadd),
    "sub": (aten.sub.Tensor, aten.sub.Scalar, aten.sub_.Tensor, aten.sub_.Scalar, torch.sub, operator.sub, operator.isub),
    "masked_fill": (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor,
                    torch.masked_fill),
    "where": (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, torch.where),
    "tanh": (aten.tanh.default, aten.tanh_.default, torch.tanh),
    "cat": (aten.cat.default, torch.cat, torch.concat),
    "slice": (aten.slice.Tensor,),
    "row_max": (aten.amax.default, aten.max.dim, torch.amax),
    "getitem": (operator.getitem,),
    # Uses of a tensor that read only its shape, dtype or device, never its values.
    "shape_only": (aten.sym_size.int, aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default,
                   aten.full_like.default, aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default,
                   aten.new_full.default),
    "linear": (aten.linear.default, F.linear),
    "addmm": (aten.addmm.default,),
    "mm": (aten.mm.default, torch.mm),
    "dropout": (aten.dropout.default, F.dropout, aten.native_dropout.default),
    "transpose": (aten.transpose.int, torch.transpose),
    "permute": (aten.permute.default, torch.permute),
    "cast": (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
             aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default, aten.detach_.default,
             aten.lift_fresh_copy.default),
    "view": (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
             aten.flatten.using_ints, torch.reshape, torch.flatten, torch.unflatten),
    "expand": (aten.expand.default,),
    "unsqueeze": (aten.unsqueeze.default, torch.unsqueeze),
    "repeat_interleave": (aten.repeat_interleave.self_int, torch.repeat_interleave),
    "logical_not": (aten.logical_not.default, aten.bitwise_not.default, torch.logical_not, operator.invert),
}
_METHOD_KINDS: dict[str, str] = {
    "matmul": "matmul", "bmm": "bmm", "baddbmm": "baddbmm", "softmax": "softmax", "mul": "mul",
    "div": "div", "add": "add", "sub": "sub", "masked_fill": "masked_fill", "transpose": "transpose",
    "mul_": "mul", "div_": "div", "add_": "add", "sub_": "sub", "masked_fill_": "masked_fill", "tanh": "tanh",
    "tanh_": "tanh", "amax": "row_max", "size": "shape_only", "new_ones": "shape_only", "new_zeros": "shape_only",
    "new_empty": "shape_only", "new_full": "shape_only", "detach": "cast", "flatten": "view", "unflatten": "view",
    "permute": "permute", "to": "cast", "type": "cast", "type_as": "cast", "float": "cast",
    "half": "cast", "bfloat16": "cast", "contiguous": "cast", "clone": "cast", "view": "view",
    "reshape": "view", "expand": "expand", "unsqueeze": "unsqueeze",
    "repeat_interleave": "repeat_interleave", "logical_not": "logical_not",
    "bitwise_not": "logical_not", "__invert__": "logical_not",
}
_TARGET_TO_KIND: dict[Any, str] = {target: kind for kind, targets in _FUNCTION_KINDS.items() for target in targets}


def op_kind(node: torch.fx.Node, modules: dict[str, torch.nn.Module] | None = None) -> str | None:
    """What a node computes, as one of the kinds above (``"softmax"``, ``"matmul"``...), or None."""
    if node.op == "call_function":
        try:
            return _TARGET_TO_KIND.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
    if node.op == "call_module" and modules is not None:
        module = modules.get(node.target)
        if isinstance(module, torch.nn.Dropout):
            return "dropout"
        if isinstance(module, torch.nn.Softmax):
            return "softmax"
        if isinstance(module, torch.nn.Linear):
            return "linear"
    return None


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# Concrete shapes recorded from one run on the example inputs (the find_attention pass sets and
# removes them): they stand in for sizes export left symbolic without a hint (data-dependent).
EXAMPLE_SHAPE_KEY = "sparsify_example_shape"
#: A fill value at or below this hides a key as well as -inf does (HF uses finfo.min, others -1e9).
MASKING_FILL = -1.0e4


def fake_value(node: Any) -> Any:
    """The example value recorded for a node (``meta["val"]`` from export, or ShapeProp's)."""
    if not isinstance(node, torch.fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    tensor_meta = node.meta.get("tensor_meta")
    if tensor_meta is not None and hasattr(tensor_meta, "shape"):
        return torch.empty(tensor_meta.shape, dtype=tensor_meta.dtype, device="meta")
    return None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Shape of a node's value on the example inputs, or None when unknown.

    Sizes come from the example run where one was recorded, else from the fake value
    (symbolic sizes become their hint; a size without a hint makes the shape unknown).
    """
    if isinstance(node, torch.fx.Node) and EXAMPLE_SHAPE_KEY in node.meta:
        return node.meta[EXAMPLE_SHAPE_KEY]
    value = fake_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    sizes = [_size_hint(size) for size in value.shape]
    return None if any(size is None for size in sizes) else tuple(sizes)


def static_size(node: Any, dim: int) -> int | None:
    """Size ``dim`` of a node's value when the graph fixes it (a plain int), else None (symbolic)."""
    value = fake_value(node)
    if not isinstance(value, torch.Tensor) or not -value.dim() <= dim < value.dim():
        return None
    size = value.shape[dim]
    return size if isinstance(size, int) else None


def dtype_of(node: Any) -> torch.dtype | None:
    value = fake_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _size_hint(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    return None  # unbacked (data-dependent) size: no hint


_EXPORT_PREFIX = re.compile(r"^(L\['self'\]\.|L__self___|self\.)")


def module_path(node: torch.fx.Node) -> tuple[str, str]:
    """``(dotted path, class name)`` of the innermost module a node was traced in ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, module_type = list(stack.values())[-1]
    path = _EXPORT_PREFIX.sub("", str(path))
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")
    type_name = module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"
    return path, type_name


def is_float_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def attribute(graph_module: torch.nn.Module, target: str) -> Any:
    """The object a ``get_attr`` node names (a dotted path on the graph module), or None."""
    try:
        return functools.reduce(getattr, target.split("."), graph_module)
    except AttributeError:
        return None


# Ops a constant operand may be computed with (all deterministic; evaluated on tiny tensors only).
_CONSTANT_OPS = {
    aten.lift_fresh_copy.default, aten.detach.default, aten.detach_.default, aten.clone.default, aten.alias.default,
    aten._to_copy.default, aten.to.dtype, aten.contiguous.default, aten.sqrt.default, aten.rsqrt.default,
    aten.reciprocal.default, aten.neg.default, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim,
    aten.scalar_tensor.default, aten.full.default,
}
_MAX_CONSTANT_ELEMENTS = 64


def constant_value(value: Any, graph_module: torch.nn.Module | None, depth: int = 12) -> float | None:
    """The single number an operand holds everywhere, when the graph computes it from constants only.

    Covers Python numbers, ``full``/``scalar_tensor``/``full_like`` fills, lifted tensor
    constants (``get_attr`` → ``lift_fresh_copy``) and small arithmetic on them (e.g.
    ``sqrt(tensor(d) * 3)``); None for anything that depends on inputs or varies.

    Example:
        >>> constant_value(2.5, None)
        2.5
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    tensor = _constant_tensor(value, graph_module, depth)
    if tensor is None or tensor.numel() == 0:
        return None
    first = tensor.reshape(-1)[0]
    if not bool((tensor == first).all()):
        return None
    return float(first)


def _constant_tensor(value: Any, graph_module: torch.nn.Module | None, depth: int) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.numel() <= _MAX_CONSTANT_ELEMENTS else None
    if isinstance(value, bool) or not isinstance(value, (torch.fx.Node, int, float)):
        return None
    if isinstance(value, (int, float)):
        return torch.tensor(value)
    if depth <= 0:
        return None
    node = value
    if node.op == "get_attr" and graph_module is not None:
        found = attribute(graph_module, str(node.target))
        if isinstance(found, torch.Tensor) and found.numel() <= _MAX_CONSTANT_ELEMENTS:
            return found.detach()
        return None
    if node.op != "call_function":
        return None
    if node.target in (aten.full_like.default,) and len(node.args) > 1 and is_float_scalar(node.args[1]):
        return torch.tensor(float(node.args[1]))  # uniform fill: the shape does not matter
    if node.target not in _CONSTANT_OPS:
        return None
    if node.target is aten.full.default:  # uniform fill of any size
        return torch.tensor(float(node.args[1])) if is_float_scalar(node.args[1]) else None
    args = []
    for item in node.args:
        if isinstance(item, torch.fx.Node):
            tensor = _constant_tensor(item, graph_module, depth - 1)
            if tensor is None:
                return None
            args.append(tensor)
        elif isinstance(item, (list, tuple)) and any(isinstance(i, torch.fx.Node) for i in item):
            return None  # symbolic sizes
        else:
            args.append(item)
    kwargs = {k: v for k, v in node.kwargs.items() if not isinstance(v, torch.fx.Node)}
    kwargs.pop("device", None)
    try:
        with torch.no_grad():
            result = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not evaluable here: not a constant we can use
        return None
    return result if isinstance(result, torch.Tensor) and result.numel() <= _MAX_CONSTANT_ELEMENTS else None
