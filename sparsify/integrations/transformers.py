"""The transformers door: a strategy runs inside ``PreTrainedModel`` (``generate`` included) through ``AttentionInterface``.

`attach_transformers` registers one attention function, ``"sparsify"``, in transformers' own
registries (``AttentionInterface`` for the attention, ``AttentionMaskInterface`` for its masks,
which are SDPA's, except that a purely causal chunk at the end of a growing cache gets none: its
offset says it all, `sparsify_causal_mask`), makes a copy of the model that shares every parameter and buffer, gives
each attention module of the copy that the strategy names its `SparseAttention` as a child
module, and switches the copy (not the model) to ``attn_implementation="sparsify"`` with
``set_attn_implementation``. The user's model keeps its implementation, weights and outputs.

The registered function runs per call:

* a module without a `SparseAttention` (every head dense, or no site in the strategy) runs
  transformers' own SDPA attention, unchanged;
* a prefill (or a chunk of queries at least one block long) runs the site's heads — dense via
  SDPA, sparse via the site's backend, skipped as zeros — with the query offset
  ``k_len - q_len`` of keys that end at the last query (the dynamic cache, the default);
  transformers' mask (padding, sliding windows) applies on top;
* a decode step (a query shorter than one block against a longer cache) runs dense SDPA
  (``decode="dense"``, the default: one query row costs little and is exact), the
  pattern's rows at that offset (``decode="sparse"``; with a mask — a static cache, padding — the
  rows at the step's slot read from the mask on the device, `pattern_rows_decode`), or — with a decode pattern such as
  ``decode=query_aware_decode(0.1)`` — the cache pages that pattern selects per step and head
  from the query (`sparsify.runtime.decode`, Quest's idea). The decoder is a child module of each
  causal self-attention module of the copy (``sparse_decoder``), dense sites included; it owns the
  page summaries of that layer's cache, which prefills (``use_cache=True``) and decode steps update
  as the cache fills.

Prefill in chunks works through any cache: a chunk is a query range at its offset. A
``StaticCache`` hands attention its whole capacity, the unused slots hidden by the mask; the
door reads the chunk's end from the mask (one small host read per layer and chunk) and attends
to the filled slots only. Decode steps read nothing on the host, so a compiled decode step with
a ``StaticCache`` is one graph for every step.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import torch

from sparsify.patterns import QueryAwareDecode
from sparsify.errors import StrategyError, UnsupportedError
from sparsify.integrations.common import (
    RUNTIME_ATTRIBUTE,
    build_runtime,
    check_call_shapes,
    check_fingerprints,
    install_runtime,
    load_strategy,
    match_sites,
    read_attribute,
    shared_weight_copy,
)
from sparsify.block_mask import causal_element_mask
from sparsify.runtime.decode import QueryAwareDecoder, pattern_rows_decode, visible_key_end
from sparsify.site import AttentionSite
from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION_IMPLEMENTATION", "DECODE_MODES", "attach_transformers", "attention_sites", "cache_keyword",
           "returned_cache", "sparsify_attention_forward", "sparsify_causal_mask"]

#: The name the door registers in ``AttentionInterface`` and ``AttentionMaskInterface``.
ATTENTION_IMPLEMENTATION = "sparsify"
DECODE_MODES = ("dense", "sparse")
#: Attribute of an attached site's `SparseAttention` holding its decode mode.
DECODE_ATTRIBUTE = "decode_mode"
#: Name under which an attention module of the attached copy holds its `QueryAwareDecoder`.
DECODER_ATTRIBUTE = "sparse_decoder"


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model``'s ``forward`` takes its key/value cache: ``"cache"`` or ``"past_key_values"``.

    transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old name is deprecated there),
    and a forward that predates the rename swallows ``cache=`` into its ``**kwargs`` without a word:
    every chunk or decode step would then run without the cache. Pass the cache under this name.
    Read off the first module of ``model`` (itself first) whose ``forward`` names either, so
    wrappers that pass keywords through (``torch.compile``, DDP, PEFT) answer for what they wrap.
    Reading a signature takes tens of microseconds: ask once, not per step.

    Example:
        >>> keyword = cache_keyword(model)                                          # doctest: +SKIP
        >>> output = model(ids, use_cache=True)                                      # doctest: +SKIP
        >>> step = model(token, **{keyword: returned_cache(output)})                 # doctest: +SKIP
    """
    for module in getattr(model, "_orig_mod", model).modules():
        parameters = inspect.signature(module.forward).parameters
        for keyword in ("cache", "past_key_values"):
            if keyword in parameters:
                return keyword
    raise TypeError(f"no module of {type(getattr(model, '_orig_mod', model)).__name__} takes 'cache' or "
                    f"'past_key_values' in its forward: it is not a transformers model with a key/value cache")


