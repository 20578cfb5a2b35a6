"""Wall time and memory of the whole search (profile, scoring, sensitivities, allocation, verification).

Models (``--model``):

* ``video`` (default, CPU): a 12-layer, 8-head structured video transformer at 4K tokens, 4 batches;
* ``wan``: diffusers' ``WanTransformer3DModel`` at the Wan2.1-T2V-1.3B configuration (random weights,
  built from its config as in ``benchmarks/wan_bench.py``), bf16, one 480p latent video of
  21 x 60 x 104 (32,760 tokens) plus 512 text tokens per batch;
* ``llama``: a 16-layer Llama-3.2-1B-shaped causal model (transformers ``LlamaModel`` from a config:
  hidden 2048, 32 heads, 8 key/value heads, random weights), bf16, 32K tokens per batch (the base
  model's hidden states are the output: 32K x 128K logits would not fit the memory target).

Each run prints one row per model as soon as it is measured (``RowLog``: the JSON survives a
crash) with the seconds of every search phase — what dominates the time — and, on CUDA, the
peak GPU memory the search added over the model and its inputs. Targets on one H100/H200:
profile + sensitivities + search + verification <= 180 s, peak extra GPU memory <= 16 GB.

    python benchmarks/search_bench.py                                   # CPU, the video model (target <= 60 s)
    python benchmarks/search_bench.py --device cuda --model wan llama --batches 3
    python benchmarks/search_bench.py --device cpu --model wan llama --tiny       # smoke run of the GPU paths
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch

import sparsify
from sparsify.api import search_model
from sparsify.cost import device_name
from sparsify.toy_models import StructuredVideoTransformer
from sparsify.options import CompileOptions

from bench_rows import RowLog

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: Wan2.1-T2V-1.3B (its transformer config) and a tiny one of the same structure for smoke runs.
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=128,
                num_layers=2, rope_max_seq_len=64)
#: Llama-3.2-1B's shape at 16 layers, and a tiny one.
LLAMA_1B_16 = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA_TINY = dict(LLAMA_1B_16, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096)


def video_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list, str]:
    frames = 2 if args.tiny else args.frames
    model = StructuredVideoTransformer(frames=frames, heads=args.heads, layers=2 if args.tiny else args.layers,
                                       dim=32 * args.heads).eval().to(device, dtype)
    batches = [model.example_tokens(seed=1 + i).to(device, dtype) for i in range(args.batches)]
    return model, batches, f"{model.positions.shape[0]} tokens"


def wan_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list, str]:
    from diffusers import WanTransformer3DModel

    config = WAN_TINY if args.tiny else WAN_1_3B
    frames, height, width, text = (3, 8, 8, 16) if args.tiny else (21, 60, 104, 512)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).eval().to(device, dtype)
    batches = []
    for seed in range(args.batches):
        generator = torch.Generator().manual_seed(seed)
        batches.append({
            "hidden_states": torch.randn(1, 16, frames, height, width, generator=generator).to(device, dtype),
            "timestep": torch.tensor([500 + 100 * seed], device=device),
            "encoder_hidden_states": torch.randn(1, text, config["text_dim"], generator=generator).to(device, dtype),
            "return_dict": False})
    tokens = frames * (height // 2) * (width // 2)
    return model, batches, f"{tokens} video + {text} text tokens"


def llama_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list, str]:
    import transformers

    shape = LLAMA_TINY if args.tiny else LLAMA_1B_16
    tokens = 512 if args.tiny else args.llama_tokens
    config = transformers.LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval().to(device, dtype)
    batches = []
    for seed in range(args.batches):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, shape["vocab_size"], (1, tokens), generator=generator).to(device)
        batches.append({"input_ids": ids, "use_cache": False})
    return model, batches, f"{tokens} tokens"


MODELS: dict[str, Callable[..., tuple[torch.nn.Module, list, str]]] = {
    "video": video_model, "wan": wan_model, "llama": llama_model}


def run(name: str, args: argparse.Namespace, log: RowLog) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, batches, shape = MODELS[name](args, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    options = CompileOptions(adaptive=args.adaptive, **({"max_error": args.max_error} if args.max_error is not None
                                                        else {}),
                             **({"max_output_error": args.max_output_error} if args.max_output_error is not None
                                else {}))
    start = time.perf_counter()
    with torch.no_grad():
        result = search_model(model, batches, options, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    phases = result.search.seconds
    searched = sum(phases.values())
    summary = result.compiled.strategy.summary()
    output = summary.get("output_error") or {}
    row = {
        "model": name, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "batches": len(batches),
        "sites": summary["num_sites"], "seconds_total": round(seconds, 2),
        # profile + scoring + sensitivities + allocation + verification (capture and rewrite excluded)
        "seconds_search": round(searched, 2),
        **{f"s_{phase.replace(' ', '_')}": round(value, 2) for phase, value in phases.items()},
        "dominant_phase": max(phases, key=phases.get) if phases else None,
        "mean_density": round(summary["mean_density"], 4) if summary["mean_density"] is not None else None,
        "estimated_speedup": summary["estimated_speedup"], "end_to_end_error": summary["end_to_end_error"],
        "promised": output.get("promised"), "measured": output.get("measured"),
    }
    if device.type == "cuda":
        row["peak_extra_gib"] = round((torch.cuda.max_memory_allocated(device) - baseline) / 2**30, 2)
        row["within_targets"] = searched <= 180 and row["peak_extra_gib"] <= 16
    log.add(**row)
    del result, model, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["video"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configurations of the same structure (smoke runs)")
    parser.add_argument("--layers", type=int, default=12, help="video model: layers")
    parser.add_argument("--heads", type=int, default=8, help="video model: heads")
    parser.add_argument("--frames", type=int, default=16, help="video model: frames of 16x16 tokens (16: 4096 tokens)")
    parser.add_argument("--llama-tokens", type=int, default=32768)
    parser.add_argument("--batches", type=int, default=4, help="calibration batches (a quarter is held out)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="also score input-adaptive candidates (default: yes)")
    parser.add_argument("--max-output-error", type=float, default=None, help="model-level budget (default: the library's)")
    parser.add_argument("--max-error", type=float, default=None, help="per-site cap (alone: a per-site budget)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/search_<device>.json)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(RESULTS, f"search_{torch.device(args.device).type}{'_tiny' if args.tiny else ''}.json")
    meta = {"device": device_name(args.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sparsify": sparsify.__version__, "arguments": vars(args)}
    with RowLog(out, meta=meta) as log:
        for name in args.model:
            run(name, args, log)
    print(log.table())
    print(f"written {out}")


if __name__ == "__main__":
    main()
