"""Bounds on every number a strategy document holds, in one place; loading checks each one.

A strategy is read from a file that anyone may have edited, so each number in it has a range,
and `Strategy.load` (through the pattern and strategy validators) refuses a value outside it
with a message naming the field, the value and the bound — before anything allocates memory
or runs a kernel. The bounds are generous for real models (16M-token contexts, 4096 heads) and
small enough that no valid strategy asks for an absurd allocation.

==========================  ==============================================================
bound                       applies to
==========================  ==============================================================
``MAX_TOKENS``              every token count or offset: ``q_len``/``k_len`` of the
                            fingerprint; pattern windows, periods, strides, widths, sink
                            and last-token counts, slash offsets (in absolute value),
                            ``multi_diagonal.count``, ``block_top_k.near_blocks``
``MIN_BLOCK_SIZE`` /        ``block_size`` (also a power of two)
``MAX_BLOCK_SIZE``
``MAX_GRID_BLOCKS``         ``q_blocks × k_blocks`` of a grid a strategy records: the
                            fingerprint lengths at ``block_size``, and the source grid
                            ``source_q_blocks × source_k_blocks`` of ``block_top_k``
``MAX_HEADS``               ``num_heads`` / ``num_kv_heads`` of a site
``MAX_HEAD_DIM``            ``head_dim`` of a site
``MAX_LINES``               positions of ``vertical_stripes``, vertical and slash lines of
                            ``vertical_slash``
``MAX_EXPONENT``            ``power_of_two.max_exponent`` (``2 ** MAX_EXPONENT`` tokens)
``MAX_PARTS``               parts of one ``union`` / ``intersection``
``MAX_PATTERN_DEPTH``       nesting of unions and intersections
``MAX_STEPS``               ``dense_steps`` of a site, ``steps_per_generation``
``MAX_JSON_DEPTH``          nesting of free JSON (``metadata``, ``head_metrics``)
==========================  ==============================================================

Measured numbers the reports read are checked too: in ``head_metrics``, ``recall`` and
``work`` lie in [0, 1], ``error``, ``estimated_seconds`` and ``dense_seconds`` are finite and
>= 0; in ``metadata``, ``end_to_end_error`` and the ``site_errors`` are finite and >= 0 and
``estimated_attention_speedup`` is finite and > 0. Every other JSON number must be finite.

Example:
    >>> from sparsify import patterns
    >>> patterns.sliding_window(10**30)                        # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparsify.errors.PatternError: sliding_window: window must be an int in [1, 16777216] (MAX_TOKENS ...
"""

from __future__ import annotations

MAX_TOKENS = 2**24
"""Largest token count or offset a pattern or fingerprint may hold (16,777,216 tokens)."""

MIN_BLOCK_SIZE = 16
"""Smallest block edge in tokens."""

MAX_BLOCK_SIZE = 4096
"""Largest block edge in tokens."""

MAX_GRID_BLOCKS = 2**24
"""Largest ``q_blocks × k_blocks`` of a recorded grid (4096 × 4096 blocks: 512K tokens at block 128)."""

MAX_HEADS = 4096
"""Largest number of query (or key/value) heads of one site."""

MAX_HEAD_DIM = 4096
"""Largest head size."""

MAX_LINES = 4096
"""Most vertical or slash lines in one pattern."""

MAX_EXPONENT = 24
"""Largest ``power_of_two.max_exponent``: distances up to ``2 ** 24`` tokens."""

MAX_PARTS = 64
"""Most parts of one union or intersection."""

MAX_PATTERN_DEPTH = 8
"""Deepest nesting of unions and intersections."""

MAX_STEPS = 10**6
"""Largest ``dense_steps`` / ``steps_per_generation``."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of free JSON values (``metadata``, ``head_metrics``)."""

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_EXPONENT",
    "MAX_GRID_BLOCKS",
    "MAX_HEADS",
    "MAX_HEAD_DIM",
    "MAX_JSON_DEPTH",
    "MAX_LINES",
    "MAX_PARTS",
    "MAX_PATTERN_DEPTH",
    "MAX_STEPS",
    "MAX_TOKENS",
    "MIN_BLOCK_SIZE",
    "int_range_problem",
    "shown",
]


def int_range_problem(value: object, low: int, high: int, bound: str) -> str | None:
    """``None`` when ``value`` is an int (not a bool) in ``[low, high]``, else what it must be.

    ``bound`` names the constant of this module that sets ``high``, so the message says where
    the limit is written down.

    Example:
        >>> int_range_problem(7, 1, MAX_TOKENS, "MAX_TOKENS") is None
        True
        >>> int_range_problem(2**40, 1, MAX_TOKENS, "MAX_TOKENS")
        'must be an int in [1, 16777216] (MAX_TOKENS in sparsify.limits), got 1099511627776'
    """
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return None
    return f"must be an int in [{low}, {high}] ({bound} in sparsify.limits), got {shown(value)}"


def shown(value: object) -> str:
    """``repr(value)``, shortened for huge ints and long texts (messages stay readable).

    Example:
        >>> shown(10**200)
        'an int of 665 bits'
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
