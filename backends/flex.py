"""The `flex` backend: PyTorch FlexAttention driven by a `BlockMask` made from the runtime mask's block lists.

The runtime mask's full and partial lists become a FlexAttention ``BlockMask`` directly
(``BlockMask.from_kv_blocks``: the same layout). The ``mask_mod`` is exact on its own: it reads
block membership from the kept-block table (``bool [batch, heads, q_blocks, k_blocks]``, blocks²
not tokens²), the causal diagonal at the mask's query offset and the user's bool ``attn_mask``,
all captured tensors (never per-call Python numbers, which FlexAttention would compile into the
kernel and recompile for). So every path FlexAttention may take — its fused kernel, which visits
the kept blocks only and applies the ``mask_mod`` to partial ones, or its unfused reference,
which applies the ``mask_mod`` to every element — gives the block-sparse answer. An additive
``attn_mask`` and a softcap are a ``score_mod``. Sequence ends that are not block multiples are
masked by FlexAttention itself.

The compiled ``flex_attention`` callables belong to the backend instance: one per *call class*
(dtype, head dims, block size, GQA, which mods, kernel options; lengths, batch and heads are
dynamic), in a bounded cache. Each is compiled with ``fullgraph=True`` and a recompile budget of
its own, so it never falls back to FlexAttention's unfused, seq × seq path: a call that would is
refused with an error that says what to do. CUDA only.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import itertools
import types

import torch

from sparsify.backends.base import Backend, BackendFeatures, BackendPlan, register_backend
from sparsify.errors import UnsupportedError
from sparsify.block_mask import RuntimeBlockMask

__all__ = ["FlexBackend", "FlexPlan", "COMPILED_CALLABLES", "RECOMPILE_LIMIT"]

#: Compiled ``flex_attention`` callables a backend instance keeps (one per call class).
COMPILED_CALLABLES = 16
#: Recompilations one compiled callable may make (new lengths turn dynamic after the first).
RECOMPILE_LIMIT = 32


try:
    from torch.nn.attention import flex_attention as flex_module
except ImportError:  # torch without FlexAttention
    flex_module = None


@dataclasses.dataclass
class FlexPlan(BackendPlan):
    """The flex backend's plan: the ``BlockMask`` of the runtime mask (no user mask) and the tensors its mods read."""

    block_mask: object = None
    kept: torch.Tensor | None = None        # bool [batch, heads, q_blocks, k_blocks], captured by the mask_mod
    q_offset: torch.Tensor | None = None    # 0-d tensor captured by the mask_mod
    not_causal: torch.Tensor | None = None  # 0-d bool tensor: True lifts the causal condition


@register_backend("flex")
class FlexBackend(Backend):
    """Block-sparse attention through FlexAttention (``torch.nn.attention.flex_attention``); CUDA, forward only.

    Example:
        >>> backend = get_backend("flex")                                   # doctest: +SKIP
        >>> out = backend.attention(q, k, v, mask)                          # doctest: +SKIP
    """

    features = BackendFeatures(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                               max_head_dim=256, sinks=False, training=False)
    auto_priority = 30
    install_hint = "FlexAttention ships with torch >= 2.5 on CUDA"

    def __init__(self) -> None:
        self._compiled: collections.OrderedDict[tuple, object] = collections.OrderedDict()
        self._compiled_names = itertools.count()

    def availability(self, device: torch.device | str | None = None) -> str | None:
        if flex_module is None:
            return f"torch {torch.__version__} has no FlexAttention"
        if device is None:
            return None if torch.cuda.is_available() else "no CUDA device in this process"
        return super().availability(device)

    def compiled_flex_attention(self, call_class: tuple):
        """The instance's compiled ``flex_attention`` for one call class (created on first use; bounded, LRU)."""
        compiled = self._compiled.get(call_class)
        if compiled is None:
            compiled = _compile_flex_attention(f"flex_attention_{id(self):x}_{next(self._compiled_names)}")
            if len(self._compiled) >= COMPILED_CALLABLES:
                self._compiled.popitem(last=False)
            self._compiled[call_class] = compiled
        else:
            self._compiled.move_to_end(call_class)
        return compiled

    def prepare(self, mask: RuntimeBlockMask, *, q_shape, k_shape, v_shape, dtype, device) -> FlexPlan:
        device = torch.device(device)
        if device.type != "cuda":
            raise UnsupportedError(f"the flex backend needs CUDA tensors, got {device.type}")
        return build_plan(mask, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape, dtype=dtype, device=device)

    def run(self, plan: FlexPlan, q, k, v, *, attn_mask=None, scale=None, softcap=None, sinks=None) -> torch.Tensor:
        plan.check_call(q, k, v, self.name)
        if sinks is not None:
            raise UnsupportedError("the flex backend does not support learned attention sinks; use backend='torch' "
                                   "or 'triton'")
        arguments = flex_arguments(plan, q, k, v, attn_mask=attn_mask, softcap=softcap)
        call_class = (q.dtype, q.shape[-1], v.shape[-1], plan.mask.block_size, arguments["enable_gqa"],
                      attn_mask is not None and attn_mask.dtype == torch.bool,
                      attn_mask is not None and attn_mask.dtype != torch.bool, bool(softcap),
                      tuple(sorted((arguments["kernel_options"] or {}).items())), str(q.device))
        compiled = self.compiled_flex_attention(call_class)
        try:
            with _recompile_budget():
                return compiled(arguments["q"], arguments["k"], arguments["v"], arguments["score_mod"],
                                arguments["block_mask"], scale, arguments["enable_gqa"], arguments["kernel_options"])
        except Exception as error:
            limit_hit = type(error).__name__ == "FailOnRecompileLimitHit" or (
                type(error).__name__ == "Unsupported" and "limit" in str(error))  # older torch's wording
            if not limit_hit:
                raise
            raise UnsupportedError(
                f"flex backend: FlexAttention's compiled kernel for {call_class[0]} inputs (head dim {call_class[1]}, "
                f"block size {call_class[3]}) hit its recompile limit ({RECOMPILE_LIMIT}); it is refused rather "
                f"than run on FlexAttention's unfused path (seq x seq memory). Fewer distinct call shapes per "
                f"backend instance, torch._dynamo.reset(), or backend='triton' avoid it") from error


