"""`sparsify-cli`: the command line front door (sites, search, report, apply, export, calibrate, demo).

The CLI is the only part of sparsify that prints. It checks what it can before long work starts
(options, the backend, the picture's extra, where files go), shows sparsify's own warnings and
keeps third-party chatter (torch's logs, library warnings) out of a normal run; ``-v`` shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from tabulate import tabulate

from sparsify.options import CompileOptions

DEFAULT_EXAMPLE = "sparsify.toy_models:structured_video_transformer"
DEFAULT_EXAMPLE_CALIBRATION = "sparsify.toy_models:structured_video_batches"


def _resolve(spec: str, option: str, kind: str = "function") -> Callable[..., Any]:
    if ":" not in spec:
        raise SystemExit(f"{option} expects 'package.module:{kind}', got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"cannot import {module_name!r} (from {option} {spec!r}): {error}") from None
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        raise SystemExit(f"{module_name!r} has no callable {attribute!r} (from {option} {spec!r})")
    return function


def load_factory(spec: str) -> tuple[torch.nn.Module, Any]:
    """Call ``package.module:factory`` and return its ``(model, example_inputs)``.

    Example:
        >>> model, inputs = load_factory("sparsify.toy_models:manual_attention_block")
        >>> type(model).__name__
        'ManualAttentionBlock'
    """
    result = _resolve(spec, "--model", "factory")()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise SystemExit(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    return result


def _sites_table(sites) -> str:
    rows = [[s.index, s.name, s.num_heads, s.num_kv_heads, s.head_dim, s.q_len, s.k_len,
             "yes" if s.causal else "no", s.kind, "yes" if s.has_mask else "no", s.source] for s in sites]
    return tabulate(rows, headers=["#", "site", "heads", "kv heads", "head dim", "q len", "k len", "causal",
                                   "kind", "mask", "matched as"], tablefmt="github")


# -- checks before long work ---------------------------------------------------------------------------

def _check_picture_extra(png: str | None) -> None:
    if png and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--png needs matplotlib, which is not installed: pip install 'sparsify-attention[report]' "
                         "(or leave out --png)")


def _check_output_path(path: str | None, option: str) -> None:
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"{option} {path!r}: the folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise SystemExit(f"{option} {path!r} is a folder; give a file path")
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"{option} {path!r}: cannot write to the folder {folder!r}")


def _options_from(args: argparse.Namespace, names: Sequence[str]) -> CompileOptions:
    """`CompileOptions` with the values given on the command line; the rest keep their defaults."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if "hardware_profiles" in given:
        given["hardware_profiles"] = tuple(given["hardware_profiles"])
    if hasattr(args, "no_progress"):
        given["progress"] = not args.no_progress
    return CompileOptions.from_keywords(given)


# -- commands -------------------------------------------------------------------------------------------

def command_sites(args: argparse.Namespace) -> int:
    from sparsify import find_attention

    model, example_inputs = load_factory(args.model)
    sites = find_attention(model, example_inputs)
    if args.json:
        print(json.dumps([s.to_dict() for s in sites], indent=2))
    else:
        print(_sites_table(sites))
    return 0


def command_apply(args: argparse.Namespace) -> int:
    import sparsify
    from sparsify.api import check_backend_available
    from sparsify.capture import normalize_inputs

    options = _options_from(args, ["backend"])
    check_backend_available(options.backend)
    model, example_inputs = load_factory(args.model)
    compiled = sparsify.compile(model, strategy=args.strategy, example_inputs=example_inputs, options=options)
    print(compiled.report())
    model_args, model_kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        error = _relative_error(compiled(*model_args, **model_kwargs), model(*model_args, **model_kwargs))
    print(f"\n{compiled.rewritten_sites} of {len(compiled.sites)} sites run sparse; "
          f"output relative L2 error vs the original model: {error:.3e}")
    return 0


_SEARCH_OPTIONS = ["max_output_error", "output_metric", "max_error", "target_density", "target_speedup",
                   "target_overrides_max_error", "block_size",
                   "backend", "dense_steps", "steps_per_generation", "min_recall", "holdout_fraction", "seed",
                   "hardware_profiles", "price_for", "adaptive"]


