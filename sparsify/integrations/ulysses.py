"""Ulysses sequence parallelism for diffusers models: tokens sharded over ranks, each rank's attention on all tokens of its heads.

Video diffusion transformers that outgrow one GPU run Ulysses sequence parallelism (as xDiT and
FastVideo do): outside attention every rank holds ``S / N`` of the tokens (norms, MLPs and
projections are per token); inside each attention an all-to-all turns the query, key and value
``[B, H, S / N, D]`` into ``[B, H / N, S, D]`` — all tokens of a contiguous shard of heads —,
attention runs, and a second all-to-all turns ``[B, H / N, S, D]`` back into ``[B, H, S / N, D]``.
That head shard is exactly what `Strategy.shard_heads` describes, so a per-head strategy runs
under Ulysses by attaching rank ``r``'s shard through the framework door::

    parallel = sequence_parallel(pipe.transformer)                       # this rank's Ulysses copy
    pipe.transformer = sparsify.attach(parallel, strategy.shard_heads(rank, world_size))

`sequence_parallel` returns a copy of the model that shares its weights (the model itself is
left as it was) with two additions, both through diffusers' own extension points:

* every attention module gets a `UlyssesAttentionProcessor` (diffusers' ``set_processor``) that
  runs the module's processor as it is and redistributes its scaled-dot-product attention call
  with ``torch.distributed.all_to_all_single`` (a ``TorchFunctionMode`` active for that one call;
  nothing is patched). Self-attention exchanges query, key and value; cross-attention, whose
  keys (text) are the same on every rank, runs locally on the rank's tokens — or, when the
  strategy makes it sparse, exchanges the query only and takes the rank's heads of the keys.
* forward hooks split the tokens at the entry of the transformer blocks and gather them after
  the last projection, where the model's `SequencePlan` says (read from the context-parallel
  plan diffusers models declare, ``_cp_plan``; or given explicitly).

`sparsify.attach` must come second: its processors wrap the Ulysses ones, so the attention they
see is the rank's head shard over the whole sequence. The collectives are PyTorch's own (gloo on
CPU, NCCL on GPU); nothing here opens sockets, and nothing is differentiated (inference only).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sparsify.errors import UnsupportedError
from sparsify.integrations.common import (RUNTIME_ATTRIBUTE, WrappingProcessor, attached_sites,
                                          processor_class_for, shared_weight_copy)

logger = logging.getLogger(__name__)

__all__ = ["SequenceGather", "SequencePlan", "SequenceSplit", "UlyssesAttentionProcessor", "heads_to_sequence",
           "sequence_parallel", "sequence_to_heads"]

_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


# -- the two all-to-alls --------------------------------------------------------------------------

def _world(process_group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UnsupportedError("Ulysses sequence parallelism needs an initialised torch.distributed process group; "
                               "call torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise UnsupportedError(f"this process (global rank {dist.get_rank()}) is not a member of the Ulysses process "
                               f"group; only its members build and run the sequence-parallel model")
    return rank, dist.get_world_size(process_group)


def sequence_to_heads(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """``[B, H, S/N, D]`` (this rank's tokens, every head) to ``[B, H/N, S, D]`` (every token, this rank's heads).

    Rank ``r`` holds tokens ``[r·S/N, (r+1)·S/N)`` before and heads ``[r·H/N, (r+1)·H/N)``
    after; one ``all_to_all_single`` over ``process_group`` (the default group when ``None``).

    Example:
        >>> shard = sequence_to_heads(torch.randn(1, 8, 256, 64))   # doctest: +SKIP
        >>> shard.shape                                             # on 2 ranks  # doctest: +SKIP
        torch.Size([1, 4, 512, 64])
    """
    import torch.distributed as dist

    _, world_size = _world(process_group)
    batch, heads, tokens, head_dim = tensor.shape
    if heads % world_size:
        raise UnsupportedError(f"{heads} heads do not split over {world_size} ranks (Ulysses gives each rank H/N "
                               f"heads); use a number of ranks that divides the heads")
    # Chunk j (heads of rank j) goes to rank j; what arrives from rank j is its tokens, in rank order.
    send = tensor.reshape(batch, world_size, heads // world_size, tokens, head_dim).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=process_group)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, heads // world_size, world_size * tokens, head_dim)


def heads_to_sequence(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """``[B, H/N, S, D]`` back to ``[B, H, S/N, D]``: the inverse of `sequence_to_heads`.

    Example:
        >>> back = heads_to_sequence(sequence_to_heads(x))            # doctest: +SKIP
        >>> torch.equal(back, x)                                      # doctest: +SKIP
        True
    """
    import torch.distributed as dist

    _, world_size = _world(process_group)
    batch, heads, tokens, head_dim = tensor.shape
    if tokens % world_size:
        raise UnsupportedError(f"{tokens} tokens do not split over {world_size} ranks")
    # Chunk j (the tokens of rank j) goes to rank j; what arrives from rank j is its heads, in rank order.
    send = tensor.reshape(batch, heads, world_size, tokens // world_size, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=process_group)
    return received.transpose(0, 1).reshape(batch, world_size * heads, tokens // world_size, head_dim)


# -- the attention processor ----------------------------------------------------------------------

class _UlyssesRoute(TorchFunctionMode):
    """Redistributes the first ``scaled_dot_product_attention`` of one processor call; everything else runs as is."""

    def __init__(self, processor: "UlyssesAttentionProcessor", module: torch.nn.Module):
        super().__init__()
        self.processor = processor
        self.module = module
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.calls:
            return func(*args, **kwargs)
        self.calls += 1
        call = dict(_SDPA_DEFAULTS)
        call.update(zip(_SDPA_PARAMETERS, args))
        call.update(kwargs)
        return self.processor.attend(self.module, call)


class UlyssesAttentionProcessor(WrappingProcessor):
    """A diffusers attention processor: the module's own processor, its attention over all tokens of a head shard.

    ``cross_attention`` says where the keys come from: ``False``, the sharded token sequence
    (query, key and value are exchanged); ``True``, a context every rank holds whole (text), so
    attention runs locally unless a sparse site is attached (then only the query is exchanged).
    Construct it with `processor_for` (it gives the wrapper the call signature of the processor
    it wraps, which diffusers reads to pass keyword arguments); `sequence_parallel` installs it.

    Example:
        >>> processor = UlyssesAttentionProcessor.processor_for(module.processor, cross_attention=False)
        ...                                                                     # doctest: +SKIP
    """

    def __init__(self, inner: Any, *, cross_attention: bool, process_group: Any = None):
        self.inner = inner
        self.cross_attention = cross_attention
        self.process_group = process_group

    @classmethod
    def processor_for(cls, inner: Any, *, cross_attention: bool,
                      process_group: Any = None) -> "UlyssesAttentionProcessor":
        """A wrapper of ``inner`` whose ``__call__`` has ``inner.__call__``'s signature."""
        wrapper = processor_class_for(UlyssesAttentionProcessor, type(inner), "Ulysses")
        return wrapper(inner, cross_attention=cross_attention, process_group=process_group)

    def __deepcopy__(self, memo: dict) -> "UlyssesAttentionProcessor":
        # A process group cannot be copied (nor pickled): copies of the model share it.
        return type(self)(copy.deepcopy(self.inner, memo), cross_attention=self.cross_attention,
                          process_group=self.process_group)

    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, *args, **kwargs)

    def _run(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        route = _UlyssesRoute(self, attn)
        with route:
            output = self.inner(attn, *args, **kwargs)
        if route.calls == 0:
            raise UnsupportedError(
                f"{type(attn).__name__}: its processor {type(self.inner).__name__} computed attention without torch's "
                f"scaled_dot_product_attention (another attention backend is set, or diffusers' own context "
                f"parallelism is on), so Ulysses cannot redistribute it; use the native backend "
                f"(model.reset_attention_backend()) and no enable_parallelism")
        return output

    def attend(self, module: torch.nn.Module, call: dict[str, Any]) -> torch.Tensor:
        """One attention call of ``module``: exchange, attend over the rank's heads (sparse when attached), exchange back."""
        runtime = module._modules.get(RUNTIME_ATTRIBUTE)
        if self.cross_attention and runtime is None:
            return F.scaled_dot_product_attention(**call)  # every rank holds the whole context: local and exact
        query, key, value = call["query"], call["key"], call["value"]
        rank, world_size = _world(self.process_group)
        heads, kv_heads = query.shape[1], key.shape[1]
        name = runtime.site.name if runtime is not None else type(module).__name__
        if heads % world_size or kv_heads % world_size:
            raise UnsupportedError(
                f"{name}: {heads} query / {kv_heads} key-value heads do not split over {world_size} ranks; Ulysses "
                f"gives each rank an equal share of the heads (use a number of ranks that divides both)")
        if call["attn_mask"] is not None:
            raise UnsupportedError(f"{name}: attention with an attention mask is not supported under Ulysses sequence "
                                   f"parallelism (the mask would have to be redistributed with the tokens)")
        if runtime is not None and (runtime.site.num_heads, runtime.site.num_kv_heads) != (heads // world_size,
                                                                                           kv_heads // world_size):
            raise UnsupportedError(
                f"site {name!r} runs head-sharded over {world_size} ranks ({heads // world_size} of its {heads} "
                f"heads on each), but the attached strategy has {runtime.site.num_heads} heads for it: attach "
                f"this rank's shard, sparsify.attach(parallel_model, strategy.shard_heads(rank, world_size))")
        query = sequence_to_heads(query, self.process_group)
        if self.cross_attention:  # the same keys on every rank: take this rank's heads
            shard = kv_heads // world_size
            key, value = key[:, rank * shard:(rank + 1) * shard], value[:, rank * shard:(rank + 1) * shard]
        else:
            key, value = sequence_to_heads(key, self.process_group), sequence_to_heads(value, self.process_group)
        # An attached site's processor (sparsify.attach, the outer mode) takes this call.
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=call["dropout_p"],
                                                is_causal=call["is_causal"], scale=call["scale"],
                                                enable_gqa=call["enable_gqa"])
        return heads_to_sequence(output, self.process_group)


# -- where the tokens are split and gathered ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    """Split a tensor along its token dimension ``dim`` at ``module`` (``*`` matches any one path component).

    ``key`` names an input (a ``forward`` parameter) or, with ``output=True``, an output index.
    Tensors whose number of dimensions is not ``expected_dims`` (when given) pass unsplit.
    """

    module: str
    key: str | int
    dim: int
    expected_dims: int | None = None
    output: bool = False


@dataclasses.dataclass(frozen=True)
class SequenceGather:
    """Gather output ``index`` of ``module`` from every rank along its token dimension ``dim``."""

    module: str
    index: int
    dim: int
    expected_dims: int | None = None


@dataclasses.dataclass(frozen=True)
class SequencePlan:
    """Where a model's tokens are split over the ranks and gathered back.

    Example:
        >>> plan = SequencePlan.from_diffusers(WanTransformer3DModel)   # doctest: +SKIP
        >>> [split.module for split in plan.splits]                      # doctest: +SKIP
        ['rope', 'rope', 'blocks.0', '']
    """

    splits: tuple[SequenceSplit, ...]
    gathers: tuple[SequenceGather, ...]

    @classmethod
    def from_diffusers(cls, model: torch.nn.Module | type) -> "SequencePlan":
        """The plan a diffusers model declares for context parallelism (its ``_cp_plan``)."""
        declared = getattr(model, "_cp_plan", None)
        name = model.__name__ if isinstance(model, type) else type(model).__name__
        if not isinstance(declared, Mapping) or not declared:
            raise UnsupportedError(
                f"{name} declares no context-parallel plan (_cp_plan): sparsify cannot tell where to split its tokens; "
                f"pass plan=SequencePlan(splits=..., gathers=...) to sequence_parallel")
        splits, gathers = [], []
        for module, entry in declared.items():
            if isinstance(entry, Mapping):
                for key, item in entry.items():
                    splits.append(SequenceSplit(module, key, item.split_dim, item.expected_dims,
                                                bool(getattr(item, "split_output", False))))
            else:
                for index, item in enumerate(entry if isinstance(entry, (list, tuple)) else [entry]):
                    if item is not None:
                        gathers.append(SequenceGather(module, index, item.gather_dim, item.expected_dims))
        if not splits or not gathers:
            raise UnsupportedError(f"{name}'s context-parallel plan splits or gathers nothing: {dict(declared)}")
        return cls(tuple(splits), tuple(gathers))


def _matching_modules(model: torch.nn.Module, pattern: str) -> list[tuple[str, torch.nn.Module]]:
    if pattern == "":
        return [("", model)]
    parts = pattern.split(".")
    found = []
    for path, module in model.named_modules():
        names = path.split(".") if path else []
        if len(names) == len(parts) and all(p in ("*", n) for p, n in zip(parts, names)):
            found.append((path, module))
    return found


class _Sharding:
    """What the hooks share: the process group and how to split or gather one tensor."""

    def __init__(self, process_group: Any):
        self.process_group = process_group

    def __deepcopy__(self, memo: dict) -> "_Sharding":
        return self  # the process group is shared by every copy of the model

    def split(self, tensor: torch.Tensor, dim: int, where: str) -> torch.Tensor:
        rank, world_size = _world(self.process_group)
        length = tensor.shape[dim]
        if length % world_size:
            raise UnsupportedError(f"{where}: {length} tokens do not split into {world_size} equal shards (Ulysses "
                                   f"sequence parallelism); choose a video size whose token count divides by "
                                   f"{world_size}, or use a number of ranks that divides {length}")
        return tensor.chunk(world_size, dim=dim)[rank].contiguous()

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        import torch.distributed as dist

        _, world_size = _world(self.process_group)
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(pieces, tensor, group=self.process_group)
        return torch.cat(pieces, dim=dim)


class _SplitInputs:
    """Forward pre-hook: split the named inputs of one module."""

    def __init__(self, sharding: _Sharding, splits: list[SequenceSplit], module: torch.nn.Module, path: str):
        self.sharding = sharding
        self.splits = splits
        self.path = path or "the model"
        self.parameters = list(inspect.signature(module.forward).parameters)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = list(args)
        for split in self.splits:
            where = f"input {split.key!r} of {self.path}"
            if split.key in kwargs:
                kwargs[split.key] = self._split(kwargs[split.key], split, where)
            elif split.key in self.parameters and self.parameters.index(split.key) < len(args):
                index = self.parameters.index(split.key)
                args[index] = self._split(args[index], split, where)
        return tuple(args), kwargs

    def _split(self, value: Any, split: SequenceSplit, where: str) -> Any:
        if not isinstance(value, torch.Tensor) or (split.expected_dims is not None and value.dim() != split.expected_dims):
            return value
        return self.sharding.split(value, split.dim, where)


class _SplitOutputs:
    """Forward hook: split the outputs at the given indices of one module."""

    def __init__(self, sharding: _Sharding, splits: list[SequenceSplit], path: str):
        self.sharding = sharding
        self.splits = splits
        self.path = path or "the model"

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        single = isinstance(output, torch.Tensor)
        outputs = [output] if single else list(output)
        for split in self.splits:
            value = outputs[split.key]
            if isinstance(value, torch.Tensor) and (split.expected_dims is None or value.dim() == split.expected_dims):
                outputs[split.key] = self.sharding.split(value, split.dim, f"output {split.key} of {self.path}")
        return outputs[0] if single else type(output)(outputs)


class _GatherOutputs:
    """Forward hook: gather the outputs at the given indices of one module from every rank."""

    def __init__(self, sharding: _Sharding, gathers: list[SequenceGather]):
        self.sharding = sharding
        self.gathers = gathers

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        single = isinstance(output, torch.Tensor)
        outputs = [output] if single else list(output)
        for gather in self.gathers:
            value = outputs[gather.index]
            if isinstance(value, torch.Tensor) and (gather.expected_dims is None or value.dim() == gather.expected_dims):
                outputs[gather.index] = self.sharding.gather(value, gather.dim)
        return outputs[0] if single else type(output)(outputs)


def _is_attention_module(module: torch.nn.Module) -> bool:
    return callable(getattr(module, "set_processor", None)) and callable(getattr(module, "get_processor", None))


def sequence_parallel(model: torch.nn.Module, process_group: Any = None, *,
                      plan: SequencePlan | None = None) -> torch.nn.Module:
    """This rank's Ulysses sequence-parallel copy of a diffusers model (weights shared, ``model`` unchanged).

    Every rank calls it with the same model (same weights) and the same full inputs; the copy
    splits the tokens where ``plan`` says (default: the model's declared context-parallel plan),
    runs every attention over all tokens of the rank's ``H/N`` heads (`UlyssesAttentionProcessor`)
    and gathers the tokens again, so every rank returns the whole output, equal to ``model``'s.
    Attach a sparsity strategy afterwards, rank ``r``'s head shard of it::

        parallel = sequence_parallel(transformer)
        sparse = sparsify.attach(parallel, strategy.shard_heads(rank, world_size))

    Refuses a model that `sparsify.attach` has already given sparse sites (attach comes second)
    and a model without attention modules or plan. Inference only (the all-to-alls are not
    differentiated).

    Example:
        >>> torch.distributed.init_process_group()                              # doctest: +SKIP
        >>> parallel = sequence_parallel(pipe.transformer)                      # doctest: +SKIP
        >>> output = parallel(**inputs)[0]             # every rank: the full output    # doctest: +SKIP
    """
    rank, world_size = _world(process_group)
    if attached_sites(model):
        raise UnsupportedError(
            f"{type(model).__name__} already runs sparse sites (sparsify.attach): make the sequence-parallel copy of "
            f"the original model first, then attach this rank's head shard to it: "
            f"sparsify.attach(sequence_parallel(model), strategy.shard_heads(rank, world_size))")
    plan = plan or SequencePlan.from_diffusers(model)
    attention = {path: module for path, module in model.named_modules() if _is_attention_module(module)}
    if not attention:
        raise UnsupportedError(f"{type(model).__name__} has no diffusers attention modules (get_processor / "
                               f"set_processor) to run Ulysses attention in")
    unknown = [path for path, module in attention.items() if not isinstance(getattr(module, "is_cross_attention", None),
                                                                            bool)]
    if unknown:
        raise UnsupportedError(f"attention modules {unknown[:5]} do not say whether they attend to the token sequence "
                               f"or to a context (is_cross_attention); Ulysses needs to know which to redistribute")
    parallel = shared_weight_copy(model)
    modules = dict(parallel.named_modules())
    for path in attention:
        module = modules[path]
        module.set_processor(UlyssesAttentionProcessor.processor_for(
            module.get_processor(), cross_attention=module.is_cross_attention, process_group=process_group))
    sharding = _Sharding(process_group)
    hooked = 0
    for pattern in dict.fromkeys([s.module for s in plan.splits] + [g.module for g in plan.gathers]):
        found = _matching_modules(parallel, pattern)
        if not found:
            raise UnsupportedError(f"the sequence plan names module {pattern!r}, which {type(model).__name__} does "
                                   f"not have")
        inputs = [s for s in plan.splits if s.module == pattern and not s.output]
        outputs = [s for s in plan.splits if s.module == pattern and s.output]
        gathers = [g for g in plan.gathers if g.module == pattern]
        for path, module in found:
            if inputs:
                module.register_forward_pre_hook(_SplitInputs(sharding, inputs, module, path), with_kwargs=True)
            if outputs:
                module.register_forward_hook(_SplitOutputs(sharding, outputs, path))
            if gathers:
                module.register_forward_hook(_GatherOutputs(sharding, gathers))
            hooked += 1
    logger.info("rank %d of %d: Ulysses copy of %s, %d attention modules, tokens split/gathered at %d modules", rank,
                world_size, type(model).__name__, len(attention), hooked)
    return parallel
