"""Built-in example models (pure torch, random weights) for the CLI, the README and the tests."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ManualAttentionBlock(nn.Module):
    """A pre-norm transformer block whose attention is written by hand (matmul-softmax-matmul).

    Example:
        >>> block = ManualAttentionBlock(dim=32, heads=4)
        >>> block(torch.randn(2, 16, 32)).shape
        torch.Size([2, 16, 32])
    """

    def __init__(self, dim: int = 64, heads: int = 4, causal: bool = False):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = self.qkv(self.norm(x)).view(batch, seq, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        if self.causal:
            future = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if mask is not None:
            scores = scores + mask
        probabilities = self.dropout(scores.softmax(dim=-1))
        attended = (probabilities @ v).transpose(1, 2).reshape(batch, seq, dim)
        x = x + self.proj(attended)
        return x + self.mlp(x)


class VideoTransformer(nn.Module):
    """A small video-diffusion-like transformer over a ``frames × height × width`` token grid.

    Every layer uses ``F.scaled_dot_product_attention`` (no mask), as DiT-style models do.

    Example:
        >>> model = VideoTransformer(dim=32, heads=2, layers=1)
        >>> model(torch.randn(1, 4 * 8 * 8, 32)).shape
        torch.Size([1, 256, 32])
    """

    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(_SdpaBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class _SdpaBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SdpaSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _SdpaSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, seq, dim))


def video_transformer(seq_frames: int = 8, height: int = 16, width: int = 16, dim: int = 128, heads: int = 4,
                      layers: int = 4, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory for the CLI: ``(model, example_inputs)`` of a `VideoTransformer` (2048 tokens by default).

    Example:
        >>> model, (tokens,) = video_transformer(seq_frames=2, height=4, width=4, dim=32, heads=2, layers=1)
        >>> tokens.shape
        torch.Size([1, 32, 32])
    """
    torch.manual_seed(seed)
    model = VideoTransformer(dim, heads, layers).eval()
    return model, (torch.randn(1, seq_frames * height * width, dim),)


def manual_attention_block(seq: int = 256, dim: int = 64, heads: int = 4, causal: bool = True,
                           seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory for the CLI: ``(model, example_inputs)`` of a `ManualAttentionBlock`."""
    torch.manual_seed(seed)
    return ManualAttentionBlock(dim, heads, causal).eval(), (torch.randn(1, seq, dim),)