def command_search(args: argparse.Namespace) -> int:
    """Profile, search, write the strategy (and its profile maps), print the report.

    Under ``torchrun`` (``WORLD_SIZE`` set) the ranks calibrate data-parallel: each takes its
    contiguous share of the ``--calib`` batches (or, when the ``--calib`` function takes
    ``rank`` and ``world_size`` arguments, the batches it returns for its rank); rank 0 alone
    prints and writes files.
    """
    from sparsify import distributed
    from sparsify.api import check_backend_available, search_model
    from sparsify.cost import CostModel

    options = _options_from(args, _SEARCH_OPTIONS)
    check_backend_available(options.backend)
    CostModel.default(options.hardware_profiles)  # a bad profile file fails now, not after calibration
    _check_picture_extra(args.png)
    _check_output_path(args.out, "--out")
    _check_output_path(args.png, "--png")
    if args.model is None:
        print("no --model given: searching the built-in example (a structured video transformer, 2048 tokens)\n")
        model, _ = load_factory(DEFAULT_EXAMPLE)
        calib = _resolve(DEFAULT_EXAMPLE_CALIBRATION, "--calib")
    else:
        model, example_inputs = load_factory(args.model)
        if args.calib:
            calib = _resolve(args.calib, "--calib")
        else:
            print("no --calib given: calibrating on the factory's example inputs only (one batch)", file=sys.stderr)
            calib = lambda: [example_inputs]  # noqa: E731
    on_cuda = any(parameter.is_cuda for parameter in model.parameters())
    started = distributed.init_from_environment(args.dist_backend, prefer_cuda=on_cuda)
    try:
        group = distributed.calibration_group()
        with group.guard("loading calibration batches"):  # a rank whose --calib fails stops every rank
            batches = _calibration_batches(calib, group)
        if not group.is_main:
            options = dataclasses.replace(options, progress=False)
        result = search_model(model, batches, options)
        if group.is_main:
            _write_search_outputs(args, result)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0


def _calibration_batches(calib: Callable[..., Any], group: Any) -> list[Any]:
    """This rank's calibration batches: ``calib(rank=, world_size=)`` when it takes them, else a contiguous share."""
    from sparsify.distributed import contiguous_shard

    if not group.is_distributed:
        return list(calib())
    parameters = inspect.signature(calib).parameters
    if "rank" in parameters and "world_size" in parameters:
        return list(calib(rank=group.rank, world_size=group.world_size))
    return contiguous_shard(list(calib()), group.rank, group.world_size)


def _write_search_outputs(args: argparse.Namespace, result: Any) -> None:
    from sparsify.report import render_png, save_profile_maps

    strategy = result.compiled.strategy
    strategy.save(args.out)  # this function runs on rank 0 only
    profile_path = _profile_path(args.out)
    maps = {name: profile.normalized() for name, profile in result.search.profiles.items()}
    if maps:
        save_profile_maps(maps, profile_path)
    print(result.compiled.report())
    print(f"\nstrategy written to {args.out}" + (f" (profile maps: {profile_path})" if maps else ""))
    if args.png:
        _print_pictures(render_png(strategy, args.png, maps), masks_only=not maps)


def command_report(args: argparse.Namespace) -> int:
    from sparsify import Strategy
    from sparsify.report import load_profile_maps, render_png, strategy_table

    _check_picture_extra(args.png)
    _check_output_path(args.png, "--png")
    rows_document = _rows_document(args.strategy)
    if rows_document is not None:  # a benchmark's measured rows (e.g. quality_pareto.py): the quality picture only
        return _report_rows(args, rows_document)
    strategy = Strategy.load(args.strategy)
    print(strategy_table(strategy))
    if args.quality_png:
        from sparsify.report import quality_points, render_quality_png

        _check_picture_extra(args.quality_png)
        _check_output_path(args.quality_png, "--quality-png")
        record = strategy.metadata.get("output_budget") or {}
        points = quality_points(strategy)
        if not points:
            raise SystemExit(f"{args.strategy}: records no verified allocations (search it with a model-level budget, "
                             f"--max-output-error, to draw quality against density)")
        label = f"measured {record.get('metric', 'error')} on held-out batches"
        written = render_quality_png({"verified allocations": points}, args.quality_png, ylabel=label,
                                     reference=record.get("budget"), title="the search's verified allocations")
        print(f"picture written to {written}")
    if args.png:
        profile_path = args.profile or _profile_path(args.strategy)
        if args.profile and not os.path.exists(args.profile):
            raise SystemExit(f"--profile {args.profile!r}: no such file")
        maps = load_profile_maps(profile_path) if os.path.exists(profile_path) else None
        _print_pictures(render_png(strategy, args.png, maps), masks_only=not maps)
    return 0


