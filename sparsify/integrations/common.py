"""What both framework doors share: strategy loading, weight-sharing copies, site-to-module matching, fingerprint checks."""

from __future__ import annotations

import copy
import functools
import inspect
import difflib
import logging
import os
from typing import Any, Callable, Iterable, Mapping

import torch

from sparsify.capture import weights_device
from sparsify.cost import CostModel
from sparsify.errors import StrategyError, UnsupportedError
from sparsify.runtime.sparse_attention import SparseAttention
from sparsify.site import AttentionSite
from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)

__all__ = [
    "RUNTIME_ATTRIBUTE",
    "attached_sites",
    "build_runtime",
    "check_call_shapes",
    "check_fingerprints",
    "load_strategy",
    "match_sites",
    "read_attribute",
    "shared_weight_copy",
    "site_from_fingerprint",
]

#: Name under which the attached copy's attention modules hold their `SparseAttention`.
RUNTIME_ATTRIBUTE = "sparse_attention"

#: Sequence length a site is built for when its strategy did not record one (masks are per length anyway).
_NOMINAL_LENGTH_BLOCKS = 4
_MAX_LISTED = 10


def load_strategy(strategy: Strategy | str | os.PathLike) -> tuple[Strategy, str]:
    """``(strategy, source)``: a `Strategy` as given, or loaded (and validated) from a JSON path."""
    if isinstance(strategy, Strategy):
        return strategy, "strategy"
    if isinstance(strategy, (str, os.PathLike)):
        return Strategy.load(strategy), os.fspath(strategy)
    raise StrategyError(f"strategy must be a Strategy or the path of a strategy JSON file, got {type(strategy).__name__}")


