"""Attention time of a model step (torch.profiler, attention kernels by name) and the ideal step time its density allows.

A sparsified model can at best save the attention work its strategy drops, so the honest ideal for
one step is::

    ideal = dense_step - attention + density x attention

where ``attention`` is the time the dense step spends in attention kernels, measured in the same
mode as ``dense_step`` (eager, ``torch.compile``, CUDA graphs), and ``density`` is the kept work
over the work dense attention does (`attention_density`). ``fraction of ideal = ideal / sparse``
(1.0: the sparse step is as fast as its density allows).

Why not "the step with attention skipped": under ``torch.compile`` Inductor removes the skipped
heads' projections as dead code, so that step undercuts anything attention could reach (a Wan
step: dense 518 ms, skipped 131 ms, sparse 237 ms; eager 621 / 280 / 337 ms).

How attention is timed: on CUDA, the GPU time of the kernels whose names are attention kernels
(`is_attention_kernel`: cuDNN's SDPA, FlashAttention 2/3/4, the memory-efficient CUTLASS kernels,
sparsify's block-sparse kernel, FlexAttention templates), summed over a few profiled steps; the
math SDPA backend (separate matmul and softmax kernels) is not counted. On CPU (smoke runs), the
CPU time of the outermost attention operators (`is_attention_operator`), taken as a share of the
profiled step (`AttentionTime.attention_ms_at`: the profiler slows CPU operators).

Example:
    >>> ideal_step_ms(dense_step_ms=600.0, attention_ms=400.0, density=0.15)
    260.0
    >>> is_attention_kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0")
    True
    >>> is_attention_kernel("triton_poi_fused__scaled_dot_product_cudnn_attention_transpose_0")
    False
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterable

import torch

import sparsify

__all__ = ["AttentionTime", "attention_density", "attention_family", "fraction_of_ideal", "ideal_step_ms",
           "is_attention_kernel", "is_attention_operator", "measure_attention_time"]

#: Attention kernels by family: a GPU kernel whose name matches one of these runs attention.
ATTENTION_KERNEL_FAMILIES: dict[str, re.Pattern[str]] = {
    # cuDNN's fused attention ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_...").
    "cudnn": re.compile(r"cudnn.*(sdpa|fmha|flash_[fb]prop)", re.IGNORECASE),
    # FlashAttention 2 (PyTorch's pytorch_flash::flash_fwd_kernel, flash_fwd_splitkv_*), 3 and 4 (CuTe DSL:
    # "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at_...").
    "flash": re.compile(r"flash_fwd|flash_bwd|flash::|FlashAttn|FlashAttention|flash_attn"),
    # The memory-efficient SDPA backend (CUTLASS, xFormers' kernels).
    "efficient": re.compile(r"fmha_cutlass|AttentionKernel|\bfmha"),
    # sparsify's own block-sparse Triton kernel.
    "sparsify": re.compile(r"block_sparse_fwd|block_sparse_attention"),
    # FlexAttention's Inductor templates.
    "flex": re.compile(r"flex_attention|flex_decoding"),
}
#: Kernels that are never attention even when their names mention it: Inductor's generated pointwise,
#: reduction and foreach kernels are named after the ATen ops they were fused from
#: ("triton_poi_fused__scaled_dot_product_cudnn_attention_transpose_0" is a layout copy), and memory copies.
NOT_ATTENTION_KERNEL = re.compile(r"^(triton_(poi|per|red|for)_|Memcpy|Memset)", re.IGNORECASE)
#: Attention operators (CPU runs): SDPA and its backends' ATen ops, and sparsify's custom ops.
ATTENTION_OPERATOR = re.compile(r"^(aten::(_?scaled_dot_product\w*|_flash_attention\w*|_efficient_attention\w*"
                                r"|flex_attention\w*)|sparsify::\w*attention\w*)$")


def attention_family(kernel_name: str) -> str | None:
    """The attention family (``cudnn``, ``flash``, ``efficient``, ``sparsify``, ``flex``) of a GPU kernel, or None.

    Example:
        >>> attention_family("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)")
        'efficient'
        >>> attention_family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") is None
        True
    """
    if NOT_ATTENTION_KERNEL.search(kernel_name):
        return None
    for family, pattern in ATTENTION_KERNEL_FAMILIES.items():
        if pattern.search(kernel_name):
            return family
    return None


def is_attention_kernel(kernel_name: str) -> bool:
    """Whether a GPU kernel (by its profiler name) computes attention (see `attention_family`).

    Example:
        >>> is_attention_kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>")
        True
    """
    return attention_family(kernel_name) is not None


def is_attention_operator(operator_name: str) -> bool:
    """Whether a profiled operator (CPU runs) is an attention operator: SDPA's ATen ops or sparsify's.

    Example:
        >>> is_attention_operator("aten::_scaled_dot_product_flash_attention_for_cpu"), is_attention_operator("aten::mm")
        (True, False)
    """
    return ATTENTION_OPERATOR.match(operator_name) is not None


@dataclasses.dataclass(frozen=True)
class AttentionTime:
    """Milliseconds per step spent in attention, and where they were found.

    Attributes:
        attention_ms: attention time per step (GPU kernel time on CUDA, operator time on CPU).
        by_family: the same split by attention family (``cudnn``, ``flash``, ... or ``operator`` on CPU).
        calls_per_step: attention kernels (or outermost operators) per step.
        steps: how many steps were profiled.
        source: ``"cuda kernels"`` or ``"cpu operators"``.
        profiled_step_ms: wall time per step while profiled (``None`` when not measured).
    """

    attention_ms: float
    by_family: dict[str, float]
    calls_per_step: float
    steps: int
    source: str
    profiled_step_ms: float | None = None

    def attention_ms_at(self, step_ms: float) -> float:
        """The attention time of a step that took ``step_ms`` without the profiler.

        On CUDA, the kernels' own time (the profiler does not slow the GPU). On CPU the profiler
        slows every operator, so the attention's share of the profiled step, times ``step_ms``.

        Example:
            >>> AttentionTime(2.0, {}, 1.0, 1, "cpu operators", profiled_step_ms=8.0).attention_ms_at(4.0)
            1.0
        """
        if self.source == "cuda kernels" or not self.profiled_step_ms:
            return self.attention_ms
        return self.attention_ms / self.profiled_step_ms * step_ms

    def as_row(self, prefix: str = "attention") -> dict[str, Any]:
        """Flat row fields (``attention_ms``, ``attention_calls``, ``attention_<family>_ms``)."""
        row = {f"{prefix}_ms": round(self.attention_ms, 3), f"{prefix}_calls": round(self.calls_per_step, 1)}
        row.update({f"{prefix}_{family}_ms": round(value, 3) for family, value in sorted(self.by_family.items())})
        return row


def attention_time_from_events(events: Iterable[Any], steps: int, device_type: str) -> AttentionTime:
    """Sum the attention in profiler events (``prof.events()``) of ``steps`` steps; see `measure_attention_time`.

    On CUDA the events counted are GPU kernels whose names `is_attention_kernel`; on CPU the
    outermost operators that `is_attention_operator` (an SDPA call's inner backend op is not counted
    again).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    total_us, calls, by_family = 0.0, 0, {}
    for event in events:
        if device_type == "cuda":
            if getattr(event.device_type, "name", str(event.device_type)) != "CUDA":
                continue
            family = attention_family(event.name)
            if family is None:
                continue
            duration = event.time_range.elapsed_us()
        else:
            if not is_attention_operator(event.name) or _has_attention_parent(event):
                continue
            family, duration = "operator", event.cpu_time_total
        total_us += duration
        calls += 1
        by_family[family] = by_family.get(family, 0.0) + duration
    return AttentionTime(attention_ms=total_us / steps / 1e3,
                         by_family={family: value / steps / 1e3 for family, value in by_family.items()},
                         calls_per_step=calls / steps, steps=steps,
                         source="cuda kernels" if device_type == "cuda" else "cpu operators")


