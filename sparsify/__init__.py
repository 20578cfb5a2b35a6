"""sparsify: a compiler for attention sparsity in PyTorch."""

from sparsify import ops  # noqa: F401  (registers torch.ops.sparsify.attention)
from sparsify import patterns, toy_models
from sparsify.api import SparsifiedModule, compile, find_attention
from sparsify.errors import (
    CaptureError,
    NoAttentionFoundError,
    PassError,
    PatternError,
    SparsifyError,
    StrategyError,
    UnsupportedError,
)
from sparsify.site import AttentionSite
from sparsify.export import export_onnx
from sparsify.integrations import attach
from sparsify.options import CompileOptions
from sparsify.strategy import Strategy

from sparsify.version import VERSION as __version__  # noqa: E402

__all__ = [
    "AttentionSite",
    "CaptureError",
    "CompileOptions",
    "NoAttentionFoundError",
    "PassError",
    "PatternError",
    "SparsifiedModule",
    "SparsifyError",
    "Strategy",
    "StrategyError",
    "UnsupportedError",
    "attach",
    "compile",
    "export_onnx",
    "find_attention",
    "patterns",
]
