"""ONNX export of a compiled model: sparse attention in standard ONNX ops, at any sequence length.

`export_onnx(compiled, example_inputs, path)` writes the rewritten graph of a `SparsifiedModule`
as an ONNX model that onnxruntime (or any runtime) runs *sparse*, not masked:

* every `SparseAttention` site becomes a block gather (`sparsify.onnx_lowering.BlockGatherAttention`):
  per (sparse head, query block) row, a ``Gather`` of its kept key/value blocks, then
  ``MatMul → (bias) → Softmax → MatMul`` over those blocks only, so the work per call is
  proportional to the kept blocks (measured 0.6-0.85 of ``1 / density`` at 12-25% density on
  onnxruntime's CPU provider, any-length files 1.1-1.3x the fixed-length ones' time; see
  ``benchmarks/onnx_bench.py`` and ``benchmarks/NOTES.md``). Dense heads of a site and canonical dense sites become ONNX's
  ``Attention`` op when the opset has it (``opset >= 23``), else ``MatMul → Softmax → MatMul``;
  skipped heads are zeros.
* **Sequence length.** With ``lengths="auto"`` (the default) one file serves every length up to
  ``max_seq_len`` whenever each sparse site allows it: the kept blocks are computed in the graph
  from the run-time length, each head pattern lowered by its own `Pattern.traced_block_mask`
  (dense, skip, sliding window, sinks, A-shape, last tokens, multi-diagonal, strided,
  power-of-two, radial, vertical stripes, vertical-slash, and their unions and intersections).
  A pattern that only exists as a table (`block_top_k`) pins the length: its site is named
  with the reason (`OnnxExport.pinned_sites`, a logged warning) and the file serves the
  example's length only, as with ``lengths="fixed"``. ``lengths="any"`` refuses to pin;
  ``lengths=[512, 1024, ...]`` serves exactly the listed lengths (pinned sites carry tables for
  each, picked in the graph by the run-time length). Batch is dynamic either way.
* **Precision.** The graph runs in the dtype the compiled module runs in: float32, float16,
  bfloat16 or float64 (other dtypes are refused before any work; ``dtype=`` checks the one
  expected). onnxruntime's CPU provider runs float16;
  it has no bfloat16 kernels for MatMul, Softmax or Attention (onnxruntime 1.32), so a bfloat16
  file needs a provider that has them (CUDA).
* **Refused before any work:** input-adaptive heads (`Pattern.is_adaptive`: their blocks are
  estimated per input, which has no standard-op lowering here), naming the site and head; search
  with ``adaptive=False`` for a strategy to export. Softcap and learned sinks are lowered.

The graph holds standard ONNX domains only (checked after export), so nothing custom needs to
be registered in the runtime. The exporter is ``torch.onnx.export(..., dynamo=True)`` (it needs
``onnxscript``): the TorchScript exporter bakes the captured graph's symbolic sizes into
constants, so neither batch nor length would stay dynamic.

Example:
    >>> compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)  # doctest: +SKIP
    >>> sparsify.export_onnx(compiled, inputs, "model.onnx").lengths                # doctest: +SKIP
    'any'
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable, Sequence

import torch
import torch.fx

from sparsify.capture import normalize_inputs
from sparsify.errors import SparsifyError, UnsupportedError
from sparsify.io import atomic_paths
from sparsify.onnx_lowering import (
    ATTENTION_OPSET,
    BlockGatherAttention,
    LoweringRequest,
    attention_op_lowering,
    check_traced_tables,
    dense_attention_lowering,
)
from sparsify.patterns import DEFAULT_MAX_TRACED_LEN

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_OPSET",
    "DEFAULT_MAX_SEQ_LEN",
    "EXPORT_DTYPES",
    "MIN_OPSET",
    "BlockGatherAttention",
    "LoweringRequest",
    "OnnxExport",
    "attention_op_lowering",
    "dense_attention_lowering",
    "export_onnx",
    "onnx_lowerings",
    "register_onnx_lowering",
]

#: Oldest opset the export supports: the dynamo exporter's ONNX function library (onnxscript's
#: torchlib) emits opset-18 forms (``Split`` with ``num_outputs``, ``ReduceMax`` with axes as an
#: input); at opset 17 the exported model fails the checker.
MIN_OPSET = 18
#: Longest query/key length an any-length export serves by default (``max_seq_len``).
DEFAULT_MAX_SEQ_LEN = DEFAULT_MAX_TRACED_LEN
#: The dtypes an exported graph may compute in; anything else is refused before the export starts.
EXPORT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CANONICAL = "sparsify.attention"
_STANDARD_DOMAINS = ("", "ai.onnx")
_LENGTH_CHOICES = ("auto", "any", "fixed")


# ----------------------------------------------------------------------------------------------
# Registry: ONNX lowerings by name; each backend declares the one that reproduces it

#: ``lowering(sparse_attention_module, request: LoweringRequest) -> nn.Module`` with the call
#: signature of `SparseAttention`, built from plain torch ops that export to standard ONNX; the
#: request says which lengths its block tables serve, the dtype, and whether dense heads may use
#: ONNX's ``Attention`` op.
Lowering = Callable[[torch.nn.Module, LoweringRequest], torch.nn.Module]
_LOWERINGS: dict[str, Lowering] = {}
#: The lowering of sites compiled with ``backend="auto"``: every auto candidate computes what the
#: runtime mask describes (each is tested against the torch reference).
AUTO_LOWERING = "block_gather"


def register_onnx_lowering(name: str) -> Callable[[Lowering], Lowering]:
    """Decorator registering an ONNX lowering under ``name`` (what a backend's ``onnx_lowering`` names).

    Example:
        >>> @register_onnx_lowering("my_kernel_lowering")        # doctest: +SKIP
        ... def lower(module, request):
        ...     return BlockGatherAttention(module, request)
    """

    def decorate(lowering: Lowering) -> Lowering:
        if name in _LOWERINGS:
            raise ValueError(f"an ONNX lowering named {name!r} is registered twice")
        _LOWERINGS[name] = lowering
        return lowering

    return decorate


def onnx_lowerings() -> list[str]:
    """Names of the registered ONNX lowerings.

    Example:
        >>> "block_gather" in onnx_lowerings()
        True
    """
    return sorted(_LOWERINGS)


def lowering_name(backend: str) -> str | None:
    """The ONNX lowering a site compiled for ``backend`` exports with (as the backend declares), or ``None``."""
    if backend == "auto":
        return AUTO_LOWERING
    from sparsify.backends import backend_class

    return backend_class(backend).onnx_lowering


def exporting_backends() -> list[str]:
    """Backends whose declared lowering is registered."""
    from sparsify.backends import backend_names

    return ["auto"] + [name for name in backend_names() if lowering_name(name) in _LOWERINGS]


register_onnx_lowering("block_gather")(BlockGatherAttention)


# ----------------------------------------------------------------------------------------------
# Export


@dataclasses.dataclass
class OnnxExport:
    """What `export_onnx` wrote: the file, its interface and the lengths it serves.

    Attributes:
        lengths: ``"any"`` (every length up to ``max_seq_len``), ``"fixed"`` (the example's) or
            ``"listed"`` (``listed_lengths``).
        seq_lengths: per sparse site fixed to one length, its ``(q_len, k_len)``.
        pinned_sites: per site whose patterns cannot serve any length, why (its pattern's
            `Pattern.fixed_length_reason`).
        attention_ops: ONNX ``Attention`` nodes in the graph (dense attention at opset >= 23).
    """

    path: pathlib.Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool                       # False only when the compiled graph fixed the batch size
    sparse_sites: int
    dense_sites: int
    seq_lengths: dict[str, tuple[int, int]]
    lengths: str = "fixed"
    listed_lengths: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    max_seq_len: int | None = None
    pinned_sites: dict[str, str] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    attention_ops: int = 0


class _ExportWrapper(torch.nn.Module):
    """Flat tensors in, flat tensors out: what the ONNX graph's inputs and outputs are."""

    def __init__(self, graph_module: torch.nn.Module, args: tuple, kwargs: dict, tensor_slots: list[tuple[str, Any]]):
        super().__init__()
        self.graph_module = graph_module
        self._args = args
        self._kwargs = kwargs
        self._slots = tensor_slots

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = list(self._args), dict(self._kwargs)
        for (kind, key), tensor in zip(self._slots, tensors):
            if kind == "arg":
                args[key] = tensor
            else:
                kwargs[key] = tensor
        output = self.graph_module(*args, **kwargs)
        return tuple(leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def export_onnx(compiled: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                opset: int | None = None, lengths: str | Sequence[int | tuple[int, int]] = "auto",
                max_seq_len: int = DEFAULT_MAX_SEQ_LEN, dtype: torch.dtype | str | None = None) -> OnnxExport:
    """Write ``compiled`` (a `sparsify.compile` result) as an ONNX model at ``path``.

    Sparse sites become a block gather of their kept key/value blocks, dense attention ONNX's
    ``Attention`` (``opset >= 23``) or ``MatMul → Softmax → MatMul``; batch is dynamic, and the
    sequence length as ``lengths`` says (see the module docstring). The model is checked with
    ``onnx.checker`` and must hold only standard ONNX domains. Bad arguments (opset, lengths,
    dtype, a backend without lowering) are refused before any work.

    Args:
        compiled: the `SparsifiedModule` that `sparsify.compile` returned.
        example_inputs: inputs as the model is called (tensor, tuple of positional arguments or
            dict of keyword arguments); ``"fixed"`` files serve their length only.
        path: the ``.onnx`` file to write.
        opset: ONNX opset (default: the exporter's, 18; at least `MIN_OPSET`; 23 or newer writes
            dense attention as ``Attention``).
        lengths: ``"auto"`` (any length unless a site pins it), ``"any"`` (any length, or fail
            naming the sites that pin it), ``"fixed"`` (the example's length), or the lengths to
            serve: ints (self-attention, ``q_len == k_len``) or ``(q_len, k_len)`` pairs; the
            example's lengths are always served.
        max_seq_len: the longest query or key length an any-length file must serve (radial and
            power-of-two heads lower their distance octaves up to it).
        dtype: the precision the file must compute in (``torch.float16``, ``"bfloat16"``, ...),
            checked against the compiled module's; default: whatever the module computes in. The
            graph computes in the compiled module's dtype: its captured graph fixes it (casts such
            as ``to(torch.float32)`` are part of it), so for a float16 file compile the model in
            float16 (``model.half()``).

    Returns:
        an `OnnxExport` naming the file, its inputs and outputs, the lengths it serves and why
        sites pinned them.

    Example:
        >>> compiled = sparsify.compile(model, strategy=strategy, example_inputs=inputs)  # doctest: +SKIP
        >>> result = export_onnx(compiled, inputs, "model.onnx", opset=23)               # doctest: +SKIP
        >>> result.lengths, result.input_names                                           # doctest: +SKIP
        ('any', ['input_ids', 'attention_mask'])
    """
    from sparsify.api import SparsifiedModule
    from sparsify.runtime.sparse_attention import SparseAttention

    if not isinstance(compiled, SparsifiedModule):
        raise SparsifyError(
            f"export_onnx exports a compiled model, got a plain {type(compiled).__name__}. Call sparsify.compile "
            f"first: compiled = sparsify.compile(model, strategy=..., example_inputs=...) (or with calibration data), "
            f"then sparsify.export_onnx(compiled, example_inputs, path)"
        )
    onnx = _import_onnx()
    opset = _check_opset(opset, onnx)
    mode, declared = _check_lengths(lengths, max_seq_len)
    target_dtype = _check_target_dtype(dtype)
    graph_module = compiled.graph_module
    sparse_modules = {name: module for name, module in graph_module.named_modules()
                      if isinstance(module, SparseAttention)}
    for name, module in sparse_modules.items():
        lowering = lowering_name(module.backend)
        if lowering not in _LOWERINGS:
            declared_by = f"declares the lowering {lowering!r}, which is not registered" if lowering else "declares none"
            raise UnsupportedError(
                f"site {module.site.name!r} ({name}) was compiled for backend {module.backend!r}, which has no ONNX "
                f"lowering (it {declared_by}); backends that export: {', '.join(exporting_backends())}. Compile with "
                f"backend='torch' for export, or register one with sparsify.export.register_onnx_lowering(name)"
            )
    _refuse_adaptive_heads(sparse_modules)
    pinned = _pinned_sites(sparse_modules)
    if mode == "any" and pinned:
        raise UnsupportedError(
            "export_onnx(lengths='any'): " + "; ".join(f"site {site!r} pins the length: {why}" for site, why in
                                                      pinned.items())
            + ". Export with lengths='fixed' (the example's length) or lengths=[...] (the lengths to serve)")
    args, kwargs = normalize_inputs(example_inputs)
    kwargs = {**compiled.fixed_kwargs, **kwargs}
    site_calls, example_output = _run_example(compiled, sparse_modules, args, kwargs)
    dtype = _check_dtypes(graph_module, site_calls, sparse_modules, target_dtype)
    if mode == "auto":
        mode = "fixed" if pinned else "any"
        if pinned:
            logger.warning("export_onnx: the sequence length is fixed to the example's: %s. Pass lengths=[...] to "
                           "serve several lengths", "; ".join(f"site {s!r} pins it ({why})" for s, why in pinned.items()))
    attention_op = opset is not None and opset >= ATTENTION_OPSET
    requests = _lowering_requests(sparse_modules, site_calls, mode, declared, pinned, max_seq_len, attention_op)

    export_module = _export_copy(graph_module, sparse_modules, requests, attention_op)
    _check_any_length_tables(export_module, sparse_modules, requests)
    slots, names, tensors = _tensor_inputs(graph_module, args, kwargs)
    if not tensors:
        raise SparsifyError("export_onnx: the example inputs hold no tensor")
    wrapper = _ExportWrapper(export_module, args, kwargs, slots).eval()
    dynamic_length = mode != "fixed"
    trace_tensors, dynamic_shapes = _dynamic_shapes(tensors, dynamic_length)
    dynamic_batch = True
    try:
        with torch.no_grad():
            outputs = wrapper(*trace_tensors)
    except Exception as error:  # noqa: BLE001 - the captured graph fixed the batch size
        if trace_tensors[0].shape[0] == tensors[0].shape[0]:
            raise SparsifyError(f"export_onnx: the export lowering failed on the example inputs: "
                                f"{type(error).__name__}: {error}") from error
        logger.warning(
            "the compiled graph only accepts batch size %d (it was captured from batch-%d example inputs, which "
            "torch.export specialises); exporting with a fixed batch. Compile with example inputs of batch >= 2 "
            "for a dynamic batch.", tensors[0].shape[0], tensors[0].shape[0])
        dynamic_batch = False
        trace_tensors, dynamic_shapes = list(tensors), (tuple(None for _ in tensors),)
        if dynamic_length:
            trace_tensors, dynamic_shapes = _dynamic_shapes(tensors, dynamic_length, batch=False)
        with torch.no_grad():
            outputs = wrapper(*trace_tensors)
    output_names = _output_names(example_output, len(outputs))

    program = _run_exporter(wrapper, tuple(trace_tensors), names, output_names, dynamic_shapes, opset)
    model = program.model_proto
    _check_standard(model, onnx)
    seq_lengths = {sparse_modules[name].site.name: (request.q_len, request.k_len)
                   for name, request in requests.items() if request.tables == "fixed"}
    listed = sorted({pair for request in requests.values() for pair in request.listed})
    served = {"any": f"any (query and key lengths up to {max_seq_len})", "fixed": "fixed: "
              + (", ".join(sorted({f"{q}x{k}" for q, k in seq_lengths.values()})) or "the example's"),
              "listed": "listed: " + ", ".join(f"{q}x{k}" for q, k in listed)}[mode]
    metadata = {
        "sparsify.strategy": json.dumps(compiled.strategy.summary(), default=str),
        "sparsify.lengths": served,
        "sparsify.fixed_lengths": json.dumps({site: list(l) for site, l in seq_lengths.items()}),
        "sparsify.pinned_sites": json.dumps(pinned),
        "sparsify.dtype": str(dtype).replace("torch.", ""),
        "sparsify.dynamic_axes": ("batch (dim 0 of every batched input)" if dynamic_batch else "none")
                                 + (" and sequence" if dynamic_length else ""),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        large = model.ByteSize() > (1 << 31) - (64 << 20)
    except ValueError:                       # protobuf refuses to size messages past 2 GiB
        large = True
    # Written atomically (sparsify.io): checked before it replaces the file that was there, which a failed or
    # refused export leaves intact. A large model's external data file is replaced right before the model.
    targets = [path.with_name(path.name + ".data"), path] if large else [path]
    with atomic_paths(*targets) as temporaries:
        onnx.save_model(model, str(temporaries[-1]), save_as_external_data=large,
                        location=path.name + ".data" if large else None)
        onnx.checker.check_model(str(temporaries[-1]), full_check=not large)
    opset_used = next(o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS)
    result = OnnxExport(path=path, opset=int(opset_used),
                        input_names=names, output_names=output_names, dynamic_batch=dynamic_batch,
                        sparse_sites=len(sparse_modules),
                        dense_sites=len(compiled.sites) - len(sparse_modules), seq_lengths=seq_lengths,
                        lengths=mode, listed_lengths=listed, max_seq_len=max_seq_len if mode == "any" else None,
                        pinned_sites=pinned, dtype=str(dtype).replace("torch.", ""),
                        attention_ops=sum(node.op_type == "Attention" for node in model.graph.node))
    logger.info("exported %s: %d sparse / %d dense site(s), opset %d, lengths %s, inputs %s", path,
                result.sparse_sites, result.dense_sites, result.opset, served, names)
    return result


def _import_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    except ImportError as error:
        raise SparsifyError(
            f"ONNX export needs the 'onnx' extra ({error.name} is missing): pip install 'sparsify-attention[onnx]'"
        ) from None
    return onnx


def _check_opset(opset: int | None, onnx) -> int | None:
    if opset is None:
        return None
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise UnsupportedError(f"opset must be an int, got {opset!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise UnsupportedError(
            f"opset {opset} is too old: the export needs opset >= {MIN_OPSET} (the exporter's op library emits "
            f"opset-{MIN_OPSET} forms, e.g. Split with num_outputs, ReduceMax with axes as an input); "
            f"supported: {MIN_OPSET}..{newest}"
        )
    if opset > newest:
        raise UnsupportedError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                               f"(newest {newest}); supported: {MIN_OPSET}..{newest}")
    return opset


def _check_lengths(lengths: Any, max_seq_len: Any) -> tuple[str, tuple[int | tuple[int, int], ...]]:
    """``(mode, declared lengths)`` from `export_onnx`'s arguments, or `UnsupportedError` saying what is wrong."""
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise UnsupportedError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    if isinstance(lengths, str):
        if lengths not in _LENGTH_CHOICES:
            raise UnsupportedError(f"unknown lengths {lengths!r}; known: {', '.join(_LENGTH_CHOICES)}, or a list of "
                                   f"lengths (ints or (q_len, k_len) pairs)")
        return lengths, ()
    if not isinstance(lengths, (list, tuple)) or not lengths:
        raise UnsupportedError(f"lengths must be one of {', '.join(_LENGTH_CHOICES)} or a non-empty list of lengths, "
                               f"got {lengths!r}")
    declared = []
    for entry in lengths:
        values = entry if isinstance(entry, (list, tuple)) else (entry,)
        if len(values) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                 for v in values):
            raise UnsupportedError(f"lengths: {entry!r} is neither a positive int nor a (q_len, k_len) pair of them")
        if max(values) > max_seq_len:
            raise UnsupportedError(f"lengths: {entry!r} is longer than max_seq_len={max_seq_len}")
        declared.append(values[0] if len(values) == 1 else (values[0], values[1]))
    return "listed", tuple(declared)


def _refuse_adaptive_heads(sparse_modules: dict) -> None:
    """`UnsupportedError` naming every input-adaptive head (`Pattern.is_adaptive`): no ONNX lowering estimates masks."""
    found = []
    for module in sparse_modules.values():
        for head in module.adaptive_heads.tolist():
            found.append(f"site {module.site.name!r} head {head} ({module.head_patterns[head]})")
    if found:
        raise UnsupportedError(
            "export_onnx: input-adaptive heads estimate their blocks from each input on the device, which the ONNX "
            f"export has no standard-op lowering for: {'; '.join(found)}. Re-search with adaptive=False "
            "(sparsify.compile(model, calib_loader, adaptive=False), options=CompileOptions(adaptive=False), or "
            "sparsify-cli search --no-adaptive) so those heads get static patterns, then export that strategy")


def _pinned_sites(sparse_modules: dict) -> dict[str, str]:
    """Per site whose sparse heads cannot serve any length, why (the first such head's pattern)."""
    pinned = {}
    for module in sparse_modules.values():
        for head in module.sparse_heads.tolist():
            pattern = module.head_patterns[head]
            reason = pattern.fixed_length_reason()
            if reason is not None:
                pinned[module.site.name] = f"head {head}: {pattern}: {reason}"
                break
    return pinned


def _check_target_dtype(dtype: Any) -> torch.dtype | None:
    """``export_onnx(dtype=...)`` as a torch dtype, or `UnsupportedError` naming the ones served."""
    if dtype is None:
        return None
    served = ", ".join(str(d).replace("torch.", "") for d in EXPORT_DTYPES)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), dtype)
    if not isinstance(dtype, torch.dtype) or dtype not in EXPORT_DTYPES:
        raise UnsupportedError(f"export_onnx: dtype {dtype!r} cannot be served; an exported graph computes in "
                               f"{served} (attention's matmuls and softmax have no other ONNX form here)")
    return dtype


