"""Median step time of a callable for the benchmarks: CUDA events on a GPU, wall clock on CPU, after warm-up.

Example:
    >>> median_ms(lambda: sum(range(1000)), "cpu", repeats=3, warmup=1) > 0
    True
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["device_description", "error_text", "median_ms", "relative_error"]


def median_ms(function: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of one call of ``function`` over ``repeats`` calls, after ``warmup`` untimed ones.

    On CUDA each call is bracketed by CUDA events on the current stream (the GPU time from the
    call's first launch to its last kernel's end); on CPU, wall time.

    Example:
        >>> median_ms(lambda: None, "cpu", repeats=2, warmup=0) >= 0
        True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            function()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖output - reference‖ / ‖reference‖`` in float32.

    Example:
        >>> relative_error(torch.ones(4), torch.ones(4))
        0.0
    """
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-30))


def device_description(device: torch.device | str) -> str:
    """The card's name on CUDA, ``"cpu"`` otherwise (for a benchmark's header)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def error_text(error: BaseException, limit: int = 400) -> str:
    """``"Type: message"`` of an exception, cut to ``limit`` characters (what a failed row records).

    Example:
        >>> error_text(ValueError("bad"))
        'ValueError: bad'
    """
    return f"{type(error).__name__}: {error}"[:limit]