def _rows_document(path: str) -> dict | None:
    """The file's JSON when it is a benchmark's rows document (``{"meta": ..., "rows": [...]}``), else None."""
    import json

    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (OSError, ValueError):
        return None  # Strategy.load explains what is wrong with the file
    return document if isinstance(document, dict) and "rows" in document and "meta" in document else None


def _report_rows(args: argparse.Namespace, document: dict) -> int:
    from sparsify.report import measured_series, render_quality_png

    if args.png:
        raise SystemExit(f"{args.strategy} holds measured rows, not a strategy: --png draws a strategy's masks; "
                         f"use --quality-png")
    series = measured_series(document)
    if not series:
        raise SystemExit(f"{args.strategy}: no rows with method, density and ppl_ratio to draw")
    for method, points in series.items():
        print(f"{method:>16}: " + ", ".join(f"{density:.3f} -> {ratio:.4f}" for density, ratio in points))
    if args.quality_png:
        _check_picture_extra(args.quality_png)
        _check_output_path(args.quality_png, "--quality-png")
        meta = document.get("meta") or {}
        title = f"perplexity ratio against density ({meta.get('tokens', '?')} tokens)"
        written = render_quality_png(series, args.quality_png, ylabel="perplexity ratio (compiled / dense)",
                                     reference=1.0, title=title)
        print(f"picture written to {written}")
    return 0


def _print_pictures(paths: Sequence[os.PathLike], masks_only: bool) -> None:
    note = " (no profile maps found: masks only)" if masks_only else ""
    if len(paths) == 1:
        print(f"picture written to {paths[0]}{note}")
    else:
        print(f"pictures written to {', '.join(map(str, paths))} ({len(paths)} pages){note}")


def command_calibrate(args: argparse.Namespace) -> int:
    from sparsify.api import check_backend_available
    from sparsify.cost import calibrate

    check_backend_available(args.backend)
    _check_output_path(args.out, "--out")
    given = {name: getattr(args, name) for name in ("lengths", "repeats", "heads", "head_dim", "block_size")
             if getattr(args, name) is not None}
    if "lengths" in given:
        given["lengths"] = tuple(given["lengths"])
    profile = calibrate(args.backend, args.device, progress=print, **given)
    profile.save(args.out)
    print(tabulate([[k, f"{v:.3e}"] for k, v in vars(profile.costs).items()], headers=["constant", "seconds"]))
    print(f"fit: {profile.fit['samples']} samples, mean relative error {profile.fit['mean_relative_error']:.1%}")
    print(f"hardware profile for {profile.device_name} written to {args.out}; use it with "
          f"`sparsify-cli search --hardware-profile {args.out}` (or compile(..., hardware_profiles=[...]))")
    return 0


