"""Model-level output metrics: how far a sparsified model's output is from the dense model's, by name or a user callable.

A metric compares one held-out batch's dense output with the sparsified model's and returns a
float. Each declares its ``power``: the exponent that makes it additive over small independent
errors — a norm adds in squares (``power=2``: squared relative L2 errors of independent sites add
up), a divergence adds as it is (``power=1``: KL is already quadratic in small perturbations).
The search predicts and budgets ``value ** power`` and reports values in the metric's own unit.

Example:
    >>> metric = output_metric("relative_l2")
    >>> dense = torch.ones(2, 4)
    >>> round(metric(dense, dense * 1.1), 6), metric.power
    (0.1, 2.0)
    >>> output_metric("kl").name
    'kl'
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from sparsify.errors import SparsifyError

__all__ = ["OUTPUT_METRICS", "OutputMetric", "first_output_tensor", "next_token_kl", "output_metric", "register_output_metric",
           "relative_l2"]


@dataclasses.dataclass(frozen=True)
class OutputMetric:
    """A named comparison of a dense and a sparsified output, and the power that makes it additive."""

    name: str
    function: Callable[[torch.Tensor, torch.Tensor], float]
    power: float = 2.0

    def __call__(self, dense_output: torch.Tensor, sparse_output: torch.Tensor) -> float:
        value = float(self.function(dense_output, sparse_output))
        if not value >= 0:  # NaN too
            raise SparsifyError(f"output metric {self.name!r} returned {value!r}; a metric must return a number >= 0 "
                                f"(0 when the outputs are equal)")
        return value


OUTPUT_METRICS: dict[str, OutputMetric] = {}
"""The registered metrics by name (`register_output_metric` adds one)."""


def register_output_metric(name: str, power: float = 2.0) -> Callable[[Callable], Callable]:
    """Register ``function(dense_output, sparse_output) -> float`` as metric ``name`` (see the module docstring).

    Example:
        >>> @register_output_metric("max_abs_example", power=2.0)
        ... def max_abs(dense, sparse):
        ...     return float((dense - sparse).abs().max())
        >>> output_metric("max_abs_example").power
        2.0
    """

    def register(function: Callable) -> Callable:
        OUTPUT_METRICS[name] = OutputMetric(name, function, float(power))
        return function

    return register


@register_output_metric("relative_l2", power=2.0)
def relative_l2(dense_output: torch.Tensor, sparse_output: torch.Tensor) -> float:
    """``||sparse - dense|| / ||dense||`` over the whole tensor (float64).

    Example:
        >>> relative_l2(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
        0.1
    """
    dense = dense_output.double()
    difference = sparse_output.double() - dense
    return float(difference.pow(2).sum().sqrt() / dense.pow(2).sum().sqrt().clamp_min(1e-300))


@register_output_metric("kl", power=1.0)
def next_token_kl(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> float:
    """Mean over positions of ``KL(softmax(dense) || softmax(sparse))`` along the last dimension (logits), in nats.

    Example:
        >>> logits = torch.randn(1, 5, 11)
        >>> next_token_kl(logits, logits)
        0.0
    """
    dense = torch.log_softmax(dense_logits.double(), dim=-1)
    sparse = torch.log_softmax(sparse_logits.double(), dim=-1)
    per_position = (dense.exp() * (dense - sparse)).sum(-1)
    return max(float(per_position.mean()), 0.0)


def output_metric(spec: Any) -> OutputMetric:
    """The metric named ``spec``, or a user callable ``metric(dense_output, sparse_output) -> float`` wrapped
    as one (``power=2``: it is taken to behave like a norm; register it to declare another power).

    Example:
        >>> output_metric(lambda dense, sparse: 0.0).power
        2.0
        >>> output_metric("relative_l3")                      # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sparsify.errors.SparsifyError: output_metric: unknown metric 'relative_l3'; known: kl, ...
    """
    if isinstance(spec, OutputMetric):
        return spec
    if isinstance(spec, str):
        if spec not in OUTPUT_METRICS:
            raise SparsifyError(f"output_metric: unknown metric {spec!r}; known: {', '.join(sorted(OUTPUT_METRICS))}, "
                                f"or a callable metric(dense_output, sparse_output) -> float")
        return OUTPUT_METRICS[spec]
    if callable(spec):
        return OutputMetric(getattr(spec, "__qualname__", type(spec).__name__), spec, 2.0)
    raise SparsifyError(f"output_metric: must be a metric name ({', '.join(sorted(OUTPUT_METRICS))}) or a callable "
                        f"metric(dense_output, sparse_output) -> float, got {spec!r}")


def first_output_tensor(value: Any) -> torch.Tensor:
    """The first tensor of a model output (the one the metrics compare): a tensor, tuple/list, dict or HF ``ModelOutput``.

    Example:
        >>> first_output_tensor({"logits": torch.zeros(2), "loss": None}).shape
        torch.Size([2])
    """
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value:
        return first_output_tensor(value[0])
    raise SparsifyError(f"the model's output holds no tensor to compare ({type(value).__name__})")