def _check_dtypes(graph_module: torch.fx.GraphModule, site_calls: dict, sparse_modules: dict,
                  target: torch.dtype | None = None) -> torch.dtype:
    """The dtype attention runs in; `UnsupportedError` for one the export cannot serve, naming the site.

    Sparse sites report it from the example call; dense sites from the captured graph's
    metadata (the query's ``meta["val"]``, where capture recorded one). ``target`` is the
    dtype the caller asked for (already one the export serves): it must be the module's.
    """
    found = [(f"site {sparse_modules[name].site.name!r}", dtype) for name, (_, _, dtype) in site_calls.items()]
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and _CANONICAL in str(node.target) and node.args:
            value = getattr(node.args[0], "meta", {}).get("val")
            if isinstance(value, torch.Tensor):
                found.append((f"dense attention {node.name!r}", value.dtype))
    for where, dtype in found:
        if target is not None and dtype != target:
            name = lambda d: str(d).replace("torch.", "")                     # noqa: E731
            raise UnsupportedError(
                f"export_onnx(dtype={name(target)}): {where} computes in {name(dtype)}. The exported graph "
                f"computes in the compiled module's dtype (its captured graph fixes it: casts such as "
                f"to({name(dtype)}) are part of it); convert the model (model.to(torch.{name(target)})) and its "
                f"example inputs, and compile it again")
        if dtype not in EXPORT_DTYPES:
            raise UnsupportedError(
                f"export_onnx: {where} is {str(dtype).replace('torch.', '')}; the ONNX export serves "
                f"{', '.join(str(d).replace('torch.', '') for d in EXPORT_DTYPES)}. Export with "
                f"dtype=torch.float32 (or float16), or convert the model and compile it again")
    dtypes = {dtype for _, dtype in found}
    if torch.bfloat16 in dtypes:
        logger.warning("export_onnx: the model runs in bfloat16; onnxruntime's CPU provider has no bfloat16 kernels "
                       "for MatMul, Softmax or Attention, so run the file with a provider that has them (CUDA)")
    if not dtypes:
        return torch.float32
    return next(iter(dtypes)) if len(dtypes) == 1 else torch.float32