def returned_cache(output: Any) -> Any:
    """The key/value cache a transformers model call returned (``output.cache``, or ``past_key_values`` before 5.2x).

    Example:
        >>> cache = returned_cache(model(ids, use_cache=True))   # doctest: +SKIP
    """
    if isinstance(output, tuple):
        raise TypeError("returned_cache reads a model output by field name and got a tuple: call the model with "
                        "return_dict=True (the default)")
    return getattr(output, "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values")


def sparsify_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``"sparsify"`` attention function of transformers' ``AttentionInterface``.

    Same contract as transformers' ``sdpa_attention_forward``: ``query`` ``[B, H, Sq, D]``,
    ``key``/``value`` ``[B, Hkv, Sk, D]`` (the cache included), ``attention_mask`` ``None`` or 4-D;
    returns ``([B, Sq, H, Dv], None)``.

    Example:
        >>> attached = sparsify.attach(model, strategy)       # registers it  # doctest: +SKIP
        >>> attached.config._attn_implementation             # doctest: +SKIP
        'sparsify'
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    runtime = module._modules.get(RUNTIME_ATTRIBUTE)
    decoder = module._modules.get(DECODER_ATTRIBUTE)
    if runtime is None and decoder is None:
        return sdpa_attention_forward(module, query, key, value, _chunk_mask(module, query, key, attention_mask),
                                      dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if runtime is not None:
        if dropout:
            raise UnsupportedError(f"site {runtime.site.name!r}: attention dropout ({dropout}) is not supported by "
                                   f"sparse attention; call model.eval(), or set the config's attention dropout to 0 "
                                   f"to train")
        check_call_shapes(runtime, query, key, framework="transformers")
    original = (key, value, attention_mask)
    q_len, k_len = query.shape[2], key.shape[2]
    causal = runtime.site.causal if runtime is not None else True      # decoders sit on causal self-attention only
    block_size = runtime.block_size if runtime is not None else decoder.block_size
    decoding = k_len > q_len and q_len < block_size
    if decoding:
        if decoder is not None:
            output = decoder(query, key, value, attention_mask, scaling)
            if runtime is not None and runtime.skipped_heads.numel():
                output = output.index_fill(1, runtime.skipped_heads, 0)
            return output.transpose(1, 2).contiguous(), None
        if _decode_mode(module) == "dense":
            return sdpa_attention_forward(module, query, key, value, _chunk_mask(module, query, key, attention_mask),
                                          dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        if attention_mask is not None:
            # A static cache (or padding): the step's slot is on the device only, so are the pattern rows it reads.
            output = pattern_rows_decode(runtime, query, key, value, attention_mask, scaling)
            return output.transpose(1, 2).contiguous(), None
    elif causal and k_len > q_len and attention_mask is not None:
        # A prefill chunk through a cache, with a mask (padding, or a static cache): the filled slots end at the
        # last slot the last query row sees (a static cache's capacity is longer; a dynamic cache ends there).
        # Without a mask (`sparsify_causal_mask` skips pure causal ones) the keys end at the last query.
        end = int(visible_key_end(attention_mask, k_len))
        if end < k_len:
            key, value, k_len, attention_mask = key[:, :, :end], value[:, :, :end], end, attention_mask[..., :end]
    if decoder is not None and not decoding and kwargs.get("use_cache"):
        decoder.observe_prefill(key, k_len - q_len, k_len)
    if runtime is None:
        key, value, attention_mask = original
        return sdpa_attention_forward(module, query, key, value, _chunk_mask(module, query, key, attention_mask),
                                      dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    site = runtime.site
    q_offset = k_len - q_len if site.is_self_attention else 0
    if attention_mask is not None and attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        attention_mask = attention_mask.bool()
    output = runtime.attend(query, key, value, attention_mask, scaling, is_causal=causal, q_offset=q_offset,
                            softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
    return output.transpose(1, 2).contiguous(), None


def _chunk_mask(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask SDPA needs for a dense call: a causal chunk whose mask `sparsify_causal_mask` skipped gets its
    bottom-right causal mask back (SDPA's ``is_causal`` aligns top-left); everything else keeps its own."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < q_len < k_len and getattr(module, "is_causal", False):
        return causal_element_mask(q_len, k_len, k_len - q_len, query.device)
    return attention_mask


def _decode_mode(module: torch.nn.Module) -> str:
    return getattr(module._modules[RUNTIME_ATTRIBUTE], DECODE_ATTRIBUTE, "dense")


def register_attention_implementation() -> None:
    """Register ``"sparsify"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, sparsify_attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sparsify_causal_mask)


def sparsify_causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                         mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                         local_size: int | None = None, allow_is_causal_skip: bool = True,
                         **kwargs: Any) -> torch.Tensor | None:
    """The ``"sparsify"`` mask function of ``AttentionMaskInterface``: SDPA's masks, skipped where a query offset says it all.

    A chunk of queries at the end of a growing cache (``q_offset + q_length == kv_length``), with no
    padding and nothing but causality to mask, gets no mask (``None``): the attention function reads
    the chunk's offset from the lengths, and the sparse kernels run without a ``q x k`` element mask
    (a 2 GB tensor for a 16K chunk at 128K). A static cache's calls keep an explicit mask — that is how
    the attention function finds the filled slots — and everything else is ``sdpa_mask``'s.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    bottom_right = isinstance(q_offset, int) and kv_offset == 0 and q_offset + q_length == kv_length
    if (allow_is_causal_skip and bottom_right and mask_function is causal_mask_function and local_size is None
            and not torch.compiler.is_compiling()
            and (attention_mask is None or bool(attention_mask[:, :kv_length].all()))):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip and bottom_right, **kwargs)


def _module_readout(module: torch.nn.Module) -> dict[str, Any]:
    """What an attention module says about its shape (transformers' common attribute names; missing ones are None)."""
    heads = read_attribute(module, ("num_heads", "num_attention_heads", "n_head"),
                           config_names=("num_attention_heads", "n_head"))
    kv_heads = read_attribute(module, ("num_key_value_heads", "num_kv_heads"))
    groups = getattr(module, "num_key_value_groups", None)
    if kv_heads is None and isinstance(heads, int) and isinstance(groups, int) and groups > 0:
        kv_heads = heads // groups
    cross = getattr(module, "is_cross_attention", None)
    causal = getattr(module, "is_causal", None)
    readout = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": getattr(module, "head_dim", None),
               "causal": bool(causal) if isinstance(causal, bool) else None,
               "kind": None if cross is None else ("cross" if cross else "self")}
    return {key: value for key, value in readout.items() if isinstance(value, (int, bool, str))}


def attention_sites(model: torch.nn.Module, *, tokens: int = 4096) -> list[AttentionSite]:
    """The attention sites of a transformers model read off its modules (no graph capture), for `Strategy` builders.

    An attention module is one that says whether it is causal and how many heads of which size it
    has (transformers' attention classes do); its site is named by its module path, as graph capture
    names it, and recorded at ``tokens`` tokens (masks are built per length at run time anyway).
    Capture (`sparsify.find_attention`) finds what this cannot: attentions without such attributes.

    Example:
        >>> sites = attention_sites(model)                                      # doctest: +SKIP
        >>> strategy = sparsify.Strategy.uniform(sites, patterns.sliding_window(4096), block_size=128)  # doctest: +SKIP
    """
    sites = []
    for name, module in model.named_modules():
        readout = _module_readout(module)
        if not name or "causal" not in readout or not {"num_heads", "num_kv_heads", "head_dim"} <= set(readout):
            continue
        sites.append(AttentionSite(name, len(sites), num_heads=readout["num_heads"],
                                   num_kv_heads=readout["num_kv_heads"], head_dim=readout["head_dim"], q_len=tokens,
                                   k_len=tokens, causal=readout["causal"],
                                   is_self_attention=readout.get("kind", "self") == "self",
                                   module_type=f"{type(module).__module__}.{type(module).__qualname__}"))
    return sites


def attach_transformers(model: torch.nn.Module, strategy: Strategy | str, *, backend: str = "auto",
                        decode: str | QueryAwareDecode = "dense", cost_model: Any = None) -> torch.nn.Module:
    """A copy of ``model`` (a transformers ``PreTrainedModel``) that runs ``strategy`` through ``AttentionInterface``.

    The copy shares every parameter and buffer with ``model``; ``model`` itself is not changed.
    ``generate`` works with the dynamic and the static cache: prefill runs the strategy's masks,
    decode steps run dense (``decode="dense"``), the pattern's rows at their offset
    (``decode="sparse"``) or the pages a decode pattern selects per step
    (``decode=query_aware_decode(0.1)``: every causal self-attention site, dense ones included; or
    ``{site name: pattern}`` for the named sites only — e.g. all but the first layers, whose
    attention is rarely sparse — the others decoding dense).
    Use `sparsify.attach`, which picks this door for transformers models.

    Example:
        >>> attached = attach_transformers(model, "strategy.json")                 # doctest: +SKIP
        >>> attached.generate(input_ids, max_new_tokens=32)                        # doctest: +SKIP
        >>> quest = attach_transformers(model, "strategy.json", decode=query_aware_decode(0.1))  # doctest: +SKIP
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as error:  # pragma: no cover - attach() checks first
        raise UnsupportedError("the transformers door needs the transformers package") from error
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedError(f"attach_transformers takes a transformers PreTrainedModel, got {type(model).__name__}")
    if isinstance(decode, Mapping):
        wrong = {name: value for name, value in decode.items() if not isinstance(value, QueryAwareDecode)}
        if wrong:
            raise UnsupportedError(f"decode maps site names to decode patterns (query_aware_decode(...)); these are "
                                   f"not: {wrong}")
    elif not isinstance(decode, QueryAwareDecode) and decode not in DECODE_MODES:
        raise UnsupportedError(f"decode must be one of {', '.join(DECODE_MODES)}, a decode pattern "
                               f"(sparsify.patterns.query_aware_decode(...)) or a mapping of site names to "
                               f"decode patterns, got {decode!r}")
    if not type(model)._can_set_attn_implementation():
        raise UnsupportedError(
            f"{type(model).__name__} does not dispatch its attention through transformers' AttentionInterface, so "
            f"sparsify cannot attach to it; use the graph door instead: sparsify.compile(model, strategy=..., "
            f"example_inputs=...)")
    strategy, source = load_strategy(strategy)
    modules = dict(model.named_modules())
    mapping = match_sites(strategy, modules, source=source, framework="transformers")
    check_fingerprints(strategy, mapping, {name: _module_readout(modules[path]) for name, path in mapping.items()},
                       source=source)
    if backend != "auto":
        from sparsify.backends import get_backend

        get_backend(backend)  # unknown names fail here, listing the known ones
    runtimes = {name: build_runtime(strategy, name, index, backend=backend, cost_model=cost_model)
                for index, name in enumerate(mapping)}

    register_attention_implementation()
    attached = shared_weight_copy(model)
    copied = dict(attached.named_modules())
    fingerprints = {entry["name"]: entry for entry in strategy.fingerprint}
    decode_patterns = _decode_patterns(decode, list(runtimes), source)
    for name, runtime in runtimes.items():
        if name in decode_patterns:
            _install_decoder(copied[mapping[name]], fingerprints[name], decode_patterns[name], strategy.block_size)
        if runtime is None:
            continue
        setattr(runtime, DECODE_ATTRIBUTE, decode if isinstance(decode, str) else "dense")   # decoder sites: theirs
        install_runtime(copied[mapping[name]], runtime)
    attached.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    if attached.config._attn_implementation != ATTENTION_IMPLEMENTATION:
        raise UnsupportedError(f"{type(model).__name__} did not accept attn_implementation="
                               f"{ATTENTION_IMPLEMENTATION!r} (it reports {attached.config._attn_implementation!r})")
    sparse = sum(runtime is not None for runtime in runtimes.values())
    logger.info("attached %s to %s: %d of %d sites run sparse, decode=%s", source, type(model).__name__, sparse,
                len(runtimes), decode)
    return attached


def _decode_patterns(decode: Any, names: list[str], source: str) -> dict[str, QueryAwareDecode]:
    """``{site name: decode pattern}`` of the sites that decode with one (every site for one pattern, the named ones
    for a mapping, whose unknown names are refused with the known ones)."""
    if isinstance(decode, QueryAwareDecode):
        return {name: decode for name in names}
    if not isinstance(decode, Mapping):
        return {}
    unknown = [name for name in decode if name not in names]
    if unknown:
        raise StrategyError(f"decode names sites that {source} does not have: {unknown}; its sites: {names}")
    return dict(decode)


def _install_decoder(module: torch.nn.Module, fingerprint: dict[str, Any], pattern: QueryAwareDecode,
                     block_size: int) -> None:
    """Give a causal self-attention module of the attached copy its `QueryAwareDecoder` (other sites decode as before)."""
    if not fingerprint["causal"] or fingerprint["kind"] != "self":
        return
    module.add_module(DECODER_ATTRIBUTE, QueryAwareDecoder(pattern, num_heads=fingerprint["num_heads"],
                                                           num_kv_heads=fingerprint["num_kv_heads"],
                                                           block_size=block_size))