def command_export(args: argparse.Namespace) -> int:
    """``sparsify-cli export --model pkg.mod:factory --strategy s.json --out model.onnx``."""
    import sparsify
    from sparsify.api import check_backend_available
    from sparsify.export import export_onnx

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise SystemExit("export needs the 'onnx' extra: pip install 'sparsify-attention[onnx]'")
    if args.check and importlib.util.find_spec("onnxruntime") is None:
        raise SystemExit("--check needs onnxruntime: pip install 'sparsify-attention[onnx]' (or leave out --check)")
    _check_output_path(args.out, "--out")
    lengths = args.lengths if args.lengths in ("auto", "any", "fixed") else _export_lengths(args.lengths)
    options = _options_from(args, ["backend"])
    check_backend_available(options.backend)
    model, example_inputs = load_factory(args.model)
    compiled = sparsify.compile(model, strategy=args.strategy, example_inputs=example_inputs, options=options)
    result = export_onnx(compiled, example_inputs, args.out, opset=args.opset, lengths=lengths,
                         max_seq_len=args.max_seq_len)
    batch = "batch dynamic" if result.dynamic_batch else "batch fixed"
    print(f"wrote {result.path} (opset {result.opset}, {result.dtype}): {result.sparse_sites} sparse / "
          f"{result.dense_sites} dense site(s), {result.attention_ops} ONNX Attention node(s); inputs "
          f"{', '.join(result.input_names)} ({batch}); outputs {', '.join(result.output_names)}")
    if result.lengths == "any":
        print(f"serves any sequence length up to {result.max_seq_len}")
    elif result.lengths == "listed":
        print(f"serves the lengths {', '.join(f'{q}x{k}' for q, k in result.listed_lengths)} (q x k)")
    else:
        fixed = sorted({f"{q}x{k}" for q, k in result.seq_lengths.values()}) or ["the example's"]
        print(f"sequence length fixed at export: {', '.join(fixed)} (q x k)")
    for site, why in result.pinned_sites.items():
        print(f"  site {site} pins the length: {why}")
    if args.check:
        error = _onnxruntime_error(compiled, example_inputs, result)
        print(f"onnxruntime (CPU) vs compiled PyTorch: max relative error {error:.2e}")
    return 0


def _export_lengths(text: str) -> list:
    """``--lengths 512,1024`` or ``--lengths 64x512`` as export_onnx's list (ints, or (q_len, k_len) pairs)."""
    lengths = []
    for entry in text.split(","):
        parts = entry.strip().lower().split("x")
        if not all(part.strip().isdigit() for part in parts) or len(parts) > 2:
            raise SystemExit(f"--lengths: {entry!r} is not a length (512) or a q x k pair (64x512); give auto, any, "
                             f"fixed or a comma-separated list such as 512,1024")
        values = [int(part) for part in parts]
        lengths.append(values[0] if len(values) == 1 else tuple(values))
    return lengths


def _onnxruntime_error(compiled, example_inputs, result) -> float:
    """Max relative error of the exported file run by onnxruntime (CPU) against the compiled module."""
    import onnxruntime

    from sparsify.api import first_output_tensor
    from sparsify.capture import normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    kwargs = {**compiled.fixed_kwargs, **kwargs}
    tensors = [value for value in args if isinstance(value, torch.Tensor)]
    tensors += [value for value in kwargs.values() if isinstance(value, torch.Tensor)]
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(result.input_names, tensors)})[0])
    with torch.no_grad():
        expected = first_output_tensor(compiled(*args, **kwargs))
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30))


def command_bench(args: argparse.Namespace) -> int:
    """Time the original model and the sparsified one end to end on one device; print one table row."""
    import dataclasses
    import statistics
    import time

    import sparsify
    from sparsify.capture import normalize_inputs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    strategy = sparsify.Strategy.load(args.strategy)
    model, example_inputs = load_factory(args.model)
    model = model.eval().to(device=device, dtype=dtype) if dtype else model.eval().to(device)

    def to_device(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device)
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value

    model_args, model_kwargs = torch.utils._pytree.tree_map(to_device, normalize_inputs(example_inputs))
    with torch.no_grad():
        if args.door == "graph":
            sparse_model = sparsify.compile(model, strategy=strategy, example_inputs=(model_args, model_kwargs),
                                            backend=args.backend)
            sites = sparse_model.sites
        else:
            sparse_model = sparsify.attach(model, strategy, backend=args.backend)
            sites = sparsify.find_attention(model, (model_args, model_kwargs))
    dense_model = model
    if args.torch_compile:
        dense_model, sparse_model = torch.compile(dense_model), torch.compile(sparse_model)

    def run(module: torch.nn.Module) -> Any:
        with torch.no_grad():
            return module(*model_args, **model_kwargs)

    def median_ms(module: torch.nn.Module) -> float:
        for _ in range(args.warmup):
            run(module)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(module)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                run(module)
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    dense_ms, sparse_ms = median_ms(dense_model), median_ms(sparse_model)
    error = _relative_error(run(sparse_model), run(dense_model))
    by_name = {site.name: site for site in sites}
    measured = [dict(entry, q_len=by_name[entry["name"]].q_len, k_len=by_name[entry["name"]].k_len)
                if entry["name"] in by_name else entry for entry in strategy.fingerprint]
    density = dataclasses.replace(strategy, fingerprint=measured).summary()["mean_density"]
    sparse_sites = sum(1 for site in strategy.sites.values() if site.sparse_heads)
    tokens = max((site.k_len for site in sites), default=0)
    print(f"{args.model} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{str(next(model.parameters()).dtype).replace('torch.', '')}, {args.door} door, backend {args.backend}"
          f"{', torch.compile' if args.torch_compile else ''}; median of {args.repeats} after {args.warmup} warm-up "
          f"calls{' (CUDA events)' if device.type == 'cuda' else ''}\n")
    row = [tokens, f"{sparse_sites}/{len(strategy.sites)}", "-" if density is None else f"{density:.3f}",
           f"{dense_ms:.2f}", f"{sparse_ms:.2f}", f"{dense_ms / sparse_ms:.2f}x", f"{error:.2e}"]
    print(tabulate([row], headers=["tokens", "sparse sites", "density", "dense ms", "sparse ms", "speedup",
                                   "output error"], tablefmt="github"))
    return 0