def shared_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are the very tensors of ``model`` (no weight copies).

    Everything else (module objects, configs, processors, hooks) is copied, so changing the copy's
    attention implementation leaves ``model`` as it was. Parameters keep being shared: training
    one trains the other.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> shared_weight_copy(layer).weight is layer.weight
        True
    """
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters(recurse=True)) + list(model.buffers(recurse=True)):
        memo[id(tensor)] = tensor
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # noqa: BLE001 - reported with what to do
        raise UnsupportedError(f"cannot make a weight-sharing copy of {type(model).__name__} to attach to: "
                               f"{type(error).__name__}: {error}. attach() leaves your model unchanged and needs "
                               f"to copy its module objects (not its weights)") from error


def site_from_fingerprint(strategy: Strategy, name: str, index: int) -> AttentionSite:
    """The `AttentionSite` a strategy recorded for site ``name`` (a helper `Strategy` does not have).

    Sequence lengths the strategy did not record default to a few blocks (a site's masks are
    built per length at run time anyway).

    Example:
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=16, q_len=64, k_len=64)
        >>> site_from_fingerprint(Strategy.dense([site]), "attn", 0).num_heads
        2
    """
    entry = next(entry for entry in strategy.fingerprint if entry["name"] == name)
    nominal = _NOMINAL_LENGTH_BLOCKS * strategy.block_size
    return AttentionSite(name=name, index=index, num_heads=entry["num_heads"], num_kv_heads=entry["num_kv_heads"],
                         head_dim=entry["head_dim"], q_len=entry.get("q_len", nominal),
                         k_len=entry.get("k_len", nominal), causal=entry["causal"],
                         is_self_attention=entry["kind"] == "self")


def match_sites(strategy: Strategy, module_paths: Iterable[str], *, source: str,
                framework: str) -> dict[str, str]:
    """Map every site of ``strategy`` to a module path of the model: ``{site name: module path}``.

    Site names are the module paths graph capture found the attentions under. They match the
    paths of the model as they are, or with one common prefix added or removed for all sites (a
    strategy searched on ``LlamaModel`` applies to ``LlamaForCausalLM``, whose paths start with
    ``model.``). Raises `StrategyError` listing every name that matches no attention module,
    with the closest paths.
    """
    paths = [path for path in module_paths if path]
    names = list(strategy.sites)
    multi = [name for name in names if "#" in name]
    if multi:
        raise StrategyError(
            f"{source}: sites {_short(multi)} are second or later attentions inside one module; the {framework} door "
            f"runs one attention per module (apply this strategy with sparsify.compile, the graph door)")
    known = set(paths)
    if all(name in known for name in names):
        return {name: name for name in names}
    for shift in _prefix_shifts(names, paths):
        mapped = {name: shift(name) for name in names}
        if all(path in known for path in mapped.values()):
            logger.info("%s: site names map to module paths with a common prefix change (%s -> %s)", source,
                        names[0], mapped[names[0]])
            return mapped
    missing = [name for name in names if name not in known]
    hints = []
    for name in missing[:_MAX_LISTED]:
        close = difflib.get_close_matches(name, paths, n=1, cutoff=0.6)
        if close:
            hints.append(f"{name!r} -> {close[0]!r}?")
    hint = f" (closest module paths: {', '.join(hints)})" if hints else ""
    raise StrategyError(
        f"{source} does not fit this model: {len(missing)} of its {len(names)} sites name no module of the "
        f"model: {_short(missing)}{hint}. Site names are module paths as graph capture reports them "
        f"(sparsify.find_attention); search the strategy on this model class")


def _prefix_shifts(names: list[str], paths: list[str]) -> list[Callable[[str], str]]:
    """Candidate renamings: add a prefix some path has before the first name, or drop a leading component."""
    first = names[0]
    shifts: list[Callable[[str], str]] = []
    for path in paths:
        if path.endswith("." + first):
            prefix = path[: -len(first)]
            shifts.append(lambda name, prefix=prefix: prefix + name)
    parts = first.split(".")
    for cut in range(1, len(parts)):
        prefix = ".".join(parts[:cut]) + "."
        if all(name.startswith(prefix) for name in names):
            shifts.append(lambda name, cut=len(prefix): name[cut:])
    return shifts


def read_attribute(module: torch.nn.Module, names: Iterable[str], *, config_names: Iterable[str] = ()) -> Any:
    """The first of ``names`` the module has (then of ``config_names`` on its ``config``), else ``None``."""
    for name in names:
        value = getattr(module, name, None)
        if value is not None and not isinstance(value, torch.nn.Module):
            return value
    config = getattr(module, "config", None)
    if config is not None:
        for name in config_names:
            value = getattr(config, name, None)
            if value is not None:
                return value
    return None


def check_fingerprints(strategy: Strategy, mapping: Mapping[str, str], readouts: Mapping[str, dict[str, Any]], *,
                       source: str) -> None:
    """Raise `StrategyError` listing every fingerprint field a module contradicts (fields it does not expose pass).

    ``readouts`` holds, per site, what its module says about itself: ``num_heads``,
    ``num_kv_heads``, ``head_dim``, ``causal``, ``kind`` (any may be missing; those are checked
    on the first call, from the tensors). A head shard (`Strategy.shard_heads`) fits modules of
    its heads (tensor parallel) or of all heads (Ulysses sequence parallel).
    """
    problems = []
    fingerprints = {entry["name"]: entry for entry in strategy.fingerprint}
    shards = [shard["world_size"] for shard in strategy.metadata.get("head_shards", [])]
    for name, path in mapping.items():
        recorded = fingerprints[name]
        for key, value in readouts.get(name, {}).items():
            if value is None or key not in recorded:
                continue
            share = value
            if shards and key in ("num_heads", "num_kv_heads") and isinstance(value, int):
                # A head shard (Strategy.shard_heads) also runs on a module of all heads (Ulysses sequence parallel).
                for world_size in shards:
                    share = share // world_size if key == "num_heads" or share % world_size == 0 else 1
            if recorded[key] != value and recorded[key] != share:
                problems.append(f"site {name!r} (module {path!r}): {key} is {value!r} in the model but "
                                f"{recorded[key]!r} in the strategy")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems[: 3 * _MAX_LISTED])
        raise StrategyError(f"{source} does not fit this model ({len(problems)} problem"
                            f"{'s' if len(problems) > 1 else ''}):\n{listed}")


def build_runtime(strategy: Strategy, name: str, index: int, *, backend: str, step_counter: Any = None,
                  cost_model: Any = None) -> SparseAttention | None:
    """The `SparseAttention` of one site, or ``None`` when every head is dense (the framework's own attention runs).

    ``cost_model`` prices ``backend="auto"`` (``None``: the default `CostModel`, shipped hardware profiles included).
    """
    site_strategy = strategy.sites[name]
    if all(pattern.is_dense for pattern in site_strategy.heads):
        return None
    site = site_from_fingerprint(strategy, name, index)
    return SparseAttention(site, site_strategy.heads, block_size=strategy.block_size, backend=backend,
                           dense_steps=site_strategy.dense_steps, step_counter=step_counter,
                           cost_model=cost_model if cost_model is not None else CostModel.default())


def install_runtime(module: torch.nn.Module, runtime: SparseAttention) -> None:
    """Make ``runtime`` a child of an attention module of the attached copy (it moves with ``.to()``)."""
    module.add_module(RUNTIME_ATTRIBUTE, runtime.to(weights_device(module) or torch.device("cpu")))


def attached_sites(model: torch.nn.Module) -> dict[str, SparseAttention]:
    """``{module path: SparseAttention}`` of a model returned by `sparsify.attach` (empty for any other model).

    Example:
        >>> sorted(attached_sites(attached))           # doctest: +SKIP
        ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    """
    found = {}
    for path, module in model.named_modules():
        runtime = module._modules.get(RUNTIME_ATTRIBUTE) if hasattr(module, "_modules") else None
        if isinstance(runtime, SparseAttention):
            found[path] = runtime
    return found


def check_call_shapes(runtime: SparseAttention, query: torch.Tensor, key: torch.Tensor, *, framework: str) -> None:
    """Raise `StrategyError` when a call's heads or head size contradict the strategy of its site.

    The fingerprint check at attach time covers what modules expose as attributes; this covers the rest
    from the tensors of the call (query ``[B, H, Sq, D]``, key ``[B, Hkv, Sk, D]``).
    """
    site = runtime.site
    if query.shape[1] != site.num_heads or key.shape[1] != site.num_kv_heads or query.shape[-1] != site.head_dim:
        raise StrategyError(
            f"site {site.name!r}: the strategy is for {site.num_heads} query / {site.num_kv_heads} key-value heads of "
            f"size {site.head_dim}, but {framework} calls it with query {tuple(query.shape)} and key "
            f"{tuple(key.shape)}; search the strategy on this model")


def _short(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


class WrappingProcessor:
    """Base of the processors that wrap a diffusers attention processor (``self.inner``) to route its attention call.

    Attributes diffusers reads off a processor (``_attention_backend``, ...) are the inner one's.
    Subclasses are made per inner class by `processor_class_for`, so ``__call__`` declares the
    inner ``__call__``'s parameters (diffusers passes a processor only the keywords it declares).

    Example:
        >>> class Inner:
        ...     flag = 1
        ...     def __call__(self, attn, hidden_states, encoder_hidden_states=None): ...
        >>> class Wrapper(WrappingProcessor):
        ...     def __init__(self, inner): self.inner = inner
        ...     def _run(self, attn, *args, **kwargs): return self.inner(attn, *args, **kwargs)
        >>> wrapped = processor_class_for(Wrapper, Inner, "Wrapped")(Inner())
        >>> type(wrapped).__name__, wrapped.flag
        ('WrappedInner', 1)
    """

    def __getattr__(self, name: str) -> Any:  # processor attributes diffusers reads (_attention_backend, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@functools.cache
def processor_class_for(base: type, inner_class: type, prefix: str) -> type:
    """The subclass of ``base`` (a `WrappingProcessor`) whose ``__call__`` declares ``inner_class.__call__``'s parameters."""

    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, *args, **kwargs)

    __call__.__signature__ = inspect.signature(inner_class.__call__)
    name = f"{prefix}{inner_class.__name__}"
    return type(name, (base,), {"__call__": __call__, "__module__": base.__module__, "__qualname__": name})
