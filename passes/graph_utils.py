"""Small helpers the graph passes share: op classification, argument access, shapes, module paths."""

from __future__ import annotations

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
    "mul": (aten.mul.Tensor, aten.mul.Scalar, torch.mul, operator.mul),
    "div": (aten.div.Tensor, aten.div.Scalar, torch.div, operator.truediv),
    "add": (aten.add.Tensor, aten.add.Scalar, torch.add, operator.add),
    "masked_fill": (aten.masked_fill.Scalar, aten.masked_fill.Tensor, torch.masked_fill),
    "where": (aten.where.self, aten.where.ScalarOther, torch.where),
    "dropout": (aten.dropout.default, F.dropout, aten.native_dropout.default),
    "transpose": (aten.transpose.int, torch.transpose),
    "permute": (aten.permute.default, torch.permute),
    "cast": (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
             aten.contiguous.default, aten.clone.default, aten.alias.default),
    "view": (aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape),
    "expand": (aten.expand.default,),
    "unsqueeze": (aten.unsqueeze.default, torch.unsqueeze),
    "repeat_interleave": (aten.repeat_interleave.self_int, torch.repeat_interleave),
    "logical_not": (aten.logical_not.default, aten.bitwise_not.default, torch.logical_not, operator.invert),
}
_METHOD_KINDS: dict[str, str] = {
    "matmul": "matmul", "bmm": "bmm", "baddbmm": "baddbmm", "softmax": "softmax", "mul": "mul",
    "div": "div", "add": "add", "masked_fill": "masked_fill", "transpose": "transpose",
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
    return None


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
    """Static shape of a node's value (symbolic sizes become their hint), or None when unknown."""
    value = fake_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(_size_hint(size) for size in value.shape)


def dtype_of(node: Any) -> torch.dtype | None:
    value = fake_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _size_hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    return int(size)


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