def _profile_path(strategy_path: str) -> str:
    stem = strategy_path[:-5] if strategy_path.endswith(".json") else strategy_path
    return stem + ".profile.json"


def command_demo(args: argparse.Namespace) -> int:
    """Built-in example end to end: find sites, apply window + sinks, compare and time."""
    import sparsify
    from sparsify import patterns
    from sparsify.cost import time_call

    _check_output_path(args.out, "--out")
    model, (tokens,) = sparsify.toy_models.video_transformer(seq_frames=args.frames)
    print(f"model: VideoTransformer, {tokens.shape[1]} tokens, random weights\n")
    sites = sparsify.find_attention(model, (tokens,))
    print(_sites_table(sites), "\n")
    pattern = patterns.sliding_window(args.window) | patterns.attention_sinks(64)
    strategy = sparsify.Strategy.uniform(sites, pattern, block_size=64)
    # Keep the first head of every site dense to show a mixed site.
    for site in sites:
        strategy = strategy.with_heads(site.name, [patterns.dense()] + [pattern] * (site.num_heads - 1))
    compiled = sparsify.compile(model, strategy=strategy, example_inputs=(tokens,))
    print(compiled.report(), "\n")
    with torch.no_grad():
        dense_time = time_call(lambda: model(tokens))
        sparse_time = time_call(lambda: compiled(tokens))
        error = _relative_error(compiled(tokens), model(tokens))
    print(f"output relative L2 error vs dense: {error:.3e}")
    print(f"model forward on CPU: dense {dense_time * 1e3:.1f} ms, sparsified {sparse_time * 1e3:.1f} ms "
          f"({dense_time / sparse_time:.2f}x)")
    if args.out:
        strategy.save(args.out)
        print(f"strategy written to {args.out}")
    return 0