def build_plan(mask: RuntimeBlockMask, *, q_shape, k_shape, v_shape, dtype, device) -> FlexPlan:
    """The flex plan of ``mask`` for one call shape, on any device (the backend runs it on CUDA only).

    Example:
        >>> mask = RuntimeBlockMask.dense(2, block_size=16, q_len=32, k_len=32, causal=True)
        >>> build_plan(mask, q_shape=(1, 2, 32, 8), k_shape=(1, 2, 32, 8), v_shape=(1, 2, 32, 8),
        ...            dtype=torch.float32, device="cpu").kept.shape
        torch.Size([1, 2, 2, 2])
    """
    device = torch.device(device)
    if q_shape[1] != mask.num_heads or q_shape[2] != mask.q_len or k_shape[2] != mask.k_len:
        raise UnsupportedError(
            f"flex backend: q {tuple(q_shape)} / k {tuple(k_shape)} do not match the mask (heads="
            f"{mask.num_heads}, q_len={mask.q_len}, k_len={mask.k_len})")
    mask = mask.to(device)
    if mask.batch not in (1, q_shape[0]):
        raise UnsupportedError(f"flex backend: the mask holds {mask.batch} batch elements, the call {q_shape[0]}")
    kept = mask.to_block_masks().expand(q_shape[0], -1, -1, -1)
    offset = torch.tensor(mask.q_offset, device=device)
    not_causal = torch.tensor(not mask.causal, device=device)
    block_mask = _from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
                                 mask, _block_mask_mod(kept, mask.block_size, offset, not_causal))
    return FlexPlan(mask=mask, q_shape=tuple(q_shape), k_shape=tuple(k_shape), v_shape=tuple(v_shape), dtype=dtype,
                    device=device, block_mask=block_mask, kept=kept, q_offset=offset, not_causal=not_causal)


def flex_arguments(plan: FlexPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   attn_mask: torch.Tensor | None = None, softcap: float | None = None) -> dict:
    """The keyword arguments of ``flex_attention`` for one call under ``plan`` (q, k, v included).

    Example:
        >>> arguments = flex_arguments(plan, q, k, v)                           # doctest: +SKIP
        >>> flex_attention(**arguments)                                        # doctest: +SKIP
    """
    mask = plan.mask
    batch, heads, q_len, _ = q.shape
    k, v, enable_gqa = _kv_for_heads(k, v, mask)
    score_mod = _softcap_score_mod(torch.tensor(float(softcap), device=q.device)) if softcap else None
    block_mask = plan.block_mask
    if attn_mask is not None:
        block_mask, score_mod = _masked_block_mask(plan, attn_mask.expand(batch, heads, q_len, mask.k_len),
                                                   score_mod)
    options = None
    if mask.block_size < 128 or score_mod is not None:
        # FlexAttention's tiles must not exceed the sparse block; with a score_mod reading
        # a bias its default 128-wide tiles ran out of shared memory (H200, torch 2.11).
        tile = min(64, mask.block_size)
        options = {"BLOCK_M": tile, "BLOCK_N": tile}
    return {"q": q, "k": k, "v": v, "score_mod": score_mod, "block_mask": block_mask, "enable_gqa": enable_gqa,
            "kernel_options": options}


def _call_flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options):
    """``flex_attention``, called from a function of ours: each compiled callable runs a copy of this code."""
    return flex_module.flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                      enable_gqa=enable_gqa, kernel_options=kernel_options)