def _run_example(compiled, sparse_modules: dict, args: tuple, kwargs: dict) -> tuple[dict[str, tuple], Any]:
    """One forward on the example inputs: per sparse submodule ``(q_len, k_len, dtype)``, and the output."""
    found: dict[str, tuple] = {}
    handles = []
    for name, module in sparse_modules.items():
        def hook(_module, hook_args, _hook_kwargs, name=name):
            q, k = hook_args[0], hook_args[1]
            found[name] = (int(q.shape[2]), int(k.shape[2]), q.dtype)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            output = compiled.graph_module(*args, **kwargs)
    except SparsifyError:
        raise
    except Exception as error:  # noqa: BLE001 - reported with what to do
        raise SparsifyError(f"export_onnx: the compiled model failed on the example inputs: "
                            f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(sparse_modules) - set(found))
    if missing:
        raise SparsifyError(f"export_onnx: the example inputs did not reach {', '.join(missing)}")
    return found, output


def _lowering_requests(sparse_modules: dict, site_calls: dict, mode: str, declared: tuple, pinned: dict,
                       max_seq_len: int, attention_op: bool) -> dict[str, LoweringRequest]:
    """Per sparse submodule, what its lowering must serve."""
    requests = {}
    for name, module in sparse_modules.items():
        q_len, k_len, dtype = site_calls[name]
        site = module.site.name
        if mode != "fixed" and max(q_len, k_len) > max_seq_len:
            raise UnsupportedError(f"site {site!r}: the example's lengths {q_len}x{k_len} exceed "
                                   f"max_seq_len={max_seq_len}")
        tables, listed = ("any", ()) if mode in ("any", "listed") else ("fixed", ())
        if mode == "listed" and site in pinned:
            pairs = [(q_len, k_len)]
            for entry in declared:
                if isinstance(entry, tuple):
                    pairs.append(entry)
                elif q_len == k_len:
                    pairs.append((entry, entry))
                else:
                    raise UnsupportedError(
                        f"site {site!r} attends {q_len} queries to {k_len} keys; give its lengths as (q_len, k_len) "
                        f"pairs, e.g. lengths=[({q_len}, {k_len})]")
            tables, listed = "listed", tuple(dict.fromkeys(pairs))
        requests[name] = LoweringRequest(q_len, k_len, dtype, tables=tables, listed=listed, max_len=max_seq_len,
                                         attention_op=attention_op)
    return requests