def _relative_error(output: Any, reference: Any) -> float:
    from sparsify.api import first_output_tensor

    output, reference = first_output_tensor(output), first_output_tensor(reference)
    return float((output.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


# -- the parser ------------------------------------------------------------------------------------------

def _add_option(parser: argparse.ArgumentParser, name: str, kind: Any = None, **extra: Any) -> None:
    """A flag for `CompileOptions` field ``name``: its help and default come from the options object."""
    flag = "--" + name.replace("_", "-")
    help_text = CompileOptions.help_of(name)
    if kind is bool:
        parser.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
    else:
        parser.add_argument(flag, type=kind, default=None, help=help_text, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsify-cli", description="Attention sparsity compiler for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: sparsify's info and third-party warnings, -vv: debug)")
    commands = parser.add_subparsers(dest="command", required=True)

    sites = commands.add_parser("sites", help="list the attention sites of a model")
    sites.add_argument("--model", default=DEFAULT_EXAMPLE,
                       help="package.module:factory returning (model, example_inputs); default: built-in example")
    sites.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sites.set_defaults(handler=command_sites)

    apply = commands.add_parser("apply", help="apply a strategy JSON to a model and check its output")
    apply.add_argument("--model", default=DEFAULT_EXAMPLE, help="package.module:factory")
    apply.add_argument("--strategy", required=True, help="strategy JSON file")
    _add_option(apply, "backend", str)
    apply.set_defaults(handler=command_apply)

    search_parser = commands.add_parser("search", help="profile calibration data and write the chosen strategy as JSON")
    search_parser.add_argument("--model", default=None, help="package.module:factory returning (model, example_inputs); "
                               "default: the built-in structured video transformer")
    search_parser.add_argument("--calib", default=None, help="package.module:function returning an iterable of batches")
    search_parser.add_argument("--out", default="strategy.json", help="where to write the strategy (default strategy.json)")
    _add_option(search_parser, "max_output_error", float)
    from sparsify.output_metrics import OUTPUT_METRICS

    _add_option(search_parser, "output_metric", str, choices=sorted(OUTPUT_METRICS))
    for name, kind in (("max_error", float), ("target_density", float), ("target_speedup", float),
                       ("target_overrides_max_error", bool), ("block_size", int), ("backend", str),
                       ("dense_steps", int), ("steps_per_generation", int), ("min_recall", float),
                       ("holdout_fraction", float), ("seed", int)):
        _add_option(search_parser, name, kind)
    search_parser.add_argument("--adaptive", dest="adaptive", action=argparse.BooleanOptionalAction, default=None,
                               help="also consider input-adaptive patterns, estimated per input on the device "
                                    "(default on; --no-adaptive for strategies that export to ONNX)")
    search_parser.add_argument("--price-for", dest="price_for", default=None, metavar="PATH",
                               help="price candidates as this hardware profile's backend and device (search on this "
                                    "machine for another one: a profile from `sparsify-cli calibrate` there)")
    search_parser.add_argument("--hardware-profile", dest="hardware_profiles", action="append", default=None,
                               metavar="PATH", help="hardware profile JSON from `sparsify-cli calibrate` "
                               "(repeatable); it prices its backend ahead of the shipped profiles")
    search_parser.add_argument("--png", default=None, help="also draw attention maps and chosen masks to this PNG "
                               "(more pages as <name>-2.png, ... for many sites)")
    search_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    search_parser.add_argument("--dist-backend", default="auto",
                               help="torch.distributed backend under torchrun: gloo, nccl or auto (nccl for a CUDA "
                                    "model, else gloo)")
    search_parser.set_defaults(handler=command_search)

    report = commands.add_parser("report", help="print a strategy's table; --png draws maps and masks")
    report.add_argument("strategy", help="strategy JSON file (or a quality_pareto.py rows JSON: --quality-png draws it)")
    report.add_argument("--png", default=None, help="write a picture here (more pages as <name>-2.png, ...)")
    report.add_argument("--quality-png", default=None, help="draw the measured model-level error of the allocations "
                        "the search verified against their density (strategies searched with a model-level budget)")
    report.add_argument("--profile", default=None, help="profile maps JSON (default: <strategy>.profile.json)")
    report.set_defaults(handler=command_report)

    from sparsify.cost import calibrate

    calibrate_parser = commands.add_parser("calibrate", help="measure a backend on this device and write a hardware profile")
    # Defaults are calibrate()'s own (read from its signature, not repeated here).
    defaults = {name: parameter.default for name, parameter in inspect.signature(calibrate).parameters.items()}

    def shown(name: str) -> str:
        value = defaults[name]
        return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

    calibrate_parser.add_argument("--backend", default=defaults["backend"],
                                  help=f"backend to measure (default {shown('backend')})")
    calibrate_parser.add_argument("--device", default=defaults["device"],
                                  help=f"device to measure on (default {shown('device')})")
    calibrate_parser.add_argument("--lengths", type=int, nargs="+", default=None,
                                  help=f"sequence lengths to time (default {shown('lengths')})")
    calibrate_parser.add_argument("--repeats", type=int, default=None,
                                  help=f"timed calls per measurement (default {shown('repeats')})")
    calibrate_parser.add_argument("--heads", type=int, default=None,
                                  help=f"heads of the timed attention (default {shown('heads')})")
    calibrate_parser.add_argument("--head-dim", type=int, default=None, help=f"head size (default {shown('head_dim')})")
    calibrate_parser.add_argument("--block-size", type=int, default=None,
                                  help=f"block edge in tokens (default {shown('block_size')})")
    calibrate_parser.add_argument("--out", default="hardware_profile.json",
                                  help="where to write the profile (default hardware_profile.json)")
    calibrate_parser.set_defaults(handler=command_calibrate)

    from sparsify.export import DEFAULT_MAX_SEQ_LEN, MIN_OPSET
    bench = commands.add_parser("bench", help="time the original and the sparsified model end to end on this device")
    bench.add_argument("--model", required=True, help="package.module:factory returning (model, example_inputs)")
    bench.add_argument("--strategy", required=True, help="strategy JSON file")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="cast the model and floating inputs (default: as the factory made them)")
    bench.add_argument("--backend", default="auto", help="backend name or 'auto'")
    bench.add_argument("--door", default="graph", choices=["graph", "framework"],
                       help="graph: sparsify.compile; framework: sparsify.attach (transformers / diffusers models)")
    bench.add_argument("--torch-compile", action="store_true", help="torch.compile both models before timing")
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    bench.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported (default 10)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (on a shared machine: 1)")
    bench.set_defaults(handler=command_bench)


    export = commands.add_parser("export", help="apply a strategy and export the sparse model to ONNX")
    export.add_argument("--model", default=DEFAULT_EXAMPLE, help="package.module:factory")
    export.add_argument("--strategy", required=True, help="strategy JSON file")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    _add_option(export, "backend", str)
    export.add_argument("--opset", type=int, default=None, help=f"ONNX opset (>= {MIN_OPSET}; default: exporter's)")
    export.add_argument("--lengths", default="auto",
                        help="auto (any length unless a site's pattern pins it), any, fixed (the example's), or a "
                             "comma-separated list of lengths to serve (512,1024 or 64x512 pairs)")
    export.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                        help=f"longest length an any-length file serves (default {DEFAULT_MAX_SEQ_LEN})")
    export.add_argument("--check", action="store_true", help="run the file in onnxruntime and compare outputs")
    export.set_defaults(handler=command_export)

    demo = commands.add_parser("demo", help="run the whole flow on a built-in example (no downloads)")
    demo.add_argument("--frames", type=int, default=8, help="video frames of 16x16 tokens (default 8: 2048 tokens)")
    demo.add_argument("--window", type=int, default=256, help="sliding window in tokens")
    demo.add_argument("--out", default=None, help="write the strategy JSON here")
    demo.set_defaults(handler=command_demo)
    return parser


@contextlib.contextmanager
def cli_output(verbosity: int) -> Iterator[None]:
    """Logging and warnings for one CLI run, restored afterwards.

    sparsify's loggers print warnings (``-v``: info, ``-vv``: debug); third-party loggers (torch,
    onnxscript, ...) print errors only, and Python warnings are hidden (``-v``: both shown). The
    CLI owns the process's output, so this is where it is configured — the library never does.
    """
    own_level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    others_level = [logging.ERROR, logging.WARNING, logging.DEBUG][min(verbosity, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, own, torch_logger = logging.getLogger(), logging.getLogger("sparsify"), logging.getLogger("torch")
    saved = (root.level, own.level, torch_logger.level)
    root.addHandler(handler)
    root.setLevel(others_level)
    own.setLevel(own_level)
    torch_logger.setLevel(others_level)  # torch's own handler prints through this logger's level
    with warnings.catch_warnings():
        if verbosity:
            logging.captureWarnings(True)
        else:
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.captureWarnings(False)
            root.removeHandler(handler)
            root.setLevel(saved[0])
            own.setLevel(saved[1])
            torch_logger.setLevel(saved[2])


def main(argv: Sequence[str] | None = None) -> int:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # --model mymodule:factory from the current directory
    parser = build_parser()
    args = parser.parse_args(argv)
    from sparsify.errors import SparsifyError

    with cli_output(args.verbose):
        try:
            return args.handler(args)
        except SparsifyError as error:
            print(f"sparsify-cli {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    raise SystemExit(main())