def _compile_flex_attention(name: str):
    """A compiled ``flex_attention`` that raises instead of falling back to eager (and FlexAttention's unfused path).

    Dynamo keeps compiled variants, and counts recompilations against its limit, per *code
    object*: every ``torch.compile`` of ``flex_attention`` itself shares one budget (8 by
    default) across all backend instances and sites of the process, and falls back to eager once
    it is spent. So each callable compiles its own copy of `_call_flex_attention`'s code (named
    ``name``): its own cache, its own budget (`RECOMPILE_LIMIT`).
    """
    template = _call_flex_attention
    code = template.__code__.replace(co_name=name)
    function = types.FunctionType(code, template.__globals__, name, template.__defaults__, template.__closure__)
    settings = {"fullgraph": True}
    if "recompile_limit" in _compile_parameters():
        settings["recompile_limit"] = RECOMPILE_LIMIT
    return torch.compile(function, **settings)


def _recompile_budget():
    """Where ``torch.compile`` takes no per-callable ``recompile_limit`` (older torch): the budget for this call only."""
    if "recompile_limit" in _compile_parameters():
        return contextlib.nullcontext()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    return config.patch(**{name: RECOMPILE_LIMIT})


@functools.cache
def _compile_parameters() -> frozenset[str]:
    """The keyword arguments this torch's ``torch.compile`` takes (per-callable recompile budgets are recent)."""
    return frozenset(inspect.signature(torch.compile).parameters)


def _block_mask_mod(kept: torch.Tensor, block_size: int, offset: torch.Tensor, not_causal: torch.Tensor):
    """The exact element mask of a runtime mask: its kept blocks, and the causal diagonal at the query offset."""
    def block_sparse(b, h, q_idx, kv_idx):
        return kept[b, h, q_idx // block_size, kv_idx // block_size] & ((q_idx + offset >= kv_idx) | not_causal)
    return block_sparse


def _softcap_score_mod(softcap: torch.Tensor):
    def capped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap
    return capped


def _kv_for_heads(k: torch.Tensor, v: torch.Tensor, mask: RuntimeBlockMask):
    """(k, v, enable_gqa): native GQA for the standard ``h // group`` mapping, else gathered."""
    heads, kv_heads = mask.num_heads, k.shape[1]
    if mask.kv_heads is not None:  # host ints: no device read
        standard = heads % kv_heads == 0 and all(kv == h // (heads // kv_heads) for h, kv in enumerate(mask.kv_heads))
    else:
        index = mask.kv_head_index.to(k.device)
        standard = heads % kv_heads == 0 and torch.equal(index, torch.arange(heads, device=k.device)
                                                         // (heads // kv_heads))
    if standard:
        return k, v, kv_heads != heads
    index = mask.kv_head_index.to(k.device)
    return k.index_select(1, index), v.index_select(1, index), False


def _full_width(indices: torch.Tensor | None, k_blocks: int) -> torch.Tensor | None:
    """Index rows padded to ``k_blocks`` slots: FlexAttention reads the key-block count off the last dim."""
    if indices is None or indices.shape[-1] == k_blocks:
        return indices
    pad = indices[..., -1:].expand(*indices.shape[:-1], k_blocks - indices.shape[-1])
    return torch.cat([indices, pad], -1).contiguous()


def _from_kv_blocks(counts, indices, full_counts, full_indices, mask: RuntimeBlockMask, mask_mod):
    module = flex_module
    indices, full_indices = _full_width(indices, mask.k_blocks), _full_width(full_indices, mask.k_blocks)
    kwargs = {}
    if "compute_q_blocks" in inspect.signature(module.BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: the transposed tables are not needed
    return module.BlockMask.from_kv_blocks(
        counts, indices, full_counts, full_indices, BLOCK_SIZE=mask.block_size,
        mask_mod=mask_mod, seq_lengths=(mask.q_len, mask.k_len), **kwargs,
    )


def _masked_block_mask(plan: FlexPlan, attn_mask: torch.Tensor, score_mod):
    """(block_mask, score_mod) with every kept block partial and the user's mask applied per element."""
    mask = plan.mask
    blocks = _block_mask_mod(plan.kept, mask.block_size, plan.q_offset, plan.not_causal)
    if attn_mask.dtype == torch.bool:
        def mask_mod(b, h, q_idx, kv_idx):
            return blocks(b, h, q_idx, kv_idx) & attn_mask[b, h, q_idx, kv_idx]
        new_score_mod = score_mod
    else:
        mask_mod = blocks
        inner = score_mod

        def new_score_mod(score, b, h, q_idx, kv_idx):
            if inner is not None:
                score = inner(score, b, h, q_idx, kv_idx)
            return score + attn_mask[b, h, q_idx, kv_idx].to(score.dtype)
    counts, indices = mask.merged()
    return _from_kv_blocks(counts, indices, None, None, mask, mask_mod), new_score_mod
