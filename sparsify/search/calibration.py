"""Calibration batches of the search: recording them, splitting profile from held-out, and per-call sampling seeds."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

import torch

from sparsify.capture import normalize_inputs
from sparsify.errors import SparsifyError
from sparsify.options import CompileOptions

logger = logging.getLogger(__name__)

__all__ = ["collect_batches", "split_batches", "SamplingSeeds", "step_of"]


def collect_batches(model: torch.nn.Module, calib_loader: Any) -> list[tuple[tuple, dict]]:
    """Calibration batches as ``(args, kwargs)``: from an iterable of batches or a ``forward_loop(model)``.

    Every batch must have the same structure as the first (tensor / tuple of the same length /
    dict with the same keys).

    Example:
        >>> batches = collect_batches(torch.nn.Identity(), [torch.zeros(2), torch.ones(2)])
        >>> len(batches), batches[0][0][0].shape
        (2, torch.Size([2]))
    """
    if calib_loader is None:
        raise SparsifyError("no calibration data: pass an iterable of batches or a forward_loop(model) callable")
    if callable(calib_loader) and not hasattr(calib_loader, "__iter__"):
        recorded: list[tuple[tuple, dict]] = []

        class _Recorder(torch.nn.Module):
            """Stands in for the model in ``forward_loop``: records each call's inputs (copies)."""

            def __init__(self):
                super().__init__()
                self.inner = model

            def __getattr__(self, name: str) -> Any:
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.inner, name)  # model.device, model.config, ...

            def forward(self, *args, **kwargs):
                # Copies: a loop that updates its latents in place must not rewrite earlier batches.
                recorded.append(torch.utils._pytree.tree_map(
                    lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs)))
                return self.inner(*args, **kwargs)

        with torch.no_grad():
            calib_loader(_Recorder())
        raw = [(args, kwargs) for args, kwargs in recorded]
    else:
        try:
            raw = [normalize_inputs(batch) for batch in calib_loader]
        except TypeError as error:
            raise SparsifyError(f"calibration batches must be tensors, tuples of arguments or dicts of keyword "
                                f"arguments: {error}") from None
    if not raw:
        raise SparsifyError("the calibration loader is empty: it yielded no batch (forward_loop made no call)")
    first_args, first_kwargs = raw[0]
    for index, (args, kwargs) in enumerate(raw[1:], start=1):
        if len(args) != len(first_args) or sorted(kwargs) != sorted(first_kwargs):
            raise SparsifyError(
                f"calibration batch {index} has {len(args)} positional arguments and keys {sorted(kwargs)}, but batch 0 "
                f"has {len(first_args)} and {sorted(first_kwargs)}: every batch must have the same structure"
            )
    return raw


def split_batches(count: int, holdout_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of profile and held-out batches; one batch serves both (with a warning)."""
    if count == 1:
        logger.warning("one calibration batch: it both profiles and scores candidates (no held-out data); "
                       "pass several batches for an honest error estimate")
        return [0], [0]
    held_out = max(1, round(count * holdout_fraction))
    return list(range(count - held_out)), list(range(count - held_out, count))


class SamplingSeeds:
    """Seeds the row sampling per (phase, global calibration call, site): a call's draws do not depend on which
    calls ran before it, so a rank's shard samples exactly the rows one process samples on the union.

    Example:
        >>> seeds = SamplingSeeds(seed=0, first_call=3)
        >>> list(seeds.calls([0, 1])), seeds.call
        ([0, 1], 4)
    """

    def __init__(self, seed: int, first_call: int):
        self.seed = seed
        self.first_call = first_call
        self.call = first_call
        self.generator = torch.Generator()

    def calls(self, indices: Sequence[int]):
        """Iterate ``indices`` (this rank's batch indices), tracking the global call being observed."""
        for index in indices:
            self.call = self.first_call + index
            yield index

    def for_site(self, phase: str, site: AttentionSite) -> torch.Generator:
        text = f"{self.seed}/{phase}/{self.call}/{site.index}".encode()
        return self.generator.manual_seed(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1)


def step_of(index: int, config: CompileOptions) -> int:
    """The generation step of calibration call ``index``."""
    return index % config.steps_per_generation if config.steps_per_generation else index