def _export_copy(graph_module: torch.fx.GraphModule, sparse_modules: dict, requests: dict,
                 attention_op: bool) -> torch.fx.GraphModule:
    """A GraphModule sharing the weights of ``graph_module`` whose attentions are export lowerings."""
    graph = copy.deepcopy(graph_module.graph)
    dense = attention_op_lowering if attention_op else dense_attention_lowering
    for node in graph.nodes:
        if node.op == "call_function" and _CANONICAL in str(node.target):
            node.target = dense
    export_module = torch.fx.GraphModule(graph_module, graph)
    for name, module in sparse_modules.items():
        lowering = _LOWERINGS[lowering_name(module.backend)](module, requests[name])
        export_module.add_submodule(name, lowering)   # replaces the shared submodule in the copy only
    for attribute in ("_in_spec", "_out_spec"):
        if hasattr(graph_module, attribute):
            setattr(export_module, attribute, getattr(graph_module, attribute))
    export_module.recompile()
    return export_module


def _check_any_length_tables(export_module: torch.nn.Module, sparse_modules: dict, requests: dict) -> None:
    """Before writing: each any-length lowering keeps the runtime's blocks at lengths around the example's."""
    for name, module in sparse_modules.items():
        request = requests[name]
        traced = getattr(export_module.get_submodule(name), "traced", None)
        if request.tables != "any" or traced is None:
            continue
        bs, cap = module.block_size, min(request.max_len, 8192)
        q_len, k_len = request.q_len, request.k_len
        variants = {1, bs - 1, bs + 1, q_len // 2 + 1, 2 * q_len + 3}
        if q_len == k_len:
            pairs = {(n, n) for n in variants}
        else:
            pairs = {(n, k_len) for n in variants} | {(q_len, n) for n in {1, k_len // 2 + 1, 2 * k_len + 3}}
        pairs = sorted((q, k) for q, k in pairs | {(q_len, k_len)} if 1 <= q <= cap and 1 <= k <= cap)
        check_traced_tables(module, traced, pairs)


def _placeholder_names(graph_module: torch.fx.GraphModule) -> list[str]:
    return [node.target for node in graph_module.graph.nodes if node.op == "placeholder"]


def _tensor_inputs(graph_module, args: tuple, kwargs: dict):
    """The tensor leaves of the call, where each goes, and their ONNX input names."""
    placeholders = _placeholder_names(graph_module)
    slots, names, tensors = [], [], []
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            slots.append(("arg", index))
            names.append(str(placeholders[index]) if index < len(placeholders) else f"input_{index}")
            tensors.append(value)
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            slots.append(("kwarg", key))
            names.append(key)
            tensors.append(value)
        elif any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value)):
            raise UnsupportedError(f"export_onnx: input {key!r} nests tensors in a {type(value).__name__}; "
                                   f"pass tensors as top-level arguments")
    return slots, names, tensors


def _dynamic_shapes(tensors: list[torch.Tensor], dynamic_length: bool, batch: bool = True):
    """Example tensors to trace with (batch >= 2, so it is not specialised) and their dynamic shapes.

    With ``dynamic_length`` every other dimension of size > 1 is ``Dim.AUTO`` (dynamic where the
    graph allows it: sequence, image sizes).
    """
    batch_size = tensors[0].shape[0] if batch and tensors[0].dim() else None
    dim = torch.export.Dim("batch")
    trace, shapes = [], []
    for tensor in tensors:
        spec = {}
        if batch_size is not None and tensor.dim() and tensor.shape[0] == batch_size:
            spec[0] = dim
            if batch_size == 1:
                tensor = torch.cat([tensor, tensor])
        if dynamic_length:
            spec.update({i: torch.export.Dim.AUTO for i in range(1 if batch else 0, tensor.dim())
                         if tensor.shape[i] > 1 and i not in spec})
        trace.append(tensor)
        shapes.append(spec or None)
    return trace, (tuple(shapes),)


def _output_names(output: Any, count: int) -> list[str]:
    """ONNX output names from the output's structure (``logits``, ``last_hidden_state``, ...)."""
    names = []
    try:
        flat = torch.utils._pytree.tree_flatten_with_path(output)[0]
    except ValueError:           # an output type registered without key paths: numbered names
        flat = []
    for key_path, leaf in flat:
        if isinstance(leaf, torch.Tensor):
            text = "".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) + "." for k in key_path)
            names.append(text.strip(".").replace(".", "_") or "output")
    if len(names) != count or len(set(names)) != count:
        names = [f"output_{i}" for i in range(count)]
    return [name if not name.isdigit() else f"output_{name}" for name in names]


