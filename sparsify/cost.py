"""Cost model: estimated latency of a site's attention from its runtime block mask, per backend and device.

The model is analytic — launch overhead, a per-row cost, and a cost per kept block proportional
to ``block_size² × head_dim`` multiply-adds — with constants per (backend, device). Defaults are
rough; `calibrate` measures the real kernels on the current device, fits the constants by least
squares and writes them as a small JSON *hardware profile*; profiles shipped in
``sparsify/hardware_profiles/`` are picked up automatically when the device name matches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import time
from importlib import resources
from typing import Any, Callable, Sequence

import torch

from sparsify.errors import SparsifyError
from sparsify.io import write_text_atomically
from sparsify.site import AttentionSite
from sparsify.block_mask import RuntimeBlockMask, blocks_for

logger = logging.getLogger(__name__)

HARDWARE_PROFILE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BackendCosts:
    """Latency constants of one backend on one device (seconds).

    * ``launch`` — fixed cost of one site call (sparse path);
    * ``per_row_block`` — per (batch × head × query block) of the sparse path;
    * ``per_block_element`` — per multiply-add of a kept block (``block_size² × head_dim``);
    * ``dense_launch`` / ``dense_per_element`` — the same for dense attention (SDPA), per
      ``q_len × k_len × head_dim`` multiply-add (half of it at a causal site).
    """

    launch: float
    per_row_block: float
    per_block_element: float
    dense_launch: float
    dense_per_element: float

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SparsifyError(f"cost constant {field.name} must be a finite number >= 0, got {value!r}")


# Defaults for devices without a profile; `calibrate` measures real ones. The CUDA rows are the
# H200 measurements shipped in hardware_profiles/ (bf16, D=128, block 128), rounded: on another GPU
# they are a generic guess, and the cost model says so once (`DEFAULT_CUDA_COSTS_MEASURED_ON`); the
# torch rows are rough (a 2-core CPU; the torch backend on a GPU is a reference, not a fast path).
DEFAULT_CUDA_COSTS_MEASURED_ON = "NVIDIA H200"
DEFAULT_COSTS: dict[tuple[str, str], BackendCosts] = {
    ("torch", "cpu"): BackendCosts(2e-4, 2e-6, 5.0e-11, 5e-5, 3.0e-11),
    ("torch", "cuda"): BackendCosts(3e-4, 1e-7, 4.0e-14, 7e-5, 5.7e-15),
    ("flex", "cuda"): BackendCosts(2.5e-4, 2e-8, 1.07e-14, 7e-5, 5.7e-15),
    ("triton", "cuda"): BackendCosts(1.1e-4, 7e-8, 8.2e-15, 7e-5, 5.7e-15),
    # FlashAttention-4's block-sparse forward on an H200 (benchmarks/NOTES.md, kernel_bench v4): 1.08-1.10x
    # cuDNN dense at 16-32K, ~24 us per call with the lean launch.
    ("fa4", "cuda"): BackendCosts(2.5e-5, 1e-8, 5.3e-15, 7e-5, 5.7e-15),
}


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device: the GPU's name, or the CPU's model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


@dataclasses.dataclass
class HardwareProfile:
    """Measured cost constants of one backend on one device, saved as JSON.

    Example:
        >>> profile = HardwareProfile("torch", "cpu", "test cpu", DEFAULT_COSTS[("torch", "cpu")])
        >>> HardwareProfile.from_dict(profile.to_dict()).costs == profile.costs
        True
    """

    backend: str
    device_type: str
    device_name: str
    costs: BackendCosts
    fit: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": HARDWARE_PROFILE_FORMAT_VERSION,
            "backend": self.backend,
            "device_type": self.device_type,
            "device_name": self.device_name,
            "costs": dataclasses.asdict(self.costs),
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> "HardwareProfile":
        if not isinstance(data, dict):
            raise SparsifyError(f"{source}: a hardware profile is a JSON object")
        version = data.get("format_version")
        if version != HARDWARE_PROFILE_FORMAT_VERSION:
            raise SparsifyError(f"{source}: hardware profile format_version {version!r} is not understood; "
                                f"understood: {HARDWARE_PROFILE_FORMAT_VERSION}")
        try:
            costs = BackendCosts(**data["costs"])
            return cls(str(data["backend"]), str(data["device_type"]), str(data["device_name"]), costs,
                       dict(data.get("fit") or {}))
        except (KeyError, TypeError) as error:
            raise SparsifyError(f"{source}: malformed hardware profile ({error}); expected keys backend, "
                                f"device_type, device_name, costs{{{', '.join(f.name for f in dataclasses.fields(BackendCosts))}}}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON, atomically (a failed write leaves the old file intact).

        Example:
            >>> profile.save("h100_triton.json")                   # doctest: +SKIP
        """
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HardwareProfile":
        try:
            with open(path) as file:
                data = json.load(file)
        except (OSError, json.JSONDecodeError) as error:
            raise SparsifyError(f"cannot read hardware profile {os.fspath(path)!r}: {error}") from None
        return cls.from_dict(data, source=os.fspath(path))


