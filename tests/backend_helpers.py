"""Shared pieces of the backend tests: random runtime masks, user masks, and the one dense float64 reference."""

from __future__ import annotations

import importlib.util
import math

import torch

from sparsify.block_mask import RuntimeBlockMask, blocks_for

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

MASK_KINDS = ["none", "bool", "bool_padding", "bool_expanded", "additive", "additive_2d", "additive_padding"]


def random_runtime_mask(gen: torch.Generator, *, heads: int, q_len: int, k_len: int, block: int, causal: bool,
                        kv_head_index: torch.Tensor | None = None, q_offset: int = 0, density: float = 0.4,
                        batch: int | None = None, device: str | torch.device = "cpu") -> RuntimeBlockMask:
    """A random mask whose every row keeps at least one block; ``batch`` makes it per input."""
    q_blocks, k_blocks = blocks_for(q_len, block), blocks_for(k_len, block)
    leading = batch or 1
    kept = torch.rand(leading, heads, q_blocks, k_blocks, generator=gen) < density
    first = torch.randint(0, k_blocks, (leading, heads, q_blocks), generator=gen)
    kept.scatter_(-1, first.unsqueeze(-1), True)
    return RuntimeBlockMask.from_block_masks(kept.to(device), block_size=block, q_len=q_len, k_len=k_len,
                                             causal=causal, kv_head_index=kv_head_index, q_offset=q_offset,
                                             width=k_blocks if batch else None, per_input=batch is not None)


def random_attn_mask(gen: torch.Generator, kind: str, batch: int, heads: int, q_len: int, k_len: int):
    """A user mask of one of `MASK_KINDS` (CPU)."""
    if kind == "none":
        return None
    if kind == "bool":                                          # full [B, H, Sq, Sk]
        return torch.rand(batch, heads, q_len, k_len, generator=gen) < 0.7
    if kind == "bool_padding":                                  # HF style [B, 1, 1, Sk]
        keep = torch.ones(batch, 1, 1, k_len, dtype=torch.bool)
        keep[-1, ..., max(1, k_len - 7):] = False
        return keep
    if kind == "bool_expanded":                                 # an expand() view, stride 0
        keep = torch.rand(batch, 1, 1, k_len, generator=gen) < 0.8
        return keep.expand(batch, heads, q_len, k_len)
    if kind == "additive":                                      # [1, H, Sq, Sk] with -inf holes
        bias = torch.randn(1, heads, q_len, k_len, generator=gen)
        return bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.2, float("-inf"))
    if kind == "additive_2d":                                   # [Sq, Sk]
        return torch.randn(q_len, k_len, generator=gen)
    if kind == "additive_padding":                              # HF's dtype minimum
        bias = torch.zeros(batch, 1, q_len, k_len)
        bias[0, ..., max(1, k_len - 5):] = torch.finfo(torch.float32).min
        return bias
    raise ValueError(kind)


def mask_reference(q, k, v, mask: RuntimeBlockMask, attn_mask=None, scale=None, softcap=None, sinks=None):
    """Dense attention in float64 under ``mask.element_mask()`` and ``attn_mask``; rows with no visible key give 0.

    Query head ``h`` reads key/value head ``mask.kv_head_index[h]``; ``softcap`` and ``sinks``
    as `sparsify.ops.dense_attention` defines them.
    """
    index = mask.kv_head_index.to(q.device)
    kk, vv = k.double().index_select(1, index), v.double().index_select(1, index)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ kk.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    visible = mask.element_mask().to(q.device)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.device)
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.double()
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        column = sinks.double().to(q.device).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probabilities = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
        probabilities = probabilities.masked_fill(~visible, 0.0)
    else:
        probabilities = torch.softmax(scores, -1).nan_to_num(0.0)
    return probabilities @ vv


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out - ref‖ / ‖ref‖`` in float64 (0 when both vanish)."""
    ref = ref.double().to(out.device)   # a CPU reference for a GPU output is compared where the output is
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(output: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Max abs error within ``tol`` times ``max(1, max |expected|)``; no NaN."""
    assert output.shape == expected.shape, (output.shape, expected.shape)
    assert not torch.isnan(output).any(), "output holds NaN"
    error = (output.double() - expected.double()).abs().max().item() if output.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert error <= tol * scale, f"max abs error {error:.3g} > {tol:g} * {scale:.3g}"


def recorded_cuda_graphs() -> int:
    """CUDA graphs Inductor's CUDA-graph trees have recorded on the current device (0 when none)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    if manager is None:
        return 0
    nodes, count = list(manager.get_roots()), 0
    while nodes:
        node = nodes.pop()
        count += 1
        for children in node.children.values():
            nodes.extend(children)
    return count


def load_triton_kernels():
    """The triton kernel module, or ``None`` without triton. On a machine without CUDA it runs in
    Triton's interpreter: tests/conftest.py switches that on for the whole session, before anything
    imports triton (triton decorates its own standard library when first imported)."""
    if not HAS_TRITON:
        return None
    import sparsify.backends.triton  # noqa: F401  (registers "triton")
    from sparsify.backends import triton_kernels

    return triton_kernels


def ops_called(function) -> set[str]:
    """The operators ``function()`` called, by the profiler (no dispatch mode: one would itself keep a custom op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    return {event.key for event in profiler.key_averages()}
