"""`CompileOptions`: every option of `sparsify.compile`, the search and `sparsify-cli`, with its one default and its check.

`sparsify.compile(model, batches, max_error=0.1)` builds a `CompileOptions` from its keyword
arguments, the search reads the same object, and the CLI builds its flags from the fields below
(their defaults and help texts), so a default is written in exactly one place.

Example:
    >>> options = CompileOptions(block_size=32)
    >>> options.output_budget, options.max_error, options.backend   # the default: a model-level budget, no site cap
    (0.02, None, 'auto')
    >>> CompileOptions(max_error=0.1).output_budget is None           # max_error alone: a per-site budget, as before
    True
    >>> CompileOptions(max_eror=0.1)                                # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: ...
    >>> CompileOptions.from_keywords({"max_eror": 0.1})             # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparsify.errors.SparsifyError: unknown option 'max_eror' (did you mean 'max_error'?); options: backend, ...
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any, Callable, Mapping

from sparsify.errors import SparsifyError
from sparsify.limits import MAX_BLOCK_SIZE, MAX_STEPS, MIN_BLOCK_SIZE

__all__ = ["CompileOptions", "DEFAULT_MAX_OUTPUT_ERROR", "DEFAULT_OPTIONS"]

DEFAULT_MAX_OUTPUT_ERROR = 0.02
"""The model-level budget when neither ``max_output_error`` nor ``max_error`` is given (in the metric's unit).

2% relative L2 of the model's output. Measured on SmolLM2-135M (2048-token held-out windows,
logits): 0.02 gives perplexity x1.010 at 0.52 mean causal density; 0.05 gave x1.073 at 0.31.
"""


def _option(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field carrying its help text (the CLI's ``--help`` reads it)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options of `sparsify.compile`, the search and the CLI (frozen, checked on creation).

    Attributes:
        backend: kernel the rewrite uses and the cost model prices: ``"auto"`` (per site, the
            fastest available one) or a registered backend name (``sparsify.backends``).
        max_output_error: the budget on the **model's output**: the largest error of the
            sparsified model's output against the dense model's on held-out calibration
            batches, measured by ``output_metric``. The search measures each site's sensitivity,
            allocates error over all sites and heads with one global multiplier, verifies the
            whole sparsified model and tightens until the measured error is within it.
            ``None``: ``DEFAULT_MAX_OUTPUT_ERROR`` (0.02) unless ``max_error`` is given alone.
            This is the default budget: users judge a model by its output, and sites differ in
            how much of their error reaches it. ``0`` keeps every head dense.
        output_metric: how the model's output error is measured: ``"relative_l2"`` (default:
            ``||sparse - dense|| / ||dense||`` of the first output tensor), ``"kl"`` (mean KL of
            next-token distributions, for logits, in nats) or a callable
            ``metric(dense_output, sparse_output) -> float`` (`sparsify.output_metrics`).
            The default stays ``relative_l2`` for every model (embeddings, diffusion, logits
            alike: no guessing what the output is). For a language model ``"kl"`` is the
            budget in perplexity's own unit: the mean next-token KL is about the log of the
            perplexity ratio, so ``output_metric="kl", max_output_error=0.01`` asks for about
            x1.01 on text like the calibration's. Either budget holds on the held-out calibration
            batches, not on other text: on SmolLM2-135M (1024 tokens, calibrated on Python docs,
            evaluated on licenses and Vim's manual) relative L2 0.02 gave x1.008 at density 0.65
            and KL 0.01 gave x1.020 at 0.55, the evaluation texts' error 2.3-2.4x the promise
            in both metrics: calibrate on text like the deployment's.
        max_error: optional cap on the relative L2 error of each site's output against dense,
            in [0, 1). Given alone (no ``max_output_error``) it is the per-site budget of
            earlier versions: each site spends it, no model-level budget. ``0`` keeps every
            head dense.
        target_density: optional global target of kept attention work over dense work, (0, 1].
        target_speedup: optional global target of estimated attention speedup, >= 1.
        target_overrides_max_error: with a target, let sites exceed ``max_error`` to reach it
            (the strategy and a warning name them). Without it the search stays within
            ``max_error`` and reports when the target is out of reach.
        block_size: block edge in tokens (a power of two); ``None``: 64 on CPU, 128 on GPU.
        dense_steps: leading forward calls (e.g. diffusion steps) of each generation that stay
            dense; calibration calls of those steps are neither profiled nor scored.
        steps_per_generation: calls per generation; calibration call ``i`` is step
            ``i % steps_per_generation`` (without it: step ``i``).
        min_recall: candidates keeping less attention mass on the profile are not scored.
        holdout_fraction: share of calibration batches held out to score candidates.
        seed: seed for every random choice (sampled rows).
        adaptive: also score input-adaptive candidates (masks estimated per input on the device,
            `sparsify.patterns.adaptive`); ``False`` keeps every pattern static (needed for ONNX export).
        profile_rows_per_block: query rows per block sampled for the block-mass profile
            (``None``: all rows).
        score_rows_per_block: query rows per block whose output error is measured on the
            held-out batches (``None``: all rows) — an unbiased estimate of the site error.
        hardware_profiles: JSON files written by ``sparsify-cli calibrate``; their constants
            price their (backend, device type) ahead of the shipped profiles and defaults.
        price_for: a hardware profile JSON (``sparsify-cli calibrate`` on the deployment machine, or
            one shipped in ``sparsify/hardware_profiles``): candidates are priced as that profile's
            backend on its device, whatever device the search runs on — search on one machine
            (e.g. a CPU box), deploy on another (e.g. an H200). The strategy records it.
        progress: show progress bars on stderr (off by default: the library only logs; the CLI
            turns them on unless ``--no-progress``).
        dynamic: capture with dynamic batch and sequence dimensions (``"all"``: every dimension).
    """

    backend: str = _option("auto", "kernel backend: 'auto' or a backend name")
    max_output_error: float | None = _option(
        None, f"model-level output error budget (default {DEFAULT_MAX_OUTPUT_ERROR} unless --max-error is given alone)")
    output_metric: str | Callable[..., float] = _option(
        "relative_l2", "model output metric: relative_l2 or kl (next-token KL of logits)")
    max_error: float | None = _option(None, "per-site output error cap in [0, 1) (alone: a per-site budget)")
    target_density: float | None = _option(None, "global density target in (0, 1]")
    target_speedup: float | None = _option(None, "global attention speedup target (>= 1)")
    target_overrides_max_error: bool = _option(
        False, "let sites exceed --max-error to reach the target (they are named in the report)")
    block_size: int | None = _option(None, "block edge in tokens (default 64 on CPU, 128 on GPU)")
    dense_steps: int = _option(0, "leading calls per generation that stay dense (diffusion steps)")
    steps_per_generation: int | None = _option(None, "calls per generation (diffusion steps)")
    min_recall: float = _option(0.7, "candidates keeping less attention mass are not scored")
    holdout_fraction: float = _option(0.25, "share of calibration batches held out for scoring")
    seed: int = _option(0, "seed of every random choice")
    adaptive: bool = _option(True, "also consider input-adaptive patterns (estimated per input on the device)")
    profile_rows_per_block: int | None = _option(16, "query rows per block sampled for the profile")
    score_rows_per_block: int | None = _option(32, "query rows per block scored on held-out batches")
    hardware_profiles: tuple[str, ...] = _option((), "hardware profile JSON written by `calibrate`")
    price_for: str | None = _option(None, "price candidates with this hardware profile JSON, not this machine's costs")
    progress: bool = _option(False, "show progress bars (the library prints nothing unless asked; the CLI shows them)")
    dynamic: bool = _option(True, "capture with dynamic batch and sequence dimensions")

    def __post_init__(self) -> None:
        from sparsify.backends import backend_names

        if not isinstance(self.backend, str) or (self.backend != "auto" and self.backend not in backend_names()):
            raise SparsifyError(f"backend: unknown backend {self.backend!r}; known: auto, "
                                f"{', '.join(backend_names())}")
        if self.max_error is not None:
            _check_fraction("max_error", self.max_error, low_open=False, high_open=True)
        if self.max_output_error is not None and not (_is_number(self.max_output_error)
                                                      and 0 <= self.max_output_error < math.inf):
            raise SparsifyError(f"max_output_error: must be a finite number >= 0 (in the unit of output_metric="
                                f"{self.output_metric!r}), got {self.max_output_error!r}")
        from sparsify.output_metrics import output_metric

        output_metric(self.output_metric)  # unknown names fail now, listing the known ones
        if self.target_density is not None:
            _check_fraction("target_density", self.target_density, low_open=True, high_open=False)
        if self.target_speedup is not None:
            if not _is_number(self.target_speedup) or not 1 <= self.target_speedup < math.inf:
                raise SparsifyError(f"target_speedup: must be a finite number >= 1, got {self.target_speedup!r}")
        if self.target_density is not None and self.target_speedup is not None:
            raise SparsifyError("give target_density or target_speedup, not both")
        if not isinstance(self.target_overrides_max_error, bool):
            raise SparsifyError(f"target_overrides_max_error: must be True or False, "
                                f"got {self.target_overrides_max_error!r}")
        if self.block_size is not None and (not _is_int(self.block_size) or not MIN_BLOCK_SIZE <= self.block_size
                                            <= MAX_BLOCK_SIZE or self.block_size & (self.block_size - 1)):
            raise SparsifyError(f"block_size: must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] "
                                f"(16, 32, 64, 128, ...), got {self.block_size!r}")
        if not _is_int(self.dense_steps) or not 0 <= self.dense_steps <= MAX_STEPS:
            raise SparsifyError(f"dense_steps: must be an int in [0, {MAX_STEPS}], got {self.dense_steps!r}")
        if self.steps_per_generation is not None and not (
                _is_int(self.steps_per_generation) and self.dense_steps < self.steps_per_generation <= MAX_STEPS):
            raise SparsifyError(f"steps_per_generation: must be an int larger than dense_steps ({self.dense_steps}) "
                                f"and at most {MAX_STEPS}, got {self.steps_per_generation!r}")
        _check_fraction("min_recall", self.min_recall, low_open=False, high_open=True)
        _check_fraction("holdout_fraction", self.holdout_fraction, low_open=True, high_open=True)
        if not _is_int(self.seed):
            raise SparsifyError(f"seed: must be an int, got {self.seed!r}")
        for name in ("profile_rows_per_block", "score_rows_per_block"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 1 <= value <= MAX_BLOCK_SIZE):
                raise SparsifyError(f"{name}: must be None (every row) or an int in [1, {MAX_BLOCK_SIZE}], got {value!r}")
        profiles = self.hardware_profiles
        if isinstance(profiles, (str, os.PathLike)):
            profiles = (profiles,)
        if not isinstance(profiles, (tuple, list)) or not all(isinstance(p, (str, os.PathLike)) for p in profiles):
            raise SparsifyError(f"hardware_profiles: must be a list of file paths, got {self.hardware_profiles!r}")
        for path in profiles:
            if not os.path.isfile(path):
                raise SparsifyError(f"hardware_profiles: {os.fspath(path)!r} is not a file (write one with "
                                    f"`sparsify-cli calibrate --out {os.fspath(path)}`)")
        object.__setattr__(self, "hardware_profiles", tuple(os.fspath(p) for p in profiles))
        if self.price_for is not None:
            from sparsify.cost import HardwareProfile

            if not isinstance(self.price_for, (str, os.PathLike)) or not os.path.isfile(self.price_for):
                raise SparsifyError(f"price_for: {self.price_for!r} is not a hardware profile file (write one with "
                                    f"`sparsify-cli calibrate` on the machine you deploy to)")
            object.__setattr__(self, "price_for", os.fspath(self.price_for))
            HardwareProfile.load(self.price_for)  # a bad file fails now, not after calibration
        for name in ("progress", "adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise SparsifyError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if self.dynamic not in (True, False, "all"):
            raise SparsifyError(f"dynamic: must be True, False or 'all', got {self.dynamic!r}")

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any], base: CompileOptions | None = None) -> CompileOptions:
        """``base`` (or the defaults) with ``keywords`` replaced; unknown names are refused.

        Example:
            >>> CompileOptions.from_keywords({"max_error": 0.1}).max_error
            0.1
        """
        names = [field.name for field in dataclasses.fields(cls)]
        for key in keywords:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SparsifyError(f"unknown option {key!r}{hint}; options: {', '.join(names)}")
        return dataclasses.replace(base or cls(), **keywords)

    @property
    def output_budget(self) -> float | None:
        """The model-level budget the search meets, or ``None`` when ``max_error`` alone is a per-site budget.

        Example:
            >>> CompileOptions(max_output_error=0.02, max_error=0.2).output_budget
            0.02
        """
        if self.max_output_error is not None:
            return self.max_output_error
        return None if self.max_error is not None else DEFAULT_MAX_OUTPUT_ERROR

    @property
    def keeps_every_head_dense(self) -> bool:
        """A zero budget (model-level or per-site) without a target: nothing may be sparsified."""
        return not self.has_target and (self.output_budget == 0 or self.max_error == 0)

    @property
    def has_target(self) -> bool:
        """A global density or speedup target was given."""
        return self.target_density is not None or self.target_speedup is not None

    def to_json(self) -> dict[str, Any]:
        """The options that shape a search, as JSON values (recorded in the strategy's metadata)."""
        skipped = {"progress", "dynamic"}
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in skipped or value is None or value == ():
                continue
            if callable(value):
                value = f"callable:{getattr(value, '__qualname__', type(value).__name__)}"
            values[field.name] = list(value) if isinstance(value, tuple) else value
        return values

    @staticmethod
    def help_of(name: str) -> str:
        """The help text of option ``name``, with its default (for the CLI).

        Example:
            >>> CompileOptions.help_of("output_metric")
            'model output metric: relative_l2 or kl (next-token KL of logits) (default relative_l2)'
        """
        field = next(f for f in dataclasses.fields(CompileOptions) if f.name == name)
        default = field.default
        shown = "" if default is None or default == () or isinstance(default, bool) else f" (default {default})"
        return field.metadata["help"] + shown


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(name: str, value: Any, *, low_open: bool, high_open: bool) -> None:
    inside = _is_number(value) and math.isfinite(value) and (0 < value if low_open else 0 <= value) and (
        value < 1 if high_open else value <= 1)
    if not inside:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise SparsifyError(f"{name}: must be a number in {interval}, got {value!r}")


DEFAULT_OPTIONS = CompileOptions()
"""The defaults, for code that wants to show one (``DEFAULT_OPTIONS.max_error``)."""
