"""The model-level budget: each site's sensitivity, the whole sparsified model's measured error, and the tightening loop.

Sites are not alike: an early layer's error is carried through every later layer, a late one's
may vanish in the next norm. `measure_sensitivities` injects one site's error at a time into the
captured graph on held-out batches — the real error direction of candidates the search would pick
there (their runtime masked output against dense), scaled to a known site error — and measures
the model's output with the metric. For small errors the model-level error (in the metric's
additive form ``value ** power``) grows with the square of the site error, so one pass per site
and batch gives the site's sensitivity ``κ_s = model error / site error²``, and the predicted
model-level error of a whole allocation is ``Σ_s κ_s · e_s²``.

`OutputVerifier` runs the graph with every site's sparse heads on the runtime's own path
(`SparseAttention`) and measures the model-level error; `tighten_until_within` bisects the
budget's scale until the measured error is within the budget (the prediction ignores how site
errors interact; the measurement does not).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import torch

from sparsify.distributed import CalibrationGroup
from sparsify.ops import dense_attention
from sparsify.patterns import Pattern
from sparsify.runtime.sparse_attention import SparseAttention, StepCounter
from sparsify.output_metrics import OutputMetric, first_output_tensor
from sparsify.site import AttentionSite

logger = logging.getLogger(__name__)

__all__ = ["FLOOR_PROBE_ERROR", "MAX_VERIFICATIONS", "OutputVerifier", "PROBE_SITE_ERROR", "is_low_precision",
           "measure_noise_floors", "measure_sensitivities", "tighten_until_within"]

#: Site relative error the sensitivity probe injects (small enough to stay in the linear regime).
PROBE_SITE_ERROR = 0.05

#: Site relative error of the rounding-noise probe (`measure_noise_floors`): about one bfloat16 rounding step.
FLOOR_PROBE_ERROR = 0.005

#: Most verifications (held-out passes of the whole sparsified model) the tightening loop runs.
MAX_VERIFICATIONS = 6


class OutputVerifier:
    """Runs held-out batches through the captured graph with some sites replaced, and measures the model's output.

    The dense outputs are computed once (`dense_outputs`); `measure` returns the mean over
    batches of the metric's additive form (``value ** power``) summed over every rank.

    Example:
        >>> verifier = OutputVerifier(graph_module, batches, metric, group)         # doctest: +SKIP
        >>> verifier.measure({"layers.0.attn": sparse_module})                     # doctest: +SKIP
    """

    def __init__(self, graph_module: torch.fx.GraphModule, batches: Sequence[tuple[tuple, dict]], metric: OutputMetric,
                 group: CalibrationGroup, *, steps: Sequence[int] | None = None,
                 padding: Sequence[torch.Tensor | None] | None = None, step_counter: StepCounter | None = None):
        self.graph_module = graph_module
        self.batches = list(batches)
        self.metric = metric
        self.group = group
        self.steps = list(steps or [])
        self.padding = list(padding or [])
        self.step_counter = step_counter
        self.passes = 0  # forward passes run (for the logs: what the budget cost)
        self._dense: list[torch.Tensor] | None = None

    def dense_outputs(self) -> list[torch.Tensor]:
        """The captured graph's first output tensor per batch, every site dense (computed once)."""
        if self._dense is None:
            self._dense = [self._run(index, lambda *_: None) for index in range(len(self.batches))]
        return self._dense

    def measure(self, replacements: dict[str, Callable[..., torch.Tensor]]) -> float:
        """Mean additive model-level error over the held-out batches (every rank's) with ``replacements``.

        ``replacements[site]`` takes the canonical op's arguments ``(q, k, v, attn_mask,
        is_causal, scale, softcap, sinks)`` and returns the site's output; other sites run dense.
        """
        dense = self.dense_outputs()
        total = 0.0
        for index in range(len(self.batches)):

            def observer(site, q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
                replacement = replacements.get(site.name)
                return None if replacement is None else replacement(q, k, v, attn_mask, is_causal, scale, softcap, sinks)

            output = self._run(index, observer)
            reference, output = self._without_padding(index, dense[index], output)
            total += self.metric(reference, output) ** self.metric.power
        total, count = self.group.sum_floats([total, float(len(self.batches))], "summing model-level errors")
        return total / max(count, 1.0)

    def measure_each_alone(self, replacements: dict[str, Callable[..., torch.Tensor]]) -> dict[str, float]:
        """Per site of ``replacements``: the mean additive model-level error with that site alone replaced.

        Equal to ``{name: self.measure({name: r}) for name, r in replacements.items()}``, but each
        held-out batch runs dense once more, keeping what the graph holds at every site's node
        (the live values: hidden states, not the layers' intermediates); each site's pass then
        resumes there, so the layers before it are not run again — about half the work at many sites.

        Example:
            >>> verifier.measure_each_alone({"layers.0.attn": probe, "layers.1.attn": probe})  # doctest: +SKIP
            {'layers.0.attn': 0.0031, 'layers.1.attn': 0.0002}
        """
        if _mutates_in_place(self.graph_module):
            # A resumed run could write into a value another site's snapshot holds: run each site whole.
            return {name: self.measure({name: replacement}) for name, replacement in replacements.items()}
        dense = self.dense_outputs()
        totals = dict.fromkeys(replacements, 0.0)
        for index in range(len(self.batches)):
            snapshots = self._snapshots_at_sites(index, set(replacements))
            for name, replacement in replacements.items():

                def observer(site, *arguments, name=name, replacement=replacement):
                    return replacement(*arguments) if site.name == name else None

                output = self._run(index, observer, initial_env=snapshots.get(name))
                reference, output = self._without_padding(index, dense[index], output)
                totals[name] += self.metric(reference, output) ** self.metric.power
        names = list(totals)
        summed = self.group.sum_floats([totals[name] for name in names] + [float(len(self.batches))],
                                       "summing model-level errors")
        count = max(summed[-1], 1.0)
        return {name: value / count for name, value in zip(names, summed[:-1])}

    def _snapshots_at_sites(self, index: int, names: set[str]) -> dict[str, dict]:
        """Per site in ``names``: the interpreter's environment just before the site's first node (dense run).

        Nodes before it whose values are no longer used map to None: the resumed run skips every
        node it finds in the environment and never reads a dead one.
        """
        from sparsify.passes.infra import SITE_META_KEY
        from sparsify.passes.observe import AttentionInterpreter

        nodes = list(self.graph_module.graph.nodes)
        position = {node: place for place, node in enumerate(nodes)}
        snapshots: dict[str, dict] = {}

        class Snapshotting(AttentionInterpreter):
            def on_attention(self, node, arguments):
                site = node.meta.get(SITE_META_KEY)
                if site is not None and site.name in names and site.name not in snapshots:
                    snapshots[site.name] = {before: self.env.get(before) for before in nodes[:position[node]]}
                return None

        self._prepare_step(index)
        args, kwargs = self.batches[index]
        self.passes += 1
        Snapshotting(self.graph_module, index).run_batch(args, kwargs)
        return snapshots

    def _prepare_step(self, index: int) -> None:
        if self.step_counter is not None and self.steps:
            self.step_counter.step = self.steps[index]

    def _run(self, index: int, observer: Callable, initial_env: dict | None = None) -> torch.Tensor:
        from sparsify.passes.observe import ObservingInterpreter

        self._prepare_step(index)
        args, kwargs = self.batches[index]
        self.passes += 1
        interpreter = ObservingInterpreter(self.graph_module, observer, index)
        return first_output_tensor(interpreter.run_batch(args, kwargs, initial_env=initial_env))

    def _without_padding(self, index: int, reference: torch.Tensor, output: torch.Tensor):
        """Padded positions (bool ``[batch, seq]``) carry no meaning: zero them in both outputs."""
        ignored = self.padding[index] if index < len(self.padding) else None
        if ignored is None or reference.dim() < 2 or tuple(reference.shape[:2]) != tuple(ignored.shape):
            return reference, output
        keep = (~ignored.to(reference.device)).reshape(*ignored.shape, *[1] * (reference.dim() - 2))
        return reference * keep, output * keep


def _mutates_in_place(graph_module: torch.fx.GraphModule) -> bool:
    """Whether any node of the graph may write into its inputs (in-place ops, ``inplace=True`` modules)."""
    import operator

    in_place_operators = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            schema = getattr(node.target, "_schema", None)
            if node.target in in_place_operators or (schema is not None and schema.is_mutable):
                return True
        elif node.op == "call_method" and str(node.target).endswith("_"):
            return True
        elif node.op == "call_module" and getattr(graph_module.get_submodule(node.target), "inplace", False):
            return True
    return False


def sparse_replacement(site: AttentionSite, heads: Sequence[Pattern], block_size: int, *, backend: str = "auto",
                       cost_model: Any = None, dense_steps: int = 0,
                       step_counter: StepCounter | None = None,
                       device: torch.device | str = "cpu") -> Callable[..., torch.Tensor] | None:
    """The site's runtime module for ``heads`` on ``device`` (the model's), as a replacement for `OutputVerifier.measure`.

    ``None`` when every head is dense.
    """
    if all(pattern.is_dense for pattern in heads):
        return None
    return SparseAttention(site, list(heads), block_size=block_size, backend=backend, dense_steps=dense_steps,
                           step_counter=step_counter, cost_model=cost_model).to(device)


def _injected(probe: Callable[..., torch.Tensor], error: float) -> Callable[..., torch.Tensor]:
    """A site replacement: dense attention plus ``probe``'s difference from it, scaled per call to relative error ``error``."""

    def replacement(q, k, v, attn_mask, is_causal, scale, softcap=None, sinks=None):
        dense = dense_attention(q, k, v, attn_mask, is_causal, scale, softcap, sinks)
        difference = probe(q, k, v, attn_mask, is_causal, scale, softcap, sinks).double() - dense.double()
        size = float(difference.pow(2).sum().sqrt())
        if size == 0.0:
            return dense
        factor = error * float(dense.double().pow(2).sum().sqrt()) / size
        return (dense.double() + factor * difference).to(dense.dtype)

    return replacement


def _measured_alone(verifier: OutputVerifier, sites: Sequence[AttentionSite],
                    probes: dict[str, Callable[..., torch.Tensor]], error: float) -> dict[str, float]:
    """Per site: the model-level error (additive form) with its probe's direction injected alone at relative ``error``
    (0 for a site without a probe)."""
    probed = {site.name: _injected(probes[site.name], error) for site in sites if probes.get(site.name) is not None}
    measured = verifier.measure_each_alone(probed) if probed else {}
    return {site.name: measured.get(site.name, 0.0) for site in sites}


def measure_noise_floors(verifier: OutputVerifier, sites: Sequence[AttentionSite],
                         probes: dict[str, Callable[..., torch.Tensor]],
                         probe_error: float = FLOOR_PROBE_ERROR) -> dict[str, float]:
    """Per site: the model-level error (additive form) a perturbation at that site causes *whatever its size*.

    In bfloat16 or float16 any change at a site, however small, changes how every later value
    rounds, and the model's output moves by a roughly fixed amount (SmolLM2-135M's bf16 logits:
    relative L2 ~0.015, as much as switching SDPA's backend) on top of what the change itself
    causes. A site's probe direction scaled to ``probe_error`` (about one rounding step of
    bfloat16, so the part that grows with the error is negligible) measures that floor. Sites
    without a probe get 0. The search takes the largest floor of the sites an allocation perturbs
    out of its verified error. (In float32 the floor is ~1e-12: the search measures it only for
    low-precision models, `is_low_precision`.)

    Example:
        >>> measure_noise_floors(verifier, sites, {"attn": sparse_module})   # doctest: +SKIP
        {'attn': 0.00021}
    """
    floors = _measured_alone(verifier, sites, probes, probe_error)
    logger.info("rounding-noise floors (model-level error of a perturbation of %g at one site): %s", probe_error,
                ", ".join(f"{name} {value:.3g}" for name, value in floors.items()))
    return floors


def is_low_precision(graph_module: torch.nn.Module, outputs: Sequence[torch.Tensor]) -> bool:
    """Whether the model computes in a 16-bit float type (its floating parameters or its outputs): where the
    rounding-noise floor (`measure_noise_floors`) is large enough to matter."""
    low = (torch.float16, torch.bfloat16)
    return (any(parameter.dtype in low for parameter in graph_module.parameters())
            or any(output.dtype in low for output in outputs))


def measure_sensitivities(verifier: OutputVerifier, sites: Sequence[AttentionSite],
                          probes: dict[str, Callable[..., torch.Tensor]],
                          probe_error: float = PROBE_SITE_ERROR) -> dict[str, float]:
    """Per site: model-level error (additive form) per unit of squared site relative error.

    ``probes[site]`` computes a sparse output of the site (the runtime output of candidates the
    search would pick there); its difference from the dense output, scaled per batch so that the
    site's relative L2 error is ``probe_error``, is injected alone and the model's output measured.
    A site without a probe (nothing but dense to choose from) gets sensitivity 0. In a 16-bit model
    the measurement includes the site's rounding-noise floor (`measure_noise_floors`): it is left
    in, so the sensitivities err high (a site whose floor were subtracted could come out at 0 by
    the noise of two measurements, and the allocation would spend it without limit); the
    verification takes the floor out of the whole model's measured error instead.

    Example:
        >>> measure_sensitivities(verifier, sites, {"attn": sparse_module})   # doctest: +SKIP
        {'attn': 0.42}
    """
    sensitivities = {name: value / probe_error**2
                     for name, value in _measured_alone(verifier, sites, probes, probe_error).items()}
    logger.info("sensitivities (model-level error per squared site error): %s",
                ", ".join(f"{name} {value:.3g}" for name, value in sensitivities.items()))
    return sensitivities


@dataclasses.dataclass
class Verification:
    """One verified allocation: its budget scale, promised (predicted) and measured model-level error (additive form)."""

    scale: float
    promised: float
    measured: float
    density: float | None = None

    def to_json(self, metric: OutputMetric) -> dict[str, Any]:
        unit = 1.0 / metric.power
        return {"scale": round(self.scale, 6), "promised": round(self.promised**unit, 8),
                "measured": round(self.measured**unit, 8),
                **({"density": round(self.density, 6)} if self.density is not None else {})}


def tighten_until_within(allocate: Callable[[float], Any], measure: Callable[[Any], tuple[float, float | None]],
                         budget: float, rounds: int = MAX_VERIFICATIONS) -> tuple[Any, list[Verification], int]:
    """Bisect the budget's scale until the measured model-level error is within ``budget``; returns
    ``(allocation, verifications, index of the chosen verification)``.

    ``allocate(scale)`` returns an object with ``predicted`` and ``key()`` (an `Allocation`);
    ``measure(allocation)`` returns ``(measured, density)``. Scale 1 comes first; a measured error
    above the budget tightens (proportionally, then by bisection between the best scale within and
    the least scale over); one well below it loosens (up to 4× per step), so the prediction's bias
    either way is corrected. When no scale is within, ``allocate(0.0)`` (every head dense, error 0) is
    returned. Allocations already measured are not measured again.

    Example:
        >>> class Choice:
        ...     def __init__(self, scale): self.scale, self.predicted = scale, scale
        ...     def key(self): return round(self.scale, 9)
        >>> choice, trail, best = tighten_until_within(Choice, lambda c: (2 * c.predicted, None), budget=1.0)
        >>> 0.4 < trail[best].measured <= 1.0
        True
    """
    trail: list[Verification] = []
    measured_of: dict[Any, tuple[float, float | None]] = {}
    best: tuple[int, Any] | None = None
    within = over = None
    scale = 1.0
    for _ in range(rounds):
        allocation = allocate(scale)
        key = allocation.key()
        repeated = key in measured_of
        if not repeated:
            measured_of[key] = measure(allocation)
        measured, density = measured_of[key]
        if repeated and over is None:
            break  # loosening changes nothing more: every candidate worth taking is taken
        if not repeated:
            trail.append(Verification(scale, float(allocation.predicted or 0.0), measured, density))
        if measured <= budget:
            if not repeated and (best is None or scale > trail[best[0]].scale):
                best = (len(trail) - 1, allocation)
            within = scale if within is None else max(within, scale)
        else:
            over = scale if over is None else min(over, scale)
        if over is None:
            if measured >= 0.8 * budget or measured == 0:
                break  # close to the budget (or nothing left to spend it on)
            scale *= min(4.0, 0.9 * budget / measured)
        elif within is None:
            scale *= max(0.05, 0.9 * budget / measured)
        else:
            if over / within < 1.15:
                break
            scale = math.sqrt(within * over)
    if best is None:
        allocation = allocate(0.0)
        key = allocation.key()
        measured, density = measured_of[key] if key in measured_of else measure(allocation)
        trail.append(Verification(0.0, float(allocation.predicted or 0.0), measured, density))
        best = (len(trail) - 1, allocation)
    return best[1], trail, best[0]
