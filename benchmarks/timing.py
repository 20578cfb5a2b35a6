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

__all__ = ["device_description", "error_text", "host_issue_ms", "host_profile", "kernel_table", "median_ms",
           "profiled", "relative_error"]


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


def host_issue_ms(function: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int = 3) -> float:
    """Median host milliseconds to *issue* one call of ``function`` (from an idle device; no wait for its kernels).

    Beside `median_ms` it tells whether a call is bound by its host side: a call whose issue time
    is close to its device time leaves the GPU waiting on Python and launches.

    Example:
        >>> host_issue_ms(lambda: sum(range(1000)), "cpu", repeats=3, warmup=1) > 0
        True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        function()
        times.append((time.perf_counter() - begin) * 1e3)
    synchronize(device)
    return statistics.median(times)


def profiled(function: Callable[[], Any], calls: int, warmup: int = 1) -> "pstats.Stats":
    """`cProfile` statistics of ``calls`` calls of ``function``, after ``warmup`` unprofiled ones.

    Example:
        >>> profiled(lambda: sorted(range(10)), calls=3).total_calls >= 3
        True
    """
    import cProfile
    import pstats

    for _ in range(warmup):
        function()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        function()
    profiler.disable()
    return pstats.Stats(profiler)


def host_profile(function: Callable[[], Any], top: int = 8, calls: int = 5) -> list:
    """Where one call's *host* time goes, by `cProfile`: the ``top`` functions by own time, ``[name, calls, ms]`` per call.

    Beside `kernel_table` (which counts launches and operators) it names the Python and C functions
    that hold the host: a call whose issue time exceeds its kernels' time shows here what to cut
    (Triton's launcher, a tensor copy, a host read). The function is called once to warm up, then
    ``calls`` times under the profiler; times are per call.

    Example:
        >>> host_profile(lambda: sorted(range(1000)), top=1)[0][0]
        '<built-in method builtins.sorted>'
    """
    stats = profiled(function, calls).stats     # {(file, line, name): (calls, primitive calls, own s, total s, ...)}

    def label(where: tuple) -> str:
        file, line, name = where
        return name if file == "~" else f"{'/'.join(file.rsplit('/', 2)[-2:])}:{line}({name})"

    ranked = sorted(((where, numbers) for where, numbers in stats.items() if "_lsprof.Profiler" not in where[2]),
                    key=lambda item: item[1][2], reverse=True)[:top]
    return [[label(where)[:90], round(numbers[0] / calls, 1), round(numbers[2] / calls * 1e3, 4)]
            for where, numbers in ranked]


def kernel_table(function: Callable[[], Any], device: torch.device | str, top: int = 10) -> dict:
    """Where one call's time goes, by `torch.profiler`: its device kernels (count, heaviest) and its host operators.

    Returns ``{"launches", "host_ops", "kernels"}``: the call's number of device kernels (0 on CPU), of
    aten operators, and its ``top`` heaviest kernels as ``[name, calls, microseconds]`` (on CPU: the
    heaviest operators by self time).

    Example:
        >>> kernel_table(lambda: torch.ones(3) + 1, "cpu")["host_ops"] >= 1
        True
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    function()                                       # compiled, cached, warm
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        function()
        if cuda:
            torch.cuda.synchronize(device)
    averages = profiler.key_averages()

    def self_us(event, on_device: bool) -> float:
        names = ("self_device_time_total", "self_cuda_time_total") if on_device else ("self_cpu_time_total",)
        return next((float(getattr(event, name)) for name in names if hasattr(event, name)), 0.0)

    on_device = [event for event in averages
                 if cuda and getattr(event, "device_type", None) == DeviceType.CUDA and self_us(event, True) > 0]
    host_ops = sum(event.count for event in averages if event.key.startswith("aten::"))
    ranked = on_device if cuda else [event for event in averages if event.key.startswith("aten::")]
    ranked = sorted(ranked, key=lambda event: self_us(event, cuda), reverse=True)
    return {"launches": sum(event.count for event in on_device), "host_ops": host_ops,
            "kernels": [[event.key[:80], event.count, round(self_us(event, cuda), 1)] for event in ranked[:top]]}


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