def shipped_profiles() -> list[HardwareProfile]:
    """Hardware profiles that ship with the package (measured on named GPUs)."""
    profiles = []
    folder = resources.files("sparsify") / "hardware_profiles"
    if not folder.is_dir():
        return profiles
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            profiles.append(HardwareProfile.from_dict(json.loads(entry.read_text()), source=entry.name))
    return profiles


class CostModel:
    """Latency estimates for dense and block-sparse attention of a site.

    Args:
        profiles: measured hardware profiles; they override the defaults for their
            (backend, device type) when their device name matches the current device, or
            always when ``match_device_name=False``.
        preferred: profiles the user chose (``--hardware-profile``); they come first and apply
            to their (backend, device type) whatever the device's name (a warning is logged
            once when the name differs from the current device's).

    Example:
        >>> model = CostModel()
        >>> site = AttentionSite("attn", 0, num_heads=8, num_kv_heads=8, head_dim=64, q_len=4096, k_len=4096)
        >>> from sparsify.patterns import sliding_window
        >>> mask = sliding_window(64).runtime_mask(4096, 4096, block_size=64).select_heads([0] * 8)
        >>> model.latency(site, mask, "torch", "cpu") < model.dense_latency(site, backend="torch", device="cpu")
        True
    """

    def __init__(self, profiles: Sequence[HardwareProfile] = (), *, match_device_name: bool = True,
                 preferred: Sequence[HardwareProfile] = (), target: HardwareProfile | None = None):
        self.profiles = list(profiles)
        self.match_device_name = match_device_name
        self.preferred = list(preferred)
        #: When set, every price is this profile's, whatever backend and device are asked (`priced_for`).
        self.target = target
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def priced_for(cls, profile: "HardwareProfile | str | os.PathLike") -> "CostModel":
        """A cost model that prices everything as ``profile``'s backend on its device (search here, deploy there).

        Example:
            >>> profile = HardwareProfile("fa4", "cuda", "NVIDIA H200", DEFAULT_COSTS[("fa4", "cuda")])
            >>> site = AttentionSite("attn", 0, num_heads=8, num_kv_heads=8, head_dim=64, q_len=4096, k_len=4096)
            >>> model = CostModel.priced_for(profile)
            >>> model.dense_latency(site, backend="torch", device="cpu") == model.dense_latency(site, backend="fa4",
            ...                                                                                   device="cuda")
            True
        """
        return cls(target=profile if isinstance(profile, HardwareProfile) else HardwareProfile.load(profile))

    @classmethod
    def default(cls, hardware_profiles: Sequence[str | os.PathLike | HardwareProfile] = ()) -> "CostModel":
        """Defaults plus every shipped profile whose device matches the current one, after ``hardware_profiles``.

        ``hardware_profiles`` are files written by ``sparsify-cli calibrate`` (or loaded
        profiles); they are read here, so a bad file fails before any calibration.

        Example:
            >>> CostModel.default(["my_gpu.json"]).costs("triton", "cuda")      # doctest: +SKIP
        """
        preferred = [p if isinstance(p, HardwareProfile) else HardwareProfile.load(p) for p in hardware_profiles]
        return cls(shipped_profiles(), preferred=preferred)

    def costs(self, backend: str, device: torch.device | str) -> BackendCosts:
        """The constants used for ``backend`` on ``device`` (the target profile's, when the model has one)."""
        if self.target is not None:
            return self.target.costs
        device_type = _device_type(device)
        for profile in self.preferred:
            if profile.backend == backend and profile.device_type == device_type:
                key = (profile.backend, profile.device_name)
                if key not in self._warned and not _same_device(profile.device_name, device):
                    self._warned.add(key)
                    logger.warning("hardware profile for %s was measured on %r, not on this %s (%r); using it as asked",
                                   backend, profile.device_name, device_type, device_name(device))
                return profile.costs
        for profile in self.profiles:
            if profile.backend != backend or profile.device_type != device_type:
                continue
            if not self.match_device_name or _same_device(profile.device_name, device):
                return profile.costs
        if (backend, device_type) in DEFAULT_COSTS:
            if device_type == "cuda" and (backend, "default") not in self._warned \
                    and not _same_device(DEFAULT_CUDA_COSTS_MEASURED_ON, device):
                self._warned.add((backend, "default"))
                logger.warning("no hardware profile for backend %r on %s: priced with the default constants, measured "
                               "on an %s (a guess here); run `sparsify-cli calibrate --backend %s` on this machine and "
                               "pass the file as hardware_profiles for real ones", backend, device_name(device),
                               DEFAULT_CUDA_COSTS_MEASURED_ON, backend)
            return DEFAULT_COSTS[(backend, device_type)]
        if ("torch", device_type) in DEFAULT_COSTS:
            logger.warning("no cost constants for backend %r on %s: priced as the torch backend "
                           "(run `sparsify-cli calibrate --backend %s` for real ones)", backend, device_type, backend)
            return DEFAULT_COSTS[("torch", device_type)]
        raise SparsifyError(f"no cost constants for backend {backend!r} on {device_type}; "
                            f"known: {sorted(DEFAULT_COSTS)} — run `sparsify-cli calibrate --backend {backend}`")

    def head_latency(self, site: AttentionSite, mask: RuntimeBlockMask | None, head: int = 0, *, backend: str, device,
                     batch: int = 1, kept_blocks: float | None = None) -> float:
        """Marginal latency of head ``head`` of ``mask`` (a `RuntimeBlockMask`); ``mask=None``: a dense head (SDPA).

        The one price of a head: `latency` (a site), the search (each candidate's runtime mask) and
        the runtime's backend choice are sums of it. A sparse head costs a row per query block of
        the mask plus ``block_size² × head_dim`` multiply-adds per kept block — the mask's own
        kept blocks of that head, averaged over its batch. ``kept_blocks`` replaces that count
        for a head whose mask is estimated per input: the search prices an input-adaptive
        candidate with the mean blocks its masks kept on held-out inputs, on the geometry
        (query blocks, block size) of ``mask``. A dense head costs ``q_len × k_len × head_dim``
        multiply-adds at the site's lengths (half of them at a causal site).

        Example:
            >>> from sparsify.patterns import sliding_window
            >>> site = AttentionSite("attn", 0, num_heads=8, num_kv_heads=8, head_dim=64, q_len=4096, k_len=4096)
            >>> mask = sliding_window(128).runtime_mask(4096, 4096, block_size=64)
            >>> model = CostModel()
            >>> model.head_latency(site, mask, backend="torch", device="cpu") < model.head_latency(
            ...     site, None, backend="torch", device="cpu")
            True
        """
        costs = self.costs(backend, device)
        if mask is None:
            work = site.q_len * site.k_len * site.head_dim * (0.5 if site.causal else 1.0)
            return batch * work * costs.dense_per_element
        if kept_blocks is None:
            if not 0 <= head < mask.num_heads:
                raise SparsifyError(f"site {site.name!r}: cannot price head {head} of a mask of {mask.num_heads} "
                                    f"head(s); give a head index below {mask.num_heads}")
            kept_blocks = mask.kept_blocks_per_head()[head]
        return batch * (mask.q_blocks * costs.per_row_block
                        + kept_blocks * mask.block_size**2 * site.head_dim * costs.per_block_element)

    def estimation_latency(self, site: AttentionSite, pattern, *, backend: str, device, block_size: int,
                           batch: int = 1, q_len: int | None = None, k_len: int | None = None) -> float:
        """Latency of estimating one head's input-adaptive mask (`sparsify.patterns.adaptive`): its multiply-adds at
        twice SDPA's per-element cost (small matmuls run below peak) plus a quarter launch per kernel it starts.
        Composite patterns pay for each adaptive part; static patterns cost nothing here."""
        from sparsify.patterns import Intersection, Union

        if isinstance(pattern, (Union, Intersection)):
            return sum(self.estimation_latency(site, part, backend=backend, device=device, block_size=block_size,
                                               batch=batch, q_len=q_len, k_len=k_len) for part in pattern.parts)
        if not pattern.is_adaptive:
            return 0.0
        costs = self.costs(backend, device)
        work, launches = pattern.estimation_work(q_len or site.q_len, k_len or site.k_len, site.head_dim, block_size)
        return batch * work * 2 * costs.dense_per_element + launches * 0.25 * costs.launch

    def dense_latency(self, site: AttentionSite, *, backend: str, device, batch: int = 1) -> float:
        """Latency of the whole site run dense (SDPA): `latency` without a mask."""
        return self.latency(site, None, backend, device, batch=batch)

    def latency(self, site: AttentionSite, mask: RuntimeBlockMask | None, backend: str, device, *, batch: int = 1,
                dense_heads: int | None = None) -> float:
        """Latency of a site whose sparse heads keep the blocks of ``mask`` and whose other heads run dense (SDPA).

        One launch of the sparse kernel for the mask's heads and one of SDPA for the
        ``dense_heads`` (default: the site's heads the mask does not hold; ``mask=None``: every
        head dense), each head priced by `head_latency`. ``dense_heads=0`` prices the sparse
        heads alone (e.g. to compare backends that would all leave the dense heads to SDPA).

        Example:
            >>> from sparsify.patterns import sliding_window
            >>> site = AttentionSite("attn", 0, num_heads=8, num_kv_heads=8, head_dim=64, q_len=4096, k_len=4096)
            >>> mask = sliding_window(128).runtime_mask(4096, 4096, block_size=64)
            >>> model = CostModel()
            >>> model.latency(site, mask, "torch", "cpu") < model.latency(site, None, "torch", "cpu")
            True
        """
        costs = self.costs(backend, device)
        sparse_heads = 0 if mask is None else mask.num_heads
        if dense_heads is None:
            dense_heads = site.num_heads - sparse_heads
        if dense_heads < 0:
            raise SparsifyError(f"site {site.name!r} has {site.num_heads} heads but its mask holds {sparse_heads}; "
                                f"a site's mask holds at most one row per head")
        total = 0.0
        if dense_heads:
            total += costs.dense_launch + dense_heads * self.head_latency(site, None, backend=backend, device=device,
                                                                          batch=batch)
        if sparse_heads:
            kept = mask.kept_blocks_per_head()
            total += costs.launch + sum(self.head_latency(site, mask, head, backend=backend, device=device, batch=batch,
                                                          kept_blocks=kept[head]) for head in range(sparse_heads))
        return total


