"""Wall time of capture + find_attention on CPU: a 2-layer HF Swin (224×224, window 7) and small HF/torch models.

Compares ``dynamic=True`` (batch and sequence dims dynamic: the default) with ``dynamic="all"``
(every dim dynamic, as capture did before; Swin's window partition makes it slow), and shows
that ``compile(..., example_inputs=sites)`` reuses the graph ``find_attention`` captured.
Prints each row and writes it to the JSON file (default benchmarks/results/capture_cpu.json,
``{"meta", "rows", "complete"}``) as soon as it is measured, then a table.

    python benchmarks/capture_bench.py [--image 224] [--skip-all]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import sparsify
from bench_rows import RowLog
from sparsify.api import capture_attention


def hf_swin(image: int) -> tuple[torch.nn.Module, dict]:
    import transformers

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=image, patch_size=4, num_channels=3, embed_dim=96, depths=[2],
                                     num_heads=[3], window_size=7)
    return transformers.SwinModel(config).eval(), {"pixel_values": torch.randn(2, 3, image, image)}


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--skip-all", action="store_true", help="skip the slow dynamic='all' capture")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "capture_cpu.json"))
    args = parser.parse_args()

    model, inputs = hf_swin(args.image)
    meta = {"benchmark": "capture", "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "image": args.image}
    with RowLog(args.out, meta=meta) as log:
        for dynamic in ([True] if args.skip_all else [True, "all"]):
            seconds, (captured, sites) = timed(lambda: capture_attention(model, inputs, dynamic=dynamic))
            log.add(case=f"swin_dynamic_{dynamic}", step=f"HF Swin 2 layers, dynamic={dynamic!r}",
                    seconds=round(seconds, 2), sites=len(sites), dynamic=captured.dynamic)
        seconds, sites = timed(lambda: sparsify.find_attention(model, inputs))
        log.add(case="find_attention", step="find_attention", seconds=round(seconds, 2), sites=len(sites))
        reuse, _ = timed(lambda: sparsify.compile(model, strategy=sparsify.Strategy.dense(sites), example_inputs=sites))
        log.add(case="compile_reusing", step="compile(example_inputs=sites): reuses the graph",
                seconds=round(reuse, 2))
        again, _ = timed(lambda: sparsify.compile(model, strategy=sparsify.Strategy.dense(sites),
                                                  example_inputs=inputs))
        log.add(case="compile_capturing_again", step="compile(example_inputs=inputs): captures again",
                seconds=round(again, 2))
        print(log.table(floatfmt=".1f"))


if __name__ == "__main__":
    main()
