"""Query-aware sparse decode: per-page key summaries kept as the cache fills, and the per-step page selection that reads them.

`KeyPageSummaries` holds, for one attention layer's KV cache, the element-wise minimum and
maximum of the keys of every page (``page_size`` consecutive cache slots). It is updated
incrementally: a prefill (or a prefill chunk) summarises the pages its keys fall in, a decode
step the page(s) of its new token(s) — never the whole cache.

`QueryAwareDecoder` is the module that owns those summaries for one attention layer and runs a
decode step under a `sparsify.patterns.QueryAwareDecode` pattern: per key/value head it
bounds every page's best score ``Σ_d max(q_d · min_d, q_d · max_d)`` (largest over the query
heads of the group and the step's query rows), keeps the sink pages, the recent window and the
top pages by that bound (a fixed count: ``pattern.selected_pages``) and attends over them, the
group's query heads as rows of one call (no GQA expansion). A step
is device work only — the new token's position comes from the attention mask as a tensor when a
static cache hides its unused slots — so it compiles into one graph that serves every step.

Two implementations of the step, chosen per call (``kernels=``): on CUDA with Triton installed,
the Triton kernels of `sparsify.backends.triton_decode` (``torch.ops.sparsify.query_aware_decode_step``:
summary update and page scores in one launch, ``topk``, a split-K flash decode that reads only the
selected pages straight from the cache with the group's query heads sharing each key/value load, and
a combine — four launches, no gather copy); elsewhere (CPU, no Triton, other dtypes) the plain torch reference
(bounds by matmul, ``topk``, gather of the selected pages and SDPA over them). Both select the same
pages from the same summaries and attend over them alike.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from sparsify.errors import UnsupportedError
from sparsify.patterns import QueryAwareDecode
from sparsify.runtime.kernel_op import may_skip_custom_op

__all__ = ["DECODE_KERNELS", "KeyPageSummaries", "QueryAwareDecoder", "page_bounds", "pattern_rows_decode",
           "query_aware_decode_step", "read_fraction", "select_pages", "triton_decode_available", "visible_key_end"]

#: Pages a summary tensor grows by at least when a growing cache outruns it.
_GROWTH_PAGES = 64
#: Implementations of a decode step: ``auto`` (Triton on CUDA when it imports, else torch), ``triton``, ``torch``.
DECODE_KERNELS = ("auto", "triton", "torch")
#: Dtypes and largest head dim the Triton kernels take (others run the torch path).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256
#: Whether Triton is installed, asked once at import: a fact of the environment, and `importlib`'s
#: finder cannot run inside a graph that torch.compile traces (it is marked as skipped: a graph break).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_decode_available(device: torch.device, dtype: torch.dtype = torch.float16) -> tuple[bool, str]:
    """``(available, reason)``: whether the Triton decode kernels can run on ``device`` in ``dtype``.

    On CUDA when Triton imports; on CPU only through Triton's interpreter (``TRITON_INTERPRET=1``,
    for tests), which computes bfloat16 wrongly and so is refused it.

    Example:
        >>> import os
        >>> triton_decode_available(torch.device("cpu"))[0] == (os.environ.get("TRITON_INTERPRET") == "1"
        ...                                                      and importlib.util.find_spec("triton") is not None)
        True
    """
    if not _TRITON_INSTALLED:
        return False, "triton is not installed (pip install triton)"
    if dtype not in _TRITON_DTYPES:
        return False, f"the Triton kernels take float16, bfloat16 or float32, not {dtype}"
    if device.type == "cuda":
        return True, ""
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False, f"the Triton kernels run on CUDA tensors (on CPU only with TRITON_INTERPRET=1), not on {device.type}"
    if dtype == torch.bfloat16:
        return False, "Triton's CPU interpreter computes bfloat16 wrongly (it runs on CUDA)"
    return True, ""


@torch.library.custom_op("sparsify::query_aware_decode_step", mutates_args=("minimum", "maximum"))
def query_aware_decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, minimum: torch.Tensor,
                            maximum: torch.Tensor, end: torch.Tensor | None, attention_mask: torch.Tensor | None,
                            scale: float, page_size: int, sink_pages: int, window_pages: int,
                            selected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One query-aware decode step on the Triton kernels (an opaque op): ``(output, chosen pages)``; updates the summaries.

    ``query`` ``[B, H, rows, D]`` against the cache ``key`` / ``value`` ``[B, Hkv, S, D]`` ending
    at slot ``end`` (0-dim device tensor; ``None``: at ``S``, a growing cache — the kernels take the
    length as a launch argument); ``minimum`` / ``maximum`` are the layer's page summaries
    (`KeyPageSummaries`), re-summarised in place for the step's new slots. Returns the output
    ``[B, H, rows, Dv]`` and the pages read, ``int64 [B, Hkv, selected]``.

    Example:
        >>> out, chosen = torch.ops.sparsify.query_aware_decode_step(q, keys, values, low, high, end, None,
        ...                                                     0.125, 32, 1, 2, 106)   # doctest: +SKIP
    """
    return _triton_decode_step(query, key, value, minimum, maximum, end, attention_mask, scale, page_size, sink_pages,
                               window_pages, selected)


