"""Built-in toy models (pure torch, random weights) for the CLI's built-in example, the README and the tests.

Not to be confused with ``examples/`` (scripts that run real models).
"""

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
    with torch.random.fork_rng(devices=[]):  # the weights come from the seed; the caller's random stream is untouched
        torch.manual_seed(seed)
        model = VideoTransformer(dim, heads, layers).eval()
    tokens = torch.randn(1, seq_frames * height * width, dim, generator=torch.Generator().manual_seed(seed))
    return model, (tokens,)


def manual_attention_block(seq: int = 256, dim: int = 64, heads: int = 4, causal: bool = True,
                           seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory for the CLI: ``(model, example_inputs)`` of a `ManualAttentionBlock` (weights from ``seed``).

    Example:
        >>> model, (x,) = manual_attention_block(seq=32, dim=16, heads=2)
        >>> model(x).shape
        torch.Size([1, 32, 16])
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the weights come from the seed; the caller's random stream is untouched
        torch.manual_seed(seed)
        model = ManualAttentionBlock(dim, heads, causal).eval()
    return model, (torch.randn(1, seq, dim, generator=generator),)


def manual_attention_batches(seq: int = 256, dim: int = 64, count: int = 4, seed: int = 1) -> list[torch.Tensor]:
    """Calibration batches for `manual_attention_block` (``--calib sparsify.examples:manual_attention_batches``).

    Example:
        >>> [batch.shape for batch in manual_attention_batches(seq=32, dim=16, count=2)]
        [torch.Size([1, 32, 16]), torch.Size([1, 32, 16])]
    """
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, dim, generator=generator) for _ in range(count)]


class StructuredVideoTransformer(nn.Module):
    """A video-transformer-like stack whose heads attend with known structure, for demos and tests.

    Tokens of a ``frames × height × width`` grid carry positional features; each head's
    query/key projection reads one family of them, so the attention maps are what real video
    diffusion transformers show (Sparse VideoGen, Radial Attention): head 0 attends to a local
    1-D window, head 1 to the same spatial position in every frame (a multi-diagonal with period
    ``height × width``), head 2 to a spatial neighbourhood within its frame, head 3 to the first
    tokens (a sink), and any further heads repeat the cycle. Weights are built deterministically
    from ``seed``; the MLPs are small, so the structure persists through the layers.
    ``attention_gain`` scales the attention output projections: at the default 0.1 removing every
    attention moves the output by about 2.6% (the benchmarks' model since their first numbers); at
    1.0, the CLI's built-in example, by about 25%, so a model-level budget cannot drop attention freely.

    Example:
        >>> model = StructuredVideoTransformer(frames=2, height=4, width=4, dim=64, heads=4, layers=1)
        >>> model(model.example_tokens()).shape
        torch.Size([1, 32, 64])
    """

    def __init__(self, frames: int = 8, height: int = 16, width: int = 16, dim: int = 128, heads: int = 4,
                 layers: int = 4, sharpness: float = 4.0, seed: int = 0, attention_gain: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.frames, self.height, self.width, self.heads = frames, height, width, heads
        generator = torch.Generator().manual_seed(seed)
        head_dim = dim // heads
        self.blocks = nn.ModuleList(_SdpaBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            for block in self.blocks:
                for module in block.modules():
                    if isinstance(module, nn.Linear):
                        module.weight.normal_(0.0, 0.02 / math.sqrt(module.in_features) * 8, generator=generator)
                        module.bias.zero_()
                qkv = block.attn.qkv.weight  # [3*dim, dim]
                identity = torch.eye(dim) * math.sqrt(sharpness)
                qkv[:dim] = identity  # queries read the positional features of their head's slice
                qkv[dim:2 * dim] = identity
                qkv[2 * dim:] = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
                block.attn.out.weight.mul_(attention_gain)
                block.norm1.weight.fill_(1.0)
        self.register_buffer("positions", self._positional_features(frames, height, width, dim, heads, head_dim, generator),
                             persistent=False)

    @staticmethod
    def _positional_features(frames, height, width, dim, heads, head_dim, generator) -> torch.Tensor:
        t = torch.arange(frames * height * width, dtype=torch.float32)
        frame = torch.div(t, height * width, rounding_mode="floor")
        row = torch.div(t % (height * width), width, rounding_mode="floor")
        column = t % width
        features = torch.zeros(t.numel(), dim)
        half = (head_dim - 1) // 2  # the last feature of each head is reserved for sinks
        for head in range(heads):
            family = head % 4
            if family == 0:  # local 1-D window of ~2 rows of tokens
                coordinates, scales = [t], [2.0 * width]
            elif family == 1:  # same spatial position across frames
                coordinates, scales = [row, column], [0.5, 0.5]
            elif family == 2:  # spatial neighbourhood within the frame
                coordinates, scales = [frame, row, column], [0.25, 2.0, 2.0]
            else:  # A-shape: a short local window plus a sink at the first tokens
                coordinates, scales = [t], [0.5 * width]
                sink = torch.full((t.numel(),), 2.0)
                sink[:width] = 14.0
                features[:, (head + 1) * head_dim - 1] = sink
            frequencies = torch.stack([torch.randn(half, generator=generator) / s for s in scales], dim=1)
            phase = torch.stack(coordinates, dim=1) @ frequencies.T
            block = torch.cat([phase.cos(), phase.sin()], dim=1) * math.sqrt(2.0)
            features[:, head * head_dim:head * head_dim + 2 * half] = block
        return features

    def example_tokens(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Positional features plus a little content noise: ``[batch, tokens, dim]``."""
        noise = torch.randn(batch, *self.positions.shape, generator=torch.Generator().manual_seed(seed))
        return self.positions.unsqueeze(0) + 0.1 * noise.to(self.positions.device, self.positions.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


def structured_video_transformer(frames: int = 8, height: int = 16, width: int = 16, heads: int = 4, layers: int = 4,
                                 seed: int = 0, attention_gain: float = 1.0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory for the CLI: a `StructuredVideoTransformer` and one batch of tokens (2048 by default).

    Its attention weighs in the output (``attention_gain`` 1.0: removing it all moves the output by
    about 25%), so the search's model-level budget has to keep what each head really attends to.
    """
    model = StructuredVideoTransformer(frames, height, width, heads=heads, layers=layers, seed=seed,
                                       attention_gain=attention_gain).eval()
    return model, (model.example_tokens(seed=seed),)


def structured_video_batches(frames: int = 8, height: int = 16, width: int = 16, heads: int = 4, layers: int = 4,
                             seed: int = 0, count: int = 4) -> list[torch.Tensor]:
    """Calibration batches for `structured_video_transformer` (fresh content noise each)."""
    model = StructuredVideoTransformer(frames, height, width, heads=heads, layers=layers, seed=seed)
    return [model.example_tokens(seed=seed + 1 + index) for index in range(count)]
