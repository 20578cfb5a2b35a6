"""Exception types raised by sparsify; every message names the site, pattern or file involved."""

from __future__ import annotations


class SparsifyError(Exception):
    """Base class of every error sparsify raises on purpose."""


class CaptureError(SparsifyError):
    """The model could not be captured as a graph (torch.export and symbolic_trace both failed)."""


class NoAttentionFoundError(SparsifyError):
    """The captured graph holds no attention that sparsify recognises."""


class StrategyError(SparsifyError):
    """A strategy document is malformed, of an unknown version, or does not match the model."""


class PatternError(SparsifyError, ValueError):
    """A sparsity pattern was given bad parameters or an unknown name."""


class UnsupportedError(SparsifyError):
    """An input (dtype, shape, device, backend) that the chosen path cannot serve."""


class PassError(SparsifyError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class InputError(SparsifyError, TypeError):
    """Example inputs, calibration batches or call arguments of the wrong structure."""