def _triton_decode_step(*arguments) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's implementation: `sparsify.backends.triton_decode.decode_step` (imported on first use: Triton may be absent)."""
    from sparsify.backends import triton_decode

    return triton_decode.decode_step(*arguments)


@query_aware_decode_step.register_fake
def _query_aware_decode_step_fake(query, key, value, minimum, maximum, end, attention_mask, scale, page_size,
                                  sink_pages, window_pages, selected):
    batch, heads, rows, _ = query.shape
    output = query.new_empty(batch, heads, rows, value.shape[-1])
    return output, torch.empty(batch, key.shape[1], selected, dtype=torch.long, device=query.device)


class KeyPageSummaries:
    """Element-wise ``minimum`` / ``maximum`` ``[B, Hkv, pages, D]`` of the keys of every page of one layer's cache.

    ``pages_capacity`` grows (doubling) with a growing cache; a static cache's fits from the start.
    Slots past the cache's end hold stale values that the selection never reads as candidates.

    Example:
        >>> summaries = KeyPageSummaries(page_size=4)
        >>> keys = torch.arange(12.0).view(1, 1, 12, 1)
        >>> summaries.summarise(keys, 0, 10)                         # pages 0, 1 and the first 2 keys of page 2
        >>> summaries.minimum[0, 0, :3, 0].tolist(), summaries.maximum[0, 0, :3, 0].tolist()
        ([0.0, 4.0, 8.0], [3.0, 7.0, 9.0])
    """

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.minimum: torch.Tensor | None = None
        self.maximum: torch.Tensor | None = None

    @property
    def pages_capacity(self) -> int:
        return 0 if self.minimum is None else self.minimum.shape[2]

    def reserve(self, keys: torch.Tensor, pages: int) -> None:
        """Allocate (or grow) the summaries for ``pages`` pages of ``keys``' batch, heads, size, dtype and device."""
        batch, heads, _, dim = keys.shape
        fits = (self.minimum is not None and self.minimum.shape[:2] == (batch, heads)
                and self.minimum.shape[3] == dim and self.minimum.dtype == keys.dtype
                and self.minimum.device == keys.device)
        if fits and pages <= self.pages_capacity:
            return
        capacity = max(pages, 2 * self.pages_capacity if fits else 0, _GROWTH_PAGES)
        minimum = keys.new_empty(batch, heads, capacity, dim)
        maximum = keys.new_empty(batch, heads, capacity, dim)
        if fits:                                                 # a growing cache keeps what it summarised
            minimum[:, :, :self.pages_capacity] = self.minimum
            maximum[:, :, :self.pages_capacity] = self.maximum
        for summary in (minimum, maximum):
            # Fixed addresses for torch.compile: CUDA graphs (mode="reduce-overhead") may then update them in place.
            torch._dynamo.mark_static_address(summary)
        self.minimum, self.maximum = minimum, maximum

    def summarise(self, keys: torch.Tensor, start: int, end: int) -> None:
        """Summarise the pages holding cache slots ``[start, end)`` of ``keys`` ``[B, Hkv, S, D]`` (host ints: prefill).

        A page cut by ``end`` is summarised over its slots before ``end``; ``start == 0`` starts a new sequence.
        """
        page = self.page_size
        if start == 0 or self.minimum is None:
            self.reserve(keys, -(-keys.shape[2] // page))
        first, last = start // page, -(-end // page)
        self.reserve(keys, last)
        span = keys[:, :, first * page:end]
        padding = (last - first) * page - span.shape[2]
        low = torch.nn.functional.pad(span, (0, 0, 0, padding), value=float("inf"))
        high = torch.nn.functional.pad(span, (0, 0, 0, padding), value=float("-inf"))
        shape = (*keys.shape[:2], last - first, page, keys.shape[3])
        self.minimum[:, :, first:last] = low.view(shape).amin(3)
        self.maximum[:, :, first:last] = high.view(shape).amax(3)

    def update(self, keys: torch.Tensor, end: torch.Tensor, new_tokens: int) -> None:
        """Re-summarise the pages of the last ``new_tokens`` slots before ``end`` (a 0-dim device tensor): a decode step.

        Device work only, a fixed number of pages per call: it compiles into the step's graph.
        """
        page = self.page_size
        self.reserve(keys, -(-keys.shape[2] // page))
        touched = (new_tokens - 1 + page - 1) // page + 1             # pages the new tokens can span
        first_page = torch.div(end - new_tokens, page, rounding_mode="floor")
        last_page = torch.div(end - 1, page, rounding_mode="floor")
        pages = torch.minimum(first_page + torch.arange(touched, device=keys.device), last_page)   # [touched]
        slots = pages.unsqueeze(1) * page + torch.arange(page, device=keys.device)               # [touched, page]
        valid = (slots < end).view(1, 1, touched, page, 1)
        gathered = keys.index_select(2, slots.flatten().clamp(max=keys.shape[2] - 1))
        gathered = gathered.view(*keys.shape[:2], touched, page, keys.shape[3])
        inf = keys.new_full((), float("inf"))                   # made on the device: CUDA graphs capture it
        self.minimum.index_copy_(2, pages, torch.where(valid, gathered, inf).amin(3))
        self.maximum.index_copy_(2, pages, torch.where(valid, gathered, -inf).amax(3))


def page_bounds(q: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, pages]``: per key/value head the largest upper bound of ``q · k`` over each page's keys.

    ``q`` is ``[B, Hkv, rows, D]`` (the group's query heads and the step's query rows); the bound
    of one row is ``Σ_d max(q_d · min_d, q_d · max_d)``, and a page scores its largest row.

    Example:
        >>> q = torch.tensor([[[[1.0, -1.0]]]])
        >>> low, high = torch.tensor([[[[0.0, -2.0]]]]), torch.tensor([[[[3.0, 1.0]]]])
        >>> page_bounds(q, low, high).tolist()                       # 1 * 3 + (-1) * (-2)
        [[[5.0]]]
    """
    q = q.to(minimum.dtype)
    bound = q.clamp(min=0) @ maximum.transpose(-1, -2) + q.clamp(max=0) @ minimum.transpose(-1, -2)
    return bound.amax(2)


def select_pages(bounds: torch.Tensor, end: torch.Tensor, pattern: QueryAwareDecode, page_size: int) -> torch.Tensor:
    """``int64 [B, Hkv, count]``: the pages a step reads, ``count = pattern.selected_pages(bounds.shape[-1])``.

    Sinks and the window (ending at the page of slot ``end - 1``) always; the rest by the highest
    bound among pages that hold a slot before ``end``. Indices are distinct; when fewer pages are
    valid than ``count``, the extra ones point past ``end`` and the caller masks them.
    """
    pages = bounds.shape[-1]
    count = pattern.selected_pages(pages)
    page = torch.arange(pages, device=bounds.device)
    last_page = torch.div(end - 1, page_size, rounding_mode="floor")
    scores = bounds.float().masked_fill(page * page_size >= end, float("-inf"))
    forced = (page < pattern.sink_pages) | ((page <= last_page) & (page > last_page - pattern.window_pages))
    scores = scores.masked_fill(forced, float("inf"))
    return scores.topk(count, dim=-1, sorted=False).indices


def visible_key_end(attention_mask: torch.Tensor, k_len: int) -> torch.Tensor:
    """0-dim ``int64``: one past the last cache slot the last query row of ``attention_mask`` sees (over the batch).

    A ``StaticCache`` hands attention its whole capacity and hides the unused slots with the mask;
    the new token's slot is the last one its row sees. Device work, no host read.
    """
    row = attention_mask[..., -1, :]
    visible = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    visible = visible.reshape(-1, k_len).any(0)
    slots = torch.arange(1, k_len + 1, device=attention_mask.device)
    return torch.where(visible, slots, 0).amax()


class QueryAwareDecoder(torch.nn.Module):
    """One attention layer's query-aware decode: owns its cache's page summaries and runs decode steps over selected pages.

    Call `observe_prefill` for every prefill (chunk) that writes the cache, and `forward` for each
    decode step (a call of fewer than ``block_size`` query rows against a longer cache). The
    summaries follow the one cache this layer is decoding: a prefill starting at slot 0 starts a
    new sequence. ``kernels`` picks the step's implementation: ``"auto"`` runs the Triton kernels
    on CUDA when Triton imports and the torch reference elsewhere; ``"triton"`` insists (and says
    why it cannot); ``"torch"`` always runs the reference.

    Example:
        >>> from sparsify.patterns import query_aware_decode
        >>> decoder = QueryAwareDecoder(query_aware_decode(1.0, page_size=4), num_heads=2, num_kv_heads=1)
        >>> keys, values = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
        >>> decoder.observe_prefill(keys[:, :, :15], 0, 15)
        >>> decoder(torch.randn(1, 2, 1, 8), keys, values, None, None).shape
        torch.Size([1, 2, 1, 8])
    """

    def __init__(self, pattern: QueryAwareDecode, *, num_heads: int, num_kv_heads: int, block_size: int = 128,
                 kernels: str = "auto"):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} key/value head groups")
        if kernels not in DECODE_KERNELS:
            raise ValueError(f"unknown decode kernels {kernels!r}; known: {', '.join(DECODE_KERNELS)}")
        self.pattern = pattern
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        #: Calls with fewer query rows than this against a longer cache are decode steps (the strategy's block size).
        self.block_size = block_size
        #: Which implementation runs a step: ``auto`` (Triton on CUDA when it imports), ``triton`` or ``torch``.
        self.kernels = kernels
        self.summaries = KeyPageSummaries(pattern.page_size)
        #: Set to a list to collect, per step, the fraction of the visible cache read (device tensors).
        self.read_log: list | None = None

    def extra_repr(self) -> str:
        return f"{self.pattern}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, kernels={self.kernels}"

    def observe_prefill(self, keys: torch.Tensor, start: int, end: int) -> None:
        """Summarise the cache slots ``[start, end)`` a prefill (chunk) wrote (host ints)."""
        self.summaries.summarise(keys, start, end)

    def uses_triton(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether a step on these tensors runs the Triton kernels (``kernels="triton"`` refuses what they cannot run)."""
        if self.kernels == "torch":
            return False
        available, reason = triton_decode_available(query.device, query.dtype)
        if available and not (query.dtype == key.dtype == value.dtype):
            available, reason = False, f"the Triton kernels take one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        if available and max(query.shape[-1], value.shape[-1]) > _TRITON_MAX_HEAD_DIM:
            available, reason = False, f"the Triton kernels take head dims up to {_TRITON_MAX_HEAD_DIM}"
        if self.kernels == "triton":
            if not available:
                raise RuntimeError(f"query-aware decode with kernels='triton': {reason}; use kernels='auto' to fall "
                                   f"back to the torch path")
            return True
        return available and query.device.type == "cuda"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        """One decode step: ``query`` ``[B, H, Lq, D]`` against the cache ``key``/``value`` ``[B, Hkv, S, D]``.

        Without a mask the cache ends at ``S`` (a growing cache); with one, at the last slot the
        last query row sees (a static cache). Returns ``[B, H, Lq, Dv]``.
        """
        rows, dim = query.shape[2], query.shape[3]
        k_len = key.shape[2]
        page = self.pattern.page_size
        # A growing cache (no mask) ends at its size: the Triton step takes that as a launch argument (end None).
        end = None if attention_mask is None else visible_key_end(attention_mask, k_len)
        if self.summaries.minimum is None:
            raise RuntimeError("query-aware decode needs the prefill's key summaries: run the prompt through the "
                               "attached model with use_cache=True before decoding")
        pages = -(-k_len // page)
        use_triton = self.uses_triton(query, key, value)
        if end is None and (not use_triton or self.read_log is not None):
            end = torch.full((), k_len, dtype=torch.long, device=key.device)    # the torch step and the log read it
        if use_triton:
            self.summaries.reserve(key, pages)
            # Eager and without autograd, the op's implementation directly (the op runs exactly it; its dispatch
            # costs host time on every step, and an eager decode step at batch 1 is host-bound).
            step = _triton_decode_step if may_skip_custom_op(query, key, value, attention_mask) else \
                torch.ops.sparsify.query_aware_decode_step
            output, chosen = step(
                query, key, value, self.summaries.minimum, self.summaries.maximum, end, attention_mask,
                dim ** -0.5 if scale is None else scale, page, self.pattern.sink_pages, self.pattern.window_pages,
                self.pattern.selected_pages(pages))
        else:
            output, chosen = self._torch_step(query, key, value, attention_mask, scale, end)
        if self.read_log is not None:
            slots_read = (end - chosen * page).clamp(min=0, max=page).sum(-1)
            self.read_log.append(slots_read.float().mean() / end.clamp(min=1))
        return output

    def page_scores(self, grouped_query: torch.Tensor, key: torch.Tensor, end: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
        """``[B, Hkv, pages]``: how the torch step ranks the cache's pages for ``grouped_query`` ``[B, Hkv, rows, D]``.

        The bound `page_bounds` of the page summaries (the Triton step computes the same in its
        kernel). A subclass may rank pages otherwise to study the choice against the bound, e.g. by
        their exact attention mass (``examples/long_context.py --page-choice exact``); `select_pages`
        then adds the sinks and the window and takes the top of the rest.

        Example:
            >>> from sparsify.patterns import query_aware_decode
            >>> decoder = QueryAwareDecoder(query_aware_decode(1.0, page_size=4), num_heads=1, num_kv_heads=1)
            >>> keys = torch.randn(1, 1, 16, 8)
            >>> decoder.observe_prefill(keys, 0, 16)
            >>> decoder.page_scores(torch.randn(1, 1, 1, 8), keys, torch.tensor(16), None).shape
            torch.Size([1, 1, 4])
        """
        pages = -(-key.shape[2] // self.pattern.page_size)
        return page_bounds(grouped_query, self.summaries.minimum[:, :, :pages], self.summaries.maximum[:, :, :pages])

    def _torch_step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scale: float | None,
                    end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference step in plain torch: bounds, selection, gather of the selected pages and SDPA; ``(output, chosen)``."""
        batch, heads, rows, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        group = heads // kv_heads
        page = self.pattern.page_size
        self.summaries.update(key, end, rows)
        pages = -(-k_len // page)
        grouped = query.reshape(batch, kv_heads, group * rows, dim)
        chosen = select_pages(self.page_scores(grouped, key, end, scale), end, self.pattern, page)   # [B, Hkv, count]
        slots = (chosen.unsqueeze(-1) * page + torch.arange(page, device=key.device)).flatten(2)   # [B, Hkv, n]
        in_range = slots < k_len
        base = torch.arange(batch * kv_heads, device=key.device).view(batch, kv_heads, 1) * k_len
        flat = (base + slots.clamp(max=k_len - 1)).flatten()
        selected_keys = key.reshape(-1, dim).index_select(0, flat).view(batch, kv_heads, -1, dim)
        selected_values = value.reshape(-1, value.shape[-1]).index_select(0, flat).view(batch, kv_heads, -1,
                                                                                       value.shape[-1])
        # Row r of the step sits at slot end - rows + r and sees the selected slots up to it.
        row_slot = end - rows + torch.arange(rows, device=key.device)                   # [rows]
        visible = (slots.unsqueeze(2) <= row_slot.view(1, 1, rows, 1)) & in_range.unsqueeze(2)   # [B, Hkv, rows, n]
        if attention_mask is not None:
            user = attention_mask[:, 0, -rows:] if attention_mask.dim() == 4 else attention_mask[..., -rows:, :]
            user = user if user.dtype == torch.bool else user > torch.finfo(user.dtype).min / 2
            user = user.expand(batch, rows, k_len)
            picked = user.gather(2, slots.clamp(max=k_len - 1).reshape(batch, 1, -1).expand(batch, rows, -1))
            visible = visible & picked.view(batch, rows, kv_heads, -1).transpose(1, 2)
        visible = visible.unsqueeze(2).expand(batch, kv_heads, group, rows, -1).reshape(batch, kv_heads,
                                                                                       group * rows, -1)
        output = torch.nn.functional.scaled_dot_product_attention(grouped, selected_keys, selected_values,
                                                                  attn_mask=visible, scale=scale)
        return output.reshape(batch, heads, rows, -1), chosen


def _kept_key_blocks(counts: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """``bool [B, H, len(rows), k_blocks]``: the kept key blocks of query blocks ``rows`` (device) of compressed rows."""
    counts, indices = counts.index_select(2, rows), indices.index_select(2, rows)
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    target = torch.where(valid, indices.long(), k_blocks)                  # padding scatters into a dropped column
    kept = torch.zeros(*indices.shape[:-1], k_blocks + 1, dtype=torch.bool, device=indices.device)
    return kept.scatter_(-1, target, True)[..., :k_blocks]


def pattern_rows_decode(runtime: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor, scale: float | None) -> torch.Tensor:
    """A decode step of a site's static patterns when the cache's length is on the device only (a ``StaticCache``).

    ``runtime`` is the site's `SparseAttention`. A static cache hands attention its whole capacity
    ``S`` and hides the unused slots with ``attention_mask``; the step's rows sit at the slots
    before the last one the mask shows (`visible_key_end`, a device tensor), so the rows of the
    pattern they read are picked on the device from the site's mask for the full ``S × S`` grid
    (built once per capacity): no host read, one graph for every step. Each head then attends
    over the whole capacity with its row's blocks, causality and the user's mask as an element
    mask — exact, at the cost of a dense step (decode steps are cheap; a decode pattern such as
    ``query_aware_decode`` is the fast path). Returns ``[B, H, rows, Dv]``.

    Example:
        >>> from sparsify import patterns
        >>> from sparsify.runtime.sparse_attention import SparseAttention
        >>> from sparsify.site import AttentionSite
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=1, head_dim=8, q_len=64, k_len=64, causal=True)
        >>> layer = SparseAttention(site, [patterns.dense(), patterns.sliding_window(16)], block_size=16)
        >>> keys, mask = torch.randn(1, 1, 64, 8), torch.arange(64).view(1, 1, 1, 64) < 40   # 40 slots filled
        >>> pattern_rows_decode(layer, torch.randn(1, 2, 1, 8), keys, keys, mask, None).shape
        torch.Size([1, 2, 1, 8])
    """
    batch, heads, rows, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if runtime.adaptive_heads.numel():
        raise UnsupportedError(f"site {runtime.site.name!r}: decode='sparse' through a static cache cannot place the "
                               f"rows of its input-adaptive heads (the cache's length is on the device only); attach "
                               f"with decode='dense' or a decode pattern (sparsify.patterns.query_aware_decode)")
    end = visible_key_end(attention_mask, k_len)
    positions = end - rows + torch.arange(rows, device=key.device)                        # [rows]
    slots = torch.arange(k_len, device=key.device)
    visible = slots.view(1, 1, 1, k_len) <= positions.view(1, 1, rows, 1)                # causal, [1, 1, rows, S]
    user = attention_mask[..., -rows:, :]
    user = user if user.dtype == torch.bool else user > torch.finfo(user.dtype).min / 2
    visible = visible & user.reshape(-1, user.shape[-3] if user.dim() == 4 else 1, rows, k_len)
    allowed = visible.expand(batch, heads, rows, k_len).clone()
    if runtime.sparse_heads.numel():
        mask = runtime._cached_mask("sparse", key, key, 0)                  # the full-capacity grid, cached per length
        block_rows = torch.div(positions, mask.block_size, rounding_mode="floor")
        kept = (_kept_key_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, block_rows, mask.k_blocks)
                | _kept_key_blocks(mask.kv_num_blocks, mask.kv_indices, block_rows, mask.k_blocks))
        kept = kept.repeat_interleave(mask.block_size, -1)[..., :k_len]          # [1 or B, sparse heads, rows, S]
        heads_index = runtime.sparse_heads
        allowed[:, heads_index] = allowed[:, heads_index] & kept
    group = heads // kv_heads
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=allowed, scale=scale)
    if runtime.skipped_heads.numel():
        output = output.index_fill(1, runtime.skipped_heads, 0)             # a skipped head contributes nothing
    return output


def read_fraction(pattern: QueryAwareDecode, context: int) -> float:
    """Fraction of a ``context``-token cache one step reads (pages actually selected over pages present).

    Example:
        >>> from sparsify.patterns import query_aware_decode
        >>> round(read_fraction(query_aware_decode(0.05, page_size=32), 131072), 3)
        0.051
    """
    pages = math.ceil(context / pattern.page_size)
    return pattern.selected_pages(pages) / pages
