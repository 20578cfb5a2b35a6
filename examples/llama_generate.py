"""`generate` with a sparse prefill: a strategy attached to a transformers Llama through ``AttentionInterface``.

The model is transformers' `LlamaForCausalLM` built from a config with random weights (no
download): 4 layers, 8 query / 2 key-value heads of 64, its heads given positional structure
(`give_heads_positional_structure`; ``--sharpness 0`` keeps plain random weights). The strategy keeps attention sinks and a
sliding window on every head (StreamingLLM's shape), saved as JSON and attached with
``sparsify.attach``. The script checks that a dense strategy generates exactly the original tokens,
then times the prefill of a long prompt and a greedy generation, original vs attached.

    python examples/llama_generate.py [--prompt 8192] [--window 256] [--new-tokens 16]
    sparsify-cli bench --model examples.llama_generate:factory --strategy llama.json --door framework

``factory`` (for ``sparsify-cli``) returns the model and a prompt of 8192 tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import sparsify
from sparsify import patterns

VOCAB = 1024


def build_model(seed: int = 0, sharpness: float = 3.0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
                                      intermediate_size=1024, vocab_size=VOCAB, max_position_embeddings=16384,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=0, attention_bias=True,
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    if sharpness:
        give_heads_positional_structure(model, sharpness)
    return model


def give_heads_positional_structure(model, sharpness: float) -> None:
    """Let every head attend by relative position (local, with a long faint tail), as trained LLM heads largely do.

    Random weights give diffuse attention, which no sparse pattern approximates. Here each head's
    queries and keys are dominated by one bias vector (a key/value head's, shared by its query
    heads), so after the rotary embedding a score depends on the distance between tokens.
    """
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            key_bias = torch.randn(config.num_key_value_heads, head_dim) * sharpness
            attention.k_proj.weight.mul_(0.02)
            attention.q_proj.weight.mul_(0.02)
            attention.k_proj.bias.copy_(key_bias.flatten())
            attention.q_proj.bias.copy_(key_bias.repeat_interleave(group, 0).flatten())


def prompt(tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))


def factory(tokens: int = 8192):
    """``(model, example_inputs)`` for ``sparsify-cli``: the Llama and one prompt."""
    return build_model(), {"input_ids": prompt(tokens)}


def seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--window", type=int, default=256, help="sliding window in tokens")
    parser.add_argument("--sharpness", type=float, default=3.0,
                        help="how strongly heads attend by relative position (0: plain random weights)")
    parser.add_argument("--sinks", type=int, default=64, help="attention-sink tokens")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared machine: 1)")
    parser.add_argument("--out", default=None, help="strategy JSON (default: a temporary file)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(sharpness=args.sharpness)
    ids = prompt(args.prompt)
    sites = sparsify.find_attention(model, {"input_ids": ids[:, :256]})
    pattern = patterns.attention_sinks(args.sinks) | patterns.sliding_window(args.window)
    strategy = sparsify.Strategy.uniform(sites, pattern, block_size=args.block_size)
    path = args.out or os.path.join(tempfile.mkdtemp(), "llama.json")
    strategy.save(path)
    print(f"LlamaForCausalLM (random weights, 4 layers, 8/2 heads of 64), prompt {args.prompt} tokens; strategy "
          f"{pattern} on all {len(sites)} sites, block {args.block_size} -> {path}")

    def greedy(module, tokens):
        with torch.no_grad():
            return module.generate(tokens, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    dense = sparsify.attach(model, sparsify.Strategy.dense(sites, block_size=args.block_size))
    short = ids[:, :512]
    same = torch.equal(greedy(dense, short), greedy(model, short))
    print(f"dense strategy through attach: greedy tokens {'equal to' if same else 'DIFFER from'} the original's")

    attached = sparsify.attach(model, path)
    with torch.no_grad():
        runtime = next(iter(sparsify.integrations.attached_sites(attached).values()))
        density = runtime.runtime_mask(args.prompt, args.prompt, "cpu").density()       # over the causal blocks
        prefill_dense = seconds(lambda: model(ids, use_cache=False), args.repeats)
        prefill_sparse = seconds(lambda: attached(ids, use_cache=False), args.repeats)
        logits_error = float((attached(ids, use_cache=False).logits - model(ids, use_cache=False).logits).norm()
                             / model(ids, use_cache=False).logits.norm())
    generate_dense = seconds(lambda: greedy(model, ids), 1)
    generate_sparse = seconds(lambda: greedy(attached, ids), 1)
    agree = float((greedy(attached, ids)[:, -args.new_tokens:] == greedy(model, ids)[:, -args.new_tokens:])
                  .float().mean())
    print(f"prefill of {args.prompt} tokens ({density:.3f} of the causal blocks): dense "
          f"{prefill_dense * 1e3:.0f} ms, attached {prefill_sparse * 1e3:.0f} ms ({prefill_dense / prefill_sparse:.2f}x); "
          f"logits relative error {logits_error:.2e}")
    print(f"generate {args.new_tokens} tokens (prefill + dense decode steps on the dynamic cache): dense "
          f"{generate_dense:.2f} s, attached {generate_sparse:.2f} s ({generate_dense / generate_sparse:.2f}x); "
          f"{agree:.0%} of the new tokens equal the original's")


if __name__ == "__main__":
    main()