def _has_attention_parent(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if is_attention_operator(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def measure_attention_time(step: Callable[[], Any], device: torch.device | str, steps: int = 3,
                           warmup: int = 1) -> AttentionTime:
    """Profile ``steps`` calls of ``step`` (after ``warmup`` unprofiled ones) and return the attention time per step.

    ``step`` runs the model exactly as it is timed (the same eager / compiled module, under
    ``torch.no_grad()`` if the timing is), so the attention time belongs to the same mode.

    Example:
        >>> q = torch.randn(1, 2, 64, 16)
        >>> time = measure_attention_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), "cpu")
        >>> time.calls_per_step, time.attention_ms > 0
        (1.0, True)
    """
    device = torch.device(device)
    for _ in range(warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    # acc_events: keep every event of the block (without it torch warns, once per process, that a
    # profiler "clears events at the end of each cycle" when a second profile is taken).
    with torch.profiler.profile(activities=activities, acc_events=True) as profiler:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profiled_step_ms = (time.perf_counter() - begin) / steps * 1e3
    measured = attention_time_from_events(profiler.events(), steps, device.type)
    return dataclasses.replace(measured, profiled_step_ms=profiled_step_ms)


def attention_density(strategy: sparsify.Strategy, sites: Iterable[sparsify.AttentionSite] | None = None) -> float:
    """Kept attention work over the work dense attention does (the causal-visible blocks at causal sites), all sites.

    Sites the strategy keeps dense (e.g. cross attention) count with their full work, so the
    density applies to the time of all attention kernels. ``sites`` gives the lengths the model
    runs at (default: those recorded in the strategy).

    Example:
        >>> site = sparsify.AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=16, q_len=256, k_len=256)
        >>> attention_density(sparsify.Strategy.dense([site]))
        1.0
    """
    fingerprint = strategy.fingerprint
    if sites is not None:
        by_name = {site.name: site for site in sites}
        fingerprint = [dict(entry, q_len=by_name[entry["name"]].q_len, k_len=by_name[entry["name"]].k_len)
                       if entry["name"] in by_name else entry for entry in fingerprint]
    density = dataclasses.replace(strategy, fingerprint=fingerprint).summary()["mean_density"]
    if density is None:
        raise ValueError("the strategy records no sequence lengths for some site; pass the sites the model runs "
                         "(their q_len / k_len) to attention_density")
    return float(density)


def ideal_step_ms(dense_step_ms: float, attention_ms: float, density: float) -> float:
    """The step time the density allows: the dense step minus the attention it can drop.

    Example:
        >>> ideal_step_ms(100.0, 50.0, 0.2)
        60.0
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if attention_ms > dense_step_ms:
        raise ValueError(f"attention time {attention_ms:.3f} ms exceeds the dense step {dense_step_ms:.3f} ms: "
                         "they were not measured in the same mode or on the same model")
    return dense_step_ms - attention_ms + density * attention_ms


def fraction_of_ideal(ideal_ms: float, sparse_ms: float) -> float:
    """``ideal / sparse``: 1.0 when the sparse step is as fast as its density allows.

    Example:
        >>> fraction_of_ideal(60.0, 75.0)
        0.8
    """
    return ideal_ms / sparse_ms
