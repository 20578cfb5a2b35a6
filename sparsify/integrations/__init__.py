"""Framework doors: `attach` runs a strategy inside transformers' and diffusers' own loops, through their extension points."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from sparsify.errors import UnsupportedError
from sparsify.integrations.common import attached_sites
from sparsify.strategy import Strategy

__all__ = ["attach", "attached_sites"]


def _is_instance(model: Any, module_name: str, class_name: str) -> bool:
    """``isinstance(model, module.class)`` without importing the framework when the process never did."""
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    return cls is not None and isinstance(model, cls)


def attach(model: torch.nn.Module, strategy: Strategy | str | os.PathLike, *, backend: str = "auto",
           decode: Any = "dense", cost_model: Any = None) -> torch.nn.Module:
    """Run ``strategy`` inside the framework's own loop: a copy of ``model`` that shares its weights.

    The framework door, beside the graph door (`sparsify.compile`). The same strategy — searched
    through the graph door or loaded from JSON — gives the same outputs through both doors, and
    the attached model keeps everything its framework offers:

    * a transformers ``PreTrainedModel``: ``attached.generate(...)`` with the default dynamic
      cache. Attention goes through transformers' ``AttentionInterface`` (``attn_implementation
      ="sparsify"``, set on the copy only); prefill runs the strategy's masks, decode steps run
      dense (``decode="dense"``), the pattern's rows at their query offset (``decode="sparse"``), or
      the cache pages a decode pattern picks per step from the query
      (``decode=sparsify.patterns.query_aware_decode(0.1)``).
    * a diffusers model (``ModelMixin``, e.g. ``pipe.transformer``): attention modules named by
      the strategy get a diffusers attention processor that wraps their own and runs their
      scaled-dot-product attention on the site's kernels, so a pipeline runs as usual (CFG
      batches, schedulers). Dense warm-up steps are keyed by the pipeline's denoising step (from
      the ``timestep`` the pipeline passes), not by a call counter.

    The returned model works under ``torch.compile`` (sparse kernels are custom ops). ``model`` is
    not modified: its attention implementation or processors, parameters and outputs stay as they
    were. Sites are matched by module path (the names graph capture gives); a strategy that names
    modules the model does not have, or whose heads, head size or causality contradict a module,
    is refused with the names that do not fit.

    Args:
        model: a transformers ``PreTrainedModel`` or a diffusers ``ModelMixin``.
        strategy: a `Strategy` or the path of a strategy JSON file.
        backend: ``"auto"`` or a backend name (``"torch"``, ``"triton"``, ``"fa4"``, ``"flex"``).
        decode: transformers only: ``"dense"``, ``"sparse"`` or a decode pattern (`query_aware_decode`).
        cost_model: the `CostModel` ``backend="auto"`` prices backends with.

    Example:
        >>> compiled = sparsify.compile(model, calib_batches)                 # doctest: +SKIP
        >>> attached = sparsify.attach(model, compiled.strategy)              # doctest: +SKIP
        >>> attached.generate(**prompt, max_new_tokens=64)                    # doctest: +SKIP
        >>> pipe.transformer = sparsify.attach(pipe.transformer, "wan.json")  # doctest: +SKIP
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise UnsupportedError("attach takes the model itself, not a torch.compile wrapper of it: attach first, then "
                               "torch.compile the attached model")
    if _is_instance(model, "transformers", "PreTrainedModel") or _is_instance(
            model, "transformers.modeling_utils", "PreTrainedModel"):
        from sparsify.integrations.transformers import attach_transformers

        return attach_transformers(model, strategy, backend=backend, decode=decode, cost_model=cost_model)
    if _is_instance(model, "diffusers", "ModelMixin") or _is_instance(
            model, "diffusers.models.modeling_utils", "ModelMixin"):
        if not isinstance(decode, str) or decode != "dense":
            raise UnsupportedError("decode= applies to transformers models (with a KV cache); diffusers models have "
                                   "no decode steps")
        from sparsify.integrations.diffusers import attach_diffusers

        return attach_diffusers(model, strategy, backend=backend, cost_model=cost_model)
    raise UnsupportedError(
        f"sparsify.attach works with transformers PreTrainedModel and diffusers ModelMixin models, got "
        f"{type(model).__module__}.{type(model).__name__}; for any other nn.Module use the graph door: "
        f"sparsify.compile(model, strategy=..., example_inputs=...)")