def _run_exporter(wrapper, tensors: tuple, names: list[str], output_names: list[str], dynamic_shapes, opset):
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(wrapper, tensors, dynamo=True, input_names=names, output_names=output_names,
                                     dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=False,
                                     optimize=True, verbose=False)
    except Exception as error:  # noqa: BLE001 - re-raised with what it means here
        text = str(error)
        lines = text.splitlines() or [""]
        first = next((line for line in lines if "Error" in line and "step" not in line), lines[0])
        hint = ""
        if "batch" in text and ("specializ" in text or "Constraints violated" in text or "constant" in text.lower()):
            hint = (" The captured graph fixes the batch size (its capture fell back to static shapes); "
                    "compile with dynamic=True and a model that captures with dynamic shapes.")
        elif "data-dependent" in text.lower() or "GuardOnDataDependent" in text:
            hint = (" A lowering branched on a value only known at run time (a pattern's _traced_block_mask must "
                    "be tensor ops of the grid); export with lengths='fixed' to build the tables in Python.")
        elif opset is not None and ("opset" in text.lower() or "version" in text.lower()):
            hint = f" An op of the graph may not exist at opset {opset}; try the default opset."
        raise SparsifyError(f"torch.onnx.export failed: {type(error).__name__}: {first[:500]}.{hint}") from error


def _check_standard(model, onnx) -> None:
    custom = sorted({f"{node.domain}::{node.op_type}" for node in model.graph.node
                     if node.domain not in _STANDARD_DOMAINS})
    functions = sorted({f"{f.domain}::{f.name}" for f in model.functions})
    if custom or functions:
        raise UnsupportedError(f"the exported graph uses non-standard ONNX domains: {', '.join(custom + functions)}")
