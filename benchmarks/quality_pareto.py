"""Perplexity ratio against density: our search against three anchors, on SmolLM2-135M (real weights, held-out text).

At each target density (default 0.3, 0.4, 0.5, 0.6, 0.7) the script measures the perplexity ratio
(compiled / dense) on evaluation windows of texts the search never saw, for:

* ``ours`` — the search with ``target_density`` (the least model-level error at that density:
  sensitivities measured once, one allocation per density);
* ``streaming_llm`` — StreamingLLM's shape: attention sinks + a sliding window, the same on every
  head, the window sized so the causal density is the target;
* ``minference`` — MInference's shape: estimated vertical-slash on every head (per input, on the
  device), its budgets scaled until the density it realises on a calibration window is the target;
* ``oracle_top_k`` — a static per-head oracle: each head's block top-k read off the search's
  profile at the uniform target density.

Each row (method, target, realised density, ppl ratio) is printed and written as it is measured
(``RowLog``); at the end a table, and a PNG (ppl ratio against density, one line per method).
Target: ours <= each anchor at every density. The model, texts and windows are those of
``examples/smollm2_perplexity.py`` (calibrate on ``python-docs``, evaluate on ``licenses`` and
``vim-manual``); pricing is by kept work (the quality/density trade-off itself).

    python benchmarks/quality_pareto.py                                   # CPU: long (tens of minutes)
    python benchmarks/quality_pareto.py --device cuda --tokens 2048
    python benchmarks/quality_pareto.py --densities 0.3 0.5 --evaluation 1 # a quicker CPU run
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "examples"))

import sparsify  # noqa: E402
from bench_rows import RowLog  # noqa: E402
from example_tools import RealisedDensity  # noqa: E402
from smollm2_perplexity import (TEXT_SOURCES, load_model, model_files, perplexity, token_windows,  # noqa: E402
                                window_losses, work_only_cost_model)
from sparsify import patterns  # noqa: E402
from sparsify.api import search_model  # noqa: E402
from sparsify.options import CompileOptions  # noqa: E402
from sparsify.report import render_quality_png  # noqa: E402
from sparsify.search import choose  # noqa: E402
from sparsify.search.assembly import build_strategy  # noqa: E402
from sparsify.strategy import Strategy  # noqa: E402

METHODS = ("ours", "streaming_llm", "minference", "oracle_top_k")


def window_for_density(sites, block_size: int, target: float, sink_tokens: int) -> int:
    """The smallest window whose ``a_shape(sink_tokens, window)`` keeps at least ``target`` of the causal blocks."""
    length = max(site.q_len for site in sites)
    low, high = 1, length
    while low < high:
        middle = (low + high) // 2
        density = Strategy.uniform(sites, patterns.a_shape(sink_tokens, middle), block_size).summary()["mean_density"]
        if density >= target:
            high = middle
        else:
            low = middle + 1
    return low


def realised_density(compiled: torch.nn.Module, windows: Sequence[torch.Tensor]) -> float:
    with RealisedDensity(compiled) as realised, torch.no_grad():
        for window in windows:
            compiled(input_ids=window)
    return float(realised.result()["mean_density"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=4, help="calibration windows (a quarter held out)")
    parser.add_argument("--evaluation", type=int, default=3, help="evaluation windows per evaluation source")
    parser.add_argument("--sink-tokens", type=int, default=64, help="StreamingLLM's sinks (tokens)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="our search also scores input-adaptive candidates")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality_pareto_<tokens>.json)")
    parser.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    if not all(0 < density <= 1 for density in args.densities):
        parser.error(f"--densities must lie in (0, 1], got {args.densities}")
    out = args.out or os.path.join(HERE, "results", f"quality_pareto_{args.tokens}.json")
    png = args.png or os.path.splitext(out)[0] + ".png"
    device = torch.device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    texts = {source: TEXT_SOURCES[source]() for source in ("python-docs", "licenses", "vim-manual")}
    folder, gguf_file = model_files()
    tokenizer, model = load_model(folder, gguf_file)
    model = model.to(device)

    def windows(source: str, count: int) -> list[torch.Tensor]:
        return [w.to(device) for w in token_windows(tokenizer, texts[source], args.tokens, count, source=source)]

    calibration = windows("python-docs", args.calibration)
    evaluation = windows("licenses", args.evaluation) + windows("vim-manual", args.evaluation)
    started = time.perf_counter()
    dense_ppl = perplexity(window_losses(model, evaluation))
    print(f"dense perplexity {dense_ppl:.4f} on {len(evaluation)} evaluation windows of {args.tokens} tokens "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    # One search: profile, scores and sensitivities; each density is then one allocation of the same measurements.
    options = CompileOptions(block_size=args.block_size, adaptive=args.adaptive)
    with torch.no_grad():
        searched = search_model(model, [{"input_ids": window} for window in calibration], options,
                                cost_model=work_only_cost_model())
    result = searched.search
    sensitivities = result.strategy.metadata["output_budget"]["sensitivities"]
    sites = result.sites
    example = {"input_ids": calibration[0]}

    def evaluate(method: str, target: float, strategy: Strategy, log: RowLog, **extra: Any) -> None:
        compiled = sparsify.compile(model, strategy=strategy, example_inputs=example)
        begun = time.perf_counter()
        with RealisedDensity(compiled) as realised:
            losses = window_losses(compiled, evaluation)
        ratio = perplexity(losses) / dense_ppl
        log.add(method=method, target_density=target, density=round(float(realised.result()["mean_density"]), 4),
                ppl_ratio=round(ratio, 5), seconds=round(time.perf_counter() - begun, 1), **extra)

    meta = {"model": f"SmolLM2-135M-Instruct ({gguf_file})", "tokens": args.tokens, "block_size": args.block_size,
            "calibration": "python-docs", "evaluation": ["licenses", "vim-manual"], "dense_ppl": dense_ppl,
            "pricing": "kept work only", "device": str(device), "sensitivities": sensitivities}
    builders: dict[str, Callable[[float], tuple[Strategy, dict]]] = {}

    def ours(target: float) -> tuple[Strategy, dict]:
        config = CompileOptions(block_size=args.block_size, adaptive=args.adaptive, target_density=target)
        allocation = choose(sites, result.options, config, sensitivities)
        strategy = build_strategy(sites, result.options, allocation.chosen, result.strategy.block_size, config,
                                  work_only_cost_model(), result.strategy.metadata["backend"], device,
                                  allocation.target)
        return strategy, {"predicted": round(math.sqrt(allocation.predicted or 0.0), 6)}

    def streaming_llm(target: float) -> tuple[Strategy, dict]:
        window = window_for_density(sites, args.block_size, target, args.sink_tokens)
        return Strategy.uniform(sites, patterns.a_shape(args.sink_tokens, window), args.block_size), {"window": window}

    def minference(target: float) -> tuple[Strategy, dict]:
        fraction = target / 2
        for _ in range(3):  # scale the budgets until the density realised on a calibration window is the target
            strategy = Strategy.uniform(sites, patterns.estimated_vertical_slash(fraction, fraction, sink_blocks=1),
                                        args.block_size)
            density = realised_density(sparsify.compile(model, strategy=strategy, example_inputs=example),
                                       calibration[:1])
            if abs(density - target) <= 0.02 * target:
                break
            fraction = min(1.0, fraction * target / max(density, 1e-6))
        return strategy, {"fraction": round(fraction, 5)}

    def oracle_top_k(target: float) -> tuple[Strategy, dict]:
        strategy = Strategy.dense(sites, block_size=args.block_size)
        for site in sites:
            mass = result.profiles[site.name].normalized()
            heads = [patterns.block_top_k.from_block_scores(mass[head], density=target, causal=site.causal,
                                                            relative_to="diagonal") for head in range(site.num_heads)]
            strategy = strategy.with_heads(site.name, heads)
        return strategy, {}

    builders.update(ours=ours, streaming_llm=streaming_llm, minference=minference, oracle_top_k=oracle_top_k)
    with RowLog(out, meta=meta) as log:
        for target in args.densities:
            for method in args.methods:
                with torch.no_grad():
                    strategy, extra = builders[method](target)
                    evaluate(method, target, strategy, log, **extra)
    print(log.table())
    series = {method: [(row["density"], row["ppl_ratio"]) for row in log.rows if row["method"] == method]
              for method in args.methods}
    drawn = render_quality_png(series, png, ylabel="perplexity ratio (compiled / dense)", reference=1.0,
                               title=f"SmolLM2-135M at {args.tokens} tokens: perplexity ratio against density")
    print(f"plot: {drawn}")
    wins = []
    for target in args.densities:
        rows = {row["method"]: row["ppl_ratio"] for row in log.rows if row["target_density"] == target}
        if "ours" in rows:
            wins.append(all(rows["ours"] <= value for method, value in rows.items() if method != "ours"))
    print(f"ours <= every anchor at {sum(wins)} of {len(wins)} densities; written {out}")


if __name__ == "__main__":
    main()