def _same_device(profile_device_name: str, device) -> bool:
    current = device_name(device)
    if _device_type(device) == "cuda":
        # "NVIDIA H100 80GB HBM3" matches another H100 name by its model token ("H100"), not by memory ("HBM3").
        return bool(_gpu_models(profile_device_name) & _gpu_models(current))
    return profile_device_name == current


def _gpu_models(name: str) -> set[str]:
    """Model tokens of a GPU name: ``"NVIDIA H100 80GB HBM3"`` → ``{"H100"}``."""
    return {token for token in name.upper().replace("-", " ").split()
            if re.fullmatch(r"[A-Z]{1,3}\d{2,4}[A-Z]?", token) and not token.startswith(("HBM", "GDDR"))}


def time_call(function: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 3) -> float:
    """Seconds of one call of ``function`` on ``device``: the fastest of ``repeats`` after a warm-up.

    Example:
        >>> time_call(lambda: torch.ones(8).sum()) >= 0
        True
    """
    device = torch.device(device)
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed run: other processes only ever add time


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timing `calibrate` takes: ``run()`` on ``device``, and the regression row it feeds.

    ``kind`` is ``"sparse"`` (features: 1, heads × query blocks, kept multiply-adds) or
    ``"dense"`` (features: 1, multiply-adds of dense attention).
    """

    kind: str
    features: tuple[float, ...]
    run: Callable[[], Any]


def time_measurement(measurement: Measurement, device: torch.device, repeats: int) -> float:
    """The default timer of `calibrate`: `time_call` of ``measurement.run``."""
    return time_call(measurement.run, device, repeats)


Timer = Callable[[Measurement, torch.device, int], float]
"""Seconds of one measurement: ``timer(measurement, device, repeats)`` (default `time_measurement`)."""

# Calibration is degenerate unless, at some length, the densest tables take this much longer than the sparsest.
MIN_DENSITY_GROWTH = 1.05


def calibrate(backend: str = "torch", device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None,
              lengths: Sequence[int] = (1024, 2048, 4096), densities: Sequence[float] = (0.05, 0.15, 0.3, 0.6),
              heads: int = 8, head_dim: int = 64, block_size: int = 64, repeats: int = 3,
              progress: Callable[[str], None] | None = None, timer: Timer = time_measurement,
              attempts: int = 3) -> HardwareProfile:
    """Measure ``backend`` and dense SDPA on ``device`` over random block tables and fit `BackendCosts`.

    The sparse time must grow with the kept blocks; on a busy machine the measurements can hide
    that (a *degenerate* measurement: at no length do the densest tables take 5% longer than the
    sparsest, or the fit finds no per-block cost — either would make every density look
    equally fast). Such a fit is measured again with twice the
    repeats, up to ``attempts`` times, and then refused with an explanation rather than saved.
    ``timer(measurement, device, repeats)`` returns the seconds of one `Measurement`.

    Example:
        >>> profile = calibrate("torch", "cpu", lengths=(256,), densities=(0.25, 0.5), repeats=1)  # doctest: +SKIP
    """
    from sparsify.backends import get_backend

    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if len(set(densities)) < 2 or len(set(lengths)) < 1:
        raise SparsifyError(f"calibrate needs at least two densities and one length, got densities={list(densities)} "
                            f"lengths={list(lengths)}")
    implementation = get_backend(backend)
    reason = implementation.availability(device)
    if reason is not None:
        hint = f"; {implementation.install_hint}" if implementation.install_hint else ""
        raise SparsifyError(f"backend {backend!r} is not available here: {reason}{hint}; cannot calibrate it")
    for attempt in range(1, attempts + 1):
        profile = _measure_and_fit(implementation, backend, device, dtype, lengths, densities, heads, head_dim,
                                   block_size, repeats, progress, timer)
        if profile.fit["density_growth"] >= MIN_DENSITY_GROWTH and profile.costs.per_block_element > 0:
            return profile
        logger.warning("calibration attempt %d: the sparse time did not grow with the kept blocks (noisy timings?); "
                       "measuring again with %d repeats", attempt, repeats * 2)
        repeats *= 2
    raise SparsifyError(
        f"calibrating {backend!r} on {device_name(device)} failed: after {attempts} attempts the sparse kernel's time "
        f"still did not grow with the number of kept blocks, so no per-block cost could be fitted (the machine is "
        f"probably busy). Run it again on an idle machine, with more --repeats or longer --lengths"
    )


def _measure_and_fit(implementation, backend: str, device: torch.device, dtype: torch.dtype, lengths: Sequence[int],
                     densities: Sequence[float], heads: int, head_dim: int, block_size: int, repeats: int,
                     progress: Callable[[str], None] | None, timer: Timer) -> HardwareProfile:
    from sparsify.ops import dense_attention

    generator = torch.Generator().manual_seed(0)
    sparse_rows: list[list[float]] = []
    sparse_times: list[float] = []
    dense_rows: list[list[float]] = []
    dense_times: list[float] = []
    for length in lengths:
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator).to(device, dtype) for _ in range(3))
        dense_rows.append([1.0, heads * length * length * head_dim])
        dense_times.append(timer(Measurement("dense", tuple(dense_rows[-1]), lambda: dense_attention(q, k, v)),
                                 device, repeats))
        blocks = blocks_for(length, block_size)
        for density in densities:
            masks = torch.rand(heads, blocks, blocks, generator=generator) < density
            masks |= torch.eye(blocks, dtype=torch.bool)
            mask = RuntimeBlockMask.from_block_masks(masks.to(device), block_size=block_size, q_len=length,
                                                     k_len=length, causal=False)
            plan = implementation.prepare(mask, q_shape=tuple(q.shape), k_shape=tuple(k.shape),
                                          v_shape=tuple(v.shape), dtype=q.dtype, device=device)
            sparse_rows.append([1.0, heads * blocks, float(masks.sum()) * block_size**2 * head_dim])
            seconds = timer(Measurement("sparse", tuple(sparse_rows[-1]),
                                        lambda: implementation.run(plan, q, k, v)), device, repeats)
            sparse_times.append(seconds)
            if progress:
                progress(f"S={length} density={density:.2f}: {seconds * 1e3:.2f} ms")
    sparse_fit = _nonnegative_fit(sparse_rows, sparse_times)
    dense_fit = _nonnegative_fit(dense_rows, dense_times)
    costs = BackendCosts(sparse_fit[0], sparse_fit[1], sparse_fit[2], dense_fit[0], dense_fit[1])
    predicted = [sum(c * x for c, x in zip(sparse_fit, row)) for row in sparse_rows]
    relative = [abs(p - t) / t for p, t in zip(predicted, sparse_times)]
    # Per length, time of the densest tables over time of the sparsest; the largest over the lengths.
    densest = max(range(len(densities)), key=densities.__getitem__)
    sparsest = min(range(len(densities)), key=densities.__getitem__)
    growth = max(sparse_times[start + densest] / max(sparse_times[start + sparsest], 1e-30)
                 for start in range(0, len(sparse_times), len(densities)))
    fit = {"samples": len(sparse_times) + len(dense_times), "mean_relative_error": sum(relative) / len(relative),
           "density_growth": round(growth, 6),
           "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "heads": heads, "head_dim": head_dim,
           "block_size": block_size, "lengths": list(lengths), "densities": list(densities)}
    return HardwareProfile(backend, device.type, device_name(device), costs, fit)


def _nonnegative_fit(rows: list[list[float]], times: list[float]) -> list[float]:
    """Least squares with coefficients clamped at zero (refit without the clamped columns).

    Rows are weighted by ``1 / time`` (relative errors count, not absolute ones) and columns are
    scaled to unit size first: the features span ten orders of magnitude (1 launch vs. 1e9
    multiply-adds), which would otherwise make the solve ill-conditioned.

    Example:
        >>> [round(c, 6) for c in _nonnegative_fit([[1, 1], [1, 2], [1, 4]], [3, 5, 9])]
        [1.0, 2.0]
    """
    matrix = torch.tensor(rows, dtype=torch.float64)
    target = torch.tensor(times, dtype=torch.float64).clamp_min(1e-12)
    scale = matrix.abs().amax(0).clamp_min(1e-300)
    matrix = matrix / scale
    active = list(range(matrix.shape[1]))
    coefficients = torch.zeros(matrix.shape[1], dtype=torch.float64)
    weights = 1.0 / target
    while active:
        solution = torch.linalg.lstsq(matrix[:, active] * weights[:, None], target * weights).solution
        if bool((solution >= 0).all()):
            coefficients[active] = solution
            break
        active = [a for a, s in zip(active, solution.tolist()) if s > 0]
    return (coefficients / scale).tolist()
