"""Tests of sparsify.patterns: block masks against token-level definitions, JSON, errors."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.attention.flex_attention as flex_attention
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import PatternError
from sparsify.patterns import (
    AShape,
    AttentionSinks,
    BlockGrid,
    BlockTopK,
    Dense,
    DistancePattern,
    Intersection,
    LastTokens,
    MultiDiagonal,
    Pattern,
    PowerOfTwo,
    Radial,
    Skip,
    SlidingWindow,
    Strided,
    Union,
    VerticalSlash,
    VerticalStripes,
    a_shape,
    attention_sinks,
    block_top_k,
    causal_block_mask,
    dense,
    known_patterns,
    last_tokens,
    multi_diagonal,
    pattern_from_dict,
    power_of_two,
    radial,
    register_pattern,
    skip,
    sliding_window,
    strided,
    vertical_slash,
    vertical_stripes,
)

# --- an independent, token-level reference ----------------------------------------------------


def element_mask(pattern: Pattern, q_len: int, k_len: int) -> torch.Tensor:
    """``bool [q_len, k_len]``: the token pairs a leaf pattern keeps, from its definition."""
    query = torch.arange(q_len).unsqueeze(1)
    key = torch.arange(k_len).unsqueeze(0)
    if isinstance(pattern, Dense):
        return torch.ones(q_len, k_len, dtype=torch.bool)
    if isinstance(pattern, SlidingWindow):
        return (query - key).abs() <= pattern.window
    if isinstance(pattern, AttentionSinks):
        return (key < pattern.num_tokens).expand(q_len, k_len)
    distance = query - key
    if isinstance(pattern, Skip):
        return torch.zeros(q_len, k_len, dtype=torch.bool)
    if isinstance(pattern, LastTokens):
        return (key >= k_len - pattern.num_tokens).expand(q_len, k_len)
    if isinstance(pattern, AShape):
        return (key < pattern.sink_tokens) | (distance.abs() <= pattern.window)
    if isinstance(pattern, VerticalStripes):
        return columns_mask(pattern.positions, pattern.width, q_len, k_len)
    if isinstance(pattern, VerticalSlash):
        mask = columns_mask(pattern.vertical, pattern.width, q_len, k_len)
        for offset in pattern.slash:
            mask = mask | ((distance >= offset) & (distance < offset + pattern.width))
        return mask
    if isinstance(pattern, DistancePattern):
        kept = [keeps_distance(pattern, d) for d in range(-k_len, q_len + 1)]
        return torch.tensor(kept)[distance + k_len]
    raise AssertionError(f"no token-level definition for {pattern}")


def keeps_distance(pattern: DistancePattern, d: int) -> bool:
    """Whether a distance pattern keeps ``d = i - j``, straight from its definition."""
    if isinstance(pattern, MultiDiagonal):
        period, width, count = pattern.period, pattern.width, pattern.count
        # Every m with |d - m * period| <= width lies in [d - width, d + width] / period.
        candidates = range((d - width) // period, (d + width) // period + 1)
        return any(
            abs(d - m * period) <= width and (count is None or abs(m) <= count) for m in candidates
        )
    if isinstance(pattern, Strided):
        return d % pattern.stride < pattern.width
    if isinstance(pattern, Radial):
        a = abs(d)
        if a <= pattern.window:
            return True
        exponent = 0  # largest e >= 0 with decay * 2**e <= a
        while pattern.decay_tokens * 2 ** (exponent + 1) <= a:
            exponent += 1
        return a % 2**exponent == 0
    if isinstance(pattern, PowerOfTwo):
        top = pattern.max_exponent if pattern.max_exponent is not None else 12  # 2**12 > 600
        lines = [0] + [sign * 2**k for k in range(top + 1) for sign in (1, -1)]
        return any(abs(d - line) <= pattern.width for line in lines)
    raise AssertionError(f"no distance definition for {pattern}")


def columns_mask(positions, width: int, q_len: int, k_len: int) -> torch.Tensor:
    key = torch.arange(k_len)
    mask = torch.zeros(k_len, dtype=torch.bool)
    for position in positions:
        start = math.floor(position * k_len)
        mask |= (key >= start) & (key < start + width)
    return mask.expand(q_len, k_len)


def overlapping_sources(target: int, index: int, source: int) -> list[int]:
    """Source indices whose ``[s, s + 1) / source`` meets ``[index, index + 1) / target``."""
    return [
        s for s in range(source)
        if Fraction(s, source) < Fraction(index + 1, target)
        and Fraction(s + 1, source) > Fraction(index, target)
    ]


def block_top_k_reference(pattern: BlockTopK, q_blocks: int, k_blocks: int) -> torch.Tensor:
    """`BlockTopK` moved to another grid, block by block, from its documented definition."""
    sq, sk, near = pattern.source_q_blocks, pattern.source_k_blocks, pattern.near_blocks
    source = [[column in row for column in range(sk)] for row in pattern.table]
    mask = torch.zeros(q_blocks, k_blocks, dtype=torch.bool)
    for i in range(q_blocks):
        rows = overlapping_sources(q_blocks, i, sq)
        for j in range(k_blocks):
            if pattern.relative_to == "start":
                cells = [(r, c) for r in rows for c in overlapping_sources(k_blocks, j, sk)]
            elif abs(i - j) <= near:
                cells = [(r, r - (i - j)) for r in rows]
            elif j < i - near:  # far left: [0, i - near) onto [0, r - near)
                cells = [
                    (r, c) for r in rows if r - near > 0
                    for c in overlapping_sources(i - near, j, r - near)
                ]
            else:  # far right: (i + near, k_blocks) onto (r + near, sk)
                target_far = k_blocks - i - near - 1
                cells = [
                    (r, r + near + 1 + c) for r in rows if sk - r - near - 1 > 0
                    for c in overlapping_sources(target_far, j - i - near - 1, sk - r - near - 1)
                ]
            mask[i, j] = any(source[r][c] for r, c in cells if 0 <= c < sk)
    return mask


def pool_to_blocks(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """A block is kept when any token pair inside it is (padding tokens count as not kept)."""
    q_len, k_len = mask.shape
    q_blocks, k_blocks = -(-q_len // block_size), -(-k_len // block_size)
    padded = torch.zeros(q_blocks * block_size, k_blocks * block_size, dtype=torch.bool)
    padded[:q_len, :k_len] = mask
    return padded.view(q_blocks, block_size, k_blocks, block_size).any(dim=3).any(dim=1)


def reference_raw(pattern: Pattern, q_len: int, k_len: int, block_size: int, causal: bool):
    """Kept blocks before the empty-row fallback.

    Leaves and unions are pooled token masks (union = token-wise or, which pools exactly);
    intersections are taken on the parts' block masks, as documented.
    """
    if isinstance(pattern, Union):
        masks = [reference_raw(p, q_len, k_len, block_size, causal) for p in pattern.parts]
        return torch.stack(masks).any(dim=0)
    if isinstance(pattern, Intersection):
        masks = [reference_raw(p, q_len, k_len, block_size, causal) for p in pattern.parts]
        return torch.stack(masks).all(dim=0)
    if isinstance(pattern, BlockTopK):  # defined on blocks, not tokens
        mask = block_top_k_reference(pattern, blocks(q_len, block_size), blocks(k_len, block_size))
        return mask & causal_block_mask(*mask.shape) if causal else mask
    mask = element_mask(pattern, q_len, k_len)
    if causal:
        mask = mask & torch.ones(q_len, k_len, dtype=torch.bool).tril()
    return pool_to_blocks(mask, block_size)


def with_fallback(mask: torch.Tensor) -> torch.Tensor:
    """Give every empty query row key block ``min(i, k_blocks - 1)``, row by row."""
    mask = mask.clone()
    k_blocks = mask.shape[1]
    for row in range(mask.shape[0]):
        if not mask[row].any():
            mask[row, min(row, k_blocks - 1)] = True
    return mask


def reference_block_mask(pattern, q_len, k_len, block_size, causal):
    return with_fallback(reference_raw(pattern, q_len, k_len, block_size, causal))


def blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


# --- hypothesis strategies ----------------------------------------------------------------------

relative_positions = st.lists(
    st.floats(0, 1, exclude_max=True, allow_subnormal=False), min_size=1, max_size=4
)


@st.composite
def block_top_k_patterns(draw):
    source_q, source_k = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    table = [
        draw(st.lists(st.integers(0, source_k - 1), max_size=source_k)) for _ in range(source_q)
    ]
    relative_to = draw(st.sampled_from(["start", "diagonal"]))
    return block_top_k(table, source_q, source_k, relative_to, draw(st.integers(0, 4)))


@st.composite
def vertical_slash_patterns(draw):
    vertical = draw(st.lists(st.floats(0, 1, exclude_max=True, allow_subnormal=False), max_size=3))
    slash = draw(st.lists(st.integers(-100, 300), min_size=0 if vertical else 1, max_size=3))
    return vertical_slash(vertical, slash, draw(st.integers(1, 40)))


@st.composite
def strided_patterns(draw):
    stride = draw(st.integers(1, 100))
    return strided(stride, draw(st.integers(1, stride)))


leaf_patterns = st.one_of(
    st.just(dense()),
    st.integers(1, 400).map(sliding_window),
    st.integers(1, 400).map(attention_sinks),
    st.integers(1, 400).map(last_tokens),
    st.builds(a_shape, st.integers(1, 200), st.integers(1, 200)),
    st.builds(
        multi_diagonal, st.integers(1, 120), st.integers(0, 40), st.none() | st.integers(0, 4)
    ),
    strided_patterns(),
    st.builds(radial, st.integers(1, 64), st.integers(1, 64)),
    st.builds(power_of_two, st.none() | st.integers(0, 10), st.integers(0, 6)),
    st.builds(vertical_stripes, relative_positions, st.integers(1, 40)),
    vertical_slash_patterns(),
    block_top_k_patterns(),
)
all_leaf_patterns = st.one_of(st.just(skip()), leaf_patterns)
composite_patterns = st.recursive(
    leaf_patterns,
    lambda children: st.one_of(
        st.lists(children, min_size=2, max_size=3).map(lambda parts: Union(tuple(parts))),
        st.lists(children, min_size=2, max_size=3).map(lambda parts: Intersection(tuple(parts))),
    ),
    max_leaves=5,
)
lengths = st.integers(1, 300)
block_sizes = st.sampled_from([8, 16, 32, 64])


# --- block masks --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(all_leaf_patterns, lengths, lengths, block_sizes, st.booleans())
def test_leaf_block_mask_is_pooled_token_mask(pattern, q_len, k_len, block_size, causal):
    got = pattern.block_mask(
        blocks(q_len, block_size), blocks(k_len, block_size),
        block_size=block_size, causal=causal, q_len=q_len, k_len=k_len,
    )
    assert torch.equal(got, reference_block_mask(pattern, q_len, k_len, block_size, causal))


@settings(max_examples=200, deadline=None)
@given(composite_patterns, lengths, lengths, block_sizes, st.booleans())
def test_composite_block_mask_matches_reference(pattern, q_len, k_len, block_size, causal):
    got = pattern.block_mask(
        blocks(q_len, block_size), blocks(k_len, block_size),
        block_size=block_size, causal=causal, q_len=q_len, k_len=k_len,
    )
    assert torch.equal(got, reference_block_mask(pattern, q_len, k_len, block_size, causal))


@settings(max_examples=100, deadline=None)
@given(composite_patterns, st.integers(1, 12), st.integers(1, 12), block_sizes, st.booleans())
def test_without_lengths_the_last_blocks_are_full(pattern, q_blocks, k_blocks, block_size, causal):
    got = pattern.block_mask(q_blocks, k_blocks, block_size=block_size, causal=causal)
    expected = reference_block_mask(
        pattern, q_blocks * block_size, k_blocks * block_size, block_size, causal
    )
    assert torch.equal(got, expected)


@settings(max_examples=200, deadline=None)
@given(composite_patterns, st.integers(1, 40), st.integers(1, 40), block_sizes, st.booleans())
def test_rows_are_never_empty_and_causal_blocks_stay_below_diagonal(
    pattern, q_blocks, k_blocks, block_size, causal
):
    mask = pattern.block_mask(q_blocks, k_blocks, block_size=block_size, causal=causal)
    assert mask.dtype == torch.bool and mask.device.type == "cpu"
    assert tuple(mask.shape) == (q_blocks, k_blocks)
    assert bool(mask.any(dim=1).all())
    if causal:
        assert not bool((mask & ~causal_block_mask(q_blocks, k_blocks)).any())


def test_union_and_intersection_equal_or_and_of_parts():
    window, sinks = sliding_window(100), attention_sinks(40)
    for causal in (False, True):
        a = window.block_mask(10, 12, block_size=32, causal=causal)
        b = sinks.block_mask(10, 12, block_size=32, causal=causal)
        assert torch.equal((window | sinks).block_mask(10, 12, block_size=32, causal=causal), a | b)
        assert torch.equal(
            (window & sinks).block_mask(10, 12, block_size=32, causal=causal), with_fallback(a & b)
        )


def test_intersection_is_taken_on_blocks_and_empty_rows_fall_back_to_the_diagonal():
    mask = (sliding_window(1) & attention_sinks(1)).block_mask(4, 4, block_size=16)
    # Block (1, 0) is kept by both parts (token pairs (16, 15) and (16, 0)), though no single
    # token pair is; rows 2 and 3 keep nothing in common and fall back to the diagonal.
    assert mask.int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_fallback_block_when_queries_outrun_keys():
    # Query blocks past the last key block fall back to the last key block.
    mask = sliding_window(8).block_mask(4, 2, block_size=16, causal=False)
    assert mask.int().tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]


def test_partial_last_block_is_exact():
    # The last query block holds one token (64); keys 128..191 are 64 tokens away.
    exact = sliding_window(10).block_mask(2, 3, block_size=64, q_len=65, k_len=192)
    full = sliding_window(10).block_mask(2, 3, block_size=64)
    assert exact.int().tolist() == [[1, 1, 0], [1, 1, 0]]
    assert full.int().tolist() == [[1, 1, 0], [1, 1, 1]]


def test_causal_block_mask_is_lower_triangle_top_left_aligned():
    assert causal_block_mask(2, 3).int().tolist() == [[1, 0, 0], [1, 1, 0]]
    assert torch.equal(dense().block_mask(5, 3, causal=True), causal_block_mask(5, 3))


@pytest.mark.parametrize("q_len, k_len, q_offset", [(64, 64, 0), (40, 100, 60), (33, 70, 5), (100, 40, 0), (16, 64, 48)])
def test_causal_block_mask_is_the_runtime_classification_at_any_offset(q_len, k_len, q_offset):
    block = 16
    q_blocks, k_blocks = blocks(q_len, block), blocks(k_len, block)
    got = causal_block_mask(q_blocks, k_blocks, block_size=block, q_len=q_len, k_len=k_len, q_offset=q_offset)
    # A block is visible when it holds a pair with key <= q_offset + query.
    query = torch.arange(q_len).unsqueeze(1) + q_offset
    pairs = torch.arange(k_len).unsqueeze(0) <= query
    assert torch.equal(got, pool_to_blocks(pairs, block))
    with pytest.raises(PatternError, match="make"):
        causal_block_mask(q_blocks + 1, k_blocks, block_size=block, q_len=q_len, k_len=k_len)


def test_is_dense_is_a_property_not_a_name():
    assert dense().is_dense and not skip().is_dense and not sliding_window(64).is_dense
    assert (dense() | attention_sinks(4)).is_dense and not (dense() & attention_sinks(4)).is_dense
    assert (dense() & dense()).is_dense
    assert not pattern_from_dict({"pattern": "pooled_coverage", "coverage": 0.9, "min_blocks": 1, "max_fraction": 1.0,
                                  "sink_blocks": 0, "scoring": "mean", "stride": 8, "temperature": 1.0}).is_dense
    # Whatever is_dense claims, the pattern keeps every visible block.
    for pattern in (dense(), dense() | strided(4), sliding_window(16)):
        kept = pattern.block_mask(5, 7, block_size=16, causal=True)
        assert pattern.is_dense == torch.equal(kept, causal_block_mask(5, 7, block_size=16))


def test_old_import_path_warns_and_still_works():
    import importlib
    import sys

    from sparsify.patterns import adaptive

    sys.modules.pop("sparsify.adaptive_patterns", None)
    with pytest.warns(DeprecationWarning, match="sparsify.patterns"):
        old = importlib.import_module("sparsify.adaptive_patterns")

    assert old.PooledCoverage is adaptive.PooledCoverage and old.pooled_coverage(0.9) == adaptive.pooled_coverage(0.9)


def test_density():
    assert dense().density(8, 8) == 1.0
    assert dense().density(8, 8, causal=True) == 1.0
    assert attention_sinks(64).density(4, 4, block_size=64) == 0.25
    # Causal: one kept block per row over 1 + 2 + 3 + 4 computed blocks.
    assert attention_sinks(64).density(4, 4, block_size=64, causal=True) == 4 / 10
    mask = sliding_window(100).block_mask(7, 9, block_size=32, causal=True)
    expected = int(mask.sum()) / int(causal_block_mask(7, 9).sum())
    assert sliding_window(100).density(7, 9, block_size=32, causal=True) == expected


def test_inconsistent_lengths_are_rejected():
    with pytest.raises(PatternError, match="q_len=200 needs 4 blocks"):
        dense().block_mask(3, 3, block_size=64, q_len=200)
    with pytest.raises(PatternError, match="k_blocks must be a positive int"):
        dense().block_mask(3, 0)
    with pytest.raises(PatternError, match="block_size must be a positive int"):
        BlockGrid(1, 1, block_size=0)


# --- JSON and display -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(composite_patterns)
def test_json_round_trip(pattern):
    data = json.loads(json.dumps(pattern.to_dict()))
    rebuilt = pattern_from_dict(data)
    assert rebuilt == pattern
    assert hash(rebuilt) == hash(pattern)
    assert str(rebuilt) == str(pattern)


def test_to_dict_is_plain_json():
    pattern = sliding_window(512) | attention_sinks(4)
    assert pattern.to_dict() == {
        "pattern": "union",
        "parts": [
            {"pattern": "sliding_window", "window": 512},
            {"pattern": "attention_sinks", "num_tokens": 4},
        ],
    }
    assert dense().to_dict() == {"pattern": "dense"}


def test_str_and_repr_are_short():
    pattern = sliding_window(512) | attention_sinks(4)
    assert str(pattern) == repr(pattern) == "sliding_window(512) | attention_sinks(4)"
    assert repr(dense()) == "dense()"
    assert str((sliding_window(8) | attention_sinks(4)) & dense()) == (
        "(sliding_window(8) | attention_sinks(4)) & dense()"
    )


def test_operators_flatten_same_kind():
    a, b, c = sliding_window(1), sliding_window(2), attention_sinks(3)
    assert (a | b | c).parts == (a, b, c)
    assert (a & b & c).parts == (a, b, c)
    assert ((a | b) & c).parts == (Union((a, b)), c)
    assert (a | b) == Union((a, b))
    assert (a | b) != (b | a)  # order is kept (and shows in the JSON)


def test_registry_lists_the_families():
    assert {"dense", "sliding_window", "attention_sinks", "union", "intersection"} <= set(
        known_patterns()
    )
    assert known_patterns() == sorted(known_patterns())


def test_registering_a_taken_name_fails():
    with pytest.raises(PatternError, match="'dense' is already registered"):
        register_pattern("dense")(SlidingWindow)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: sliding_window(0), r"sliding_window: window must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: sliding_window(-3), r"sliding_window: window must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got -3"),
        (lambda: sliding_window(1.5), r"window must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 1.5"),
        (lambda: sliding_window(True), r"window must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got True"),
        (lambda: sliding_window("8"), r"window must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got '8'"),
        (lambda: attention_sinks(0), r"attention_sinks: num_tokens must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: Union((dense(),)), "union: parts must hold at least two patterns"),
        (lambda: Intersection((dense(), 3)), r"intersection: parts\[1\] must be a Pattern"),
    ],
)
def test_bad_parameters(make, expected):
    with pytest.raises(PatternError, match=expected):
        make()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"pattern": "slidng_window", "window": 8},
            "unknown pattern 'slidng_window' (did you mean 'sliding_window'?); known: "
            "a_shape, attention_sinks, block_top_k, dense, estimated_vertical_slash, intersection, "
            "last_tokens, multi_diagonal, pooled_coverage, power_of_two, query_aware_decode, radial, skip, "
            "sliding_window, strided, union, vertical_slash, vertical_stripes",
        ),
        ({"pattern": 3}, "unknown pattern 3; known: a_shape, attention_sinks"),
        ({"window": 8}, "no 'pattern' key; known patterns: a_shape, attention_sinks"),
        ([1, 2], "a pattern must be a JSON object"),
        (
            {"pattern": "sliding_window", "windw": 8},
            "pattern 'sliding_window': unknown parameter(s) 'windw'; missing parameter(s) "
            "'window'; expected: window",
        ),
        (
            {"pattern": "dense", "window": 8},
            "pattern 'dense': unknown parameter(s) 'window'; expected: (no parameters)",
        ),
        ({"pattern": "attention_sinks", "num_tokens": -1}, "num_tokens must be an int in [1, 16777216] (MAX_TOKENS in sparsify.limits), got -1"),
        ({"pattern": "union", "parts": {"pattern": "dense"}}, "parts must be a list of patterns"),
        (
            {"pattern": "union", "parts": [{"pattern": "dense"}, {"pattern": "skp"}]},
            "union.parts[1]: unknown pattern 'skp'",
        ),
        (
            {
                "pattern": "intersection",
                "parts": [
                    {"pattern": "dense"},
                    {"pattern": "union", "parts": [{"pattern": "dense"}, {"pattern": "x"}]},
                ],
            },
            "intersection.parts[1].parts[1]: unknown pattern 'x'",
        ),
    ],
)
def test_bad_dicts(data, expected):
    with pytest.raises(PatternError) as caught:
        pattern_from_dict(data)
    assert expected in str(caught.value)


def test_pattern_error_is_a_value_error():
    with pytest.raises(ValueError):
        sliding_window(0)


# --- the extended families ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.builds(
            multi_diagonal, st.integers(1, 50), st.integers(0, 20), st.none() | st.integers(0, 3)
        ),
        strided_patterns(),
        st.builds(radial, st.integers(1, 40), st.integers(1, 40)),
        st.builds(power_of_two, st.none() | st.integers(0, 8), st.integers(0, 4)),
    ),
    st.integers(-300, 300),
    st.integers(0, 80),
)
def test_keeps_distance_range_is_any_kept_distance(pattern, lo, span):
    hi = lo + span
    got = pattern.keeps_distance_range(torch.tensor([lo]), torch.tensor([hi]))
    assert got.tolist() == [any(keeps_distance(pattern, d) for d in range(lo, hi + 1))]


def test_skip_is_marked_and_keeps_only_the_fallback():
    assert skip().is_skip and not dense().is_skip and not sliding_window(8).is_skip
    nothing = torch.zeros(3, 5, dtype=torch.bool)
    assert torch.equal(skip().block_mask(3, 5, block_size=16), with_fallback(nothing))
    assert skip().block_mask(3, 3, causal=True).int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert skip().density(4, 4) == 0.0 and skip().density(4, 4, causal=True) == 0.0
    assert skip().to_dict() == {"pattern": "skip"}
    assert pattern_from_dict({"pattern": "skip"}) == skip()
    assert str(skip()) == "skip()"


def test_skip_does_not_combine():
    with pytest.raises(PatternError, match=r"union: parts\[1\] is skip\(\)"):
        sliding_window(8) | skip()
    with pytest.raises(PatternError, match=r"intersection: parts\[0\] is skip\(\)"):
        skip() & dense()
    with pytest.raises(PatternError, match=r"union: parts\[0\] is skip\(\)"):
        pattern_from_dict(
            {"pattern": "union", "parts": [{"pattern": "skip"}, {"pattern": "dense"}]}
        )


@pytest.mark.parametrize("causal", [False, True])
def test_a_shape_is_sinks_or_window(causal):
    for q_len, k_len, block_size in [(100, 100, 16), (37, 300, 32), (300, 50, 8)]:
        shape = dict(block_size=block_size, causal=causal, q_len=q_len, k_len=k_len)
        q_blocks, k_blocks = blocks(q_len, block_size), blocks(k_len, block_size)
        assert torch.equal(
            a_shape(5, 20).block_mask(q_blocks, k_blocks, **shape),
            (attention_sinks(5) | sliding_window(20)).block_mask(q_blocks, k_blocks, **shape),
        )


def test_columns_count_only_up_to_the_query_at_causal_sites():
    # Query block 1 holds tokens 8..9 only; the stripe at key 12 lies in key block 1 but past
    # every query of the block, so at causal sites block (1, 1) keeps nothing.
    shape = dict(block_size=8, causal=True, q_len=10, k_len=16)
    for pattern in (
        vertical_stripes([0.0, 0.75]),
        vertical_slash([0.0, 0.75]),
        attention_sinks(1) | last_tokens(4),
    ):
        assert pattern.block_mask(2, 2, **shape).int().tolist() == [[1, 0], [1, 0]]
        no_causal = dict(shape, causal=False)
        assert pattern.block_mask(2, 2, **no_causal).int().tolist() == [[1, 1], [1, 1]]


def test_relative_columns_follow_the_length():
    stripes = vertical_stripes([0.5], width=16)
    assert stripes.block_mask(1, 4, block_size=16).int().tolist() == [[0, 0, 1, 0]]
    assert stripes.block_mask(1, 8, block_size=16).int().tolist() == [[0, 0, 0, 0, 1, 0, 0, 0]]
    ends = last_tokens(16)
    assert ends.block_mask(1, 4, block_size=16).int().tolist() == [[0, 0, 0, 1]]
    assert ends.block_mask(1, 4, block_size=16, k_len=50).int().tolist() == [[0, 0, 1, 1]]


def test_multi_diagonal_bands_repeat_every_period():
    # Period of two blocks: the diagonal band and every second block diagonal from it.
    mask = multi_diagonal(32, width=0).block_mask(6, 6, block_size=16)
    offsets = torch.arange(6).unsqueeze(1) - torch.arange(6)
    assert torch.equal(mask, offsets % 2 == 0)
    limited = multi_diagonal(32, width=0, count=1).block_mask(6, 6, block_size=16)
    assert torch.equal(limited, (offsets % 2 == 0) & (offsets.abs() <= 2))


def test_radial_gets_sparser_with_distance():
    # Blocks thin out once the stride 2**e outgrows the block (beyond 2 * 8 * 16 tokens here).
    densities = [radial(8).density(n, n, block_size=16, causal=True) for n in (4, 32, 128, 256)]
    assert densities[0] == 1.0 and densities[0] > densities[1] > densities[2] > densities[3]
    # At token level the kept keys of query 0 thin out octave by octave.
    kept = radial(4, decay_tokens=2).block_mask(1, 40, block_size=1)[0].nonzero().flatten().tolist()
    assert kept == [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32]


def test_power_of_two_lines():
    kept = power_of_two(4, width=1).block_mask(1, 40, block_size=1)[0].nonzero().flatten().tolist()
    assert kept == [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17]
    distance = torch.arange(-40, 41)
    kept = distance[power_of_two().keeps_distance_range(distance, distance)].tolist()
    assert kept == [-32, -16, -8, -4, -2, -1, 0, 1, 2, 4, 8, 16, 32]


def test_strided_keeps_every_stride():
    kept = strided(8, width=2).block_mask(1, 30, block_size=1, q_len=1)[0]
    assert kept.nonzero().flatten().tolist() == [0, 7, 8, 15, 16, 23, 24]
    assert strided(8, width=8).density(10, 10, block_size=4) == 1.0


def test_block_top_k_is_its_table_on_the_source_grid():
    table = [[0, 3], [1], [], [2, 3]]
    for relative_to in ("start", "diagonal"):
        pattern = block_top_k(table, 4, 4, relative_to)
        raw = torch.zeros(4, 4, dtype=torch.bool)
        for row, columns in enumerate(table):
            raw[row, columns] = True
        assert torch.equal(pattern.block_mask(4, 4, block_size=32), with_fallback(raw))


def test_block_top_k_scales_by_relative_position():
    pattern = block_top_k([[0], [1]], 2, 2)
    assert pattern.block_mask(4, 4).int().tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1],
    ]
    # Shrinking keeps a block wherever any source block it covers was kept.
    shrunk = block_top_k([[0], [0], [3], [3]], 4, 4).block_mask(2, 2)
    assert shrunk.int().tolist() == [[1, 0], [0, 1]]


def test_block_top_k_relative_to_diagonal_keeps_near_offsets():
    # A local band (the diagonal and the block before it) plus the first block column.
    table = [[0]] + [[0, row - 1, row] for row in range(1, 8)]
    pattern = block_top_k(table, 8, 8, relative_to="diagonal", near_blocks=2)
    mask = pattern.block_mask(32, 32, causal=True)
    offsets = torch.arange(32).unsqueeze(1) - torch.arange(32)
    # From source row 3 on (target rows 12+), the sink column is far from the diagonal: the
    # band stays two blocks wide at 4x the length ("start" would widen it to 4-5 blocks) and
    # the first column stays kept. (Nearer the start the sink lies within near_blocks of the
    # diagonal and moves with it.)
    assert torch.equal((mask & (offsets.abs() <= 2))[12:], ((offsets >= 0) & (offsets <= 1))[12:])
    assert bool(mask[12:, 0].all())
    start = block_top_k(table, 8, 8, relative_to="start").block_mask(32, 32, causal=True)
    assert int(start.sum()) > int(mask.sum())
    near_diagonal = offsets.abs() <= 2
    assert int((start & near_diagonal)[12:].sum()) > int((mask & near_diagonal)[12:].sum())


def test_block_top_k_from_block_scores():
    scores = torch.tensor([[5.0, 1.0, 3.0], [0.0, 2.0, 2.0], [1.0, 9.0, 8.0]])
    assert BlockTopK.from_block_scores(scores, k=2).table == ((0, 2), (1, 2), (1, 2))
    assert block_top_k.from_block_scores(scores, k=1).table == ((0,), (1,), (1,))
    causal = BlockTopK.from_block_scores(scores, k=2, causal=True)
    assert causal.table == ((0,), (0, 1), (1, 2))
    assert BlockTopK.from_block_scores(scores, density=0.5).table == ((0, 2), (1, 2), (1, 2))
    assert BlockTopK.from_block_scores(scores, density=0.01).table == ((0,), (1,), (1,))
    made = BlockTopK.from_block_scores(scores, k=1, relative_to="diagonal", near_blocks=1)
    assert (made.source_q_blocks, made.source_k_blocks, made.relative_to, made.near_blocks) == (
        3, 3, "diagonal", 1,
    )
    assert made.to_dict() == {
        "pattern": "block_top_k", "table": [[0], [1], [1]], "source_q_blocks": 3,
        "source_k_blocks": 3, "relative_to": "diagonal", "near_blocks": 1,
    }


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(scores=torch.zeros(3), k=1), r"block_top_k: scores must be a \[q_blocks, k_blocks\]"),
        (dict(scores=torch.zeros(2, 2)), "block_top_k: give exactly one of k and density"),
        (dict(scores=torch.zeros(2, 2), k=1, density=0.5), "give exactly one of k and density"),
        (dict(scores=torch.zeros(2, 2), k=0), "block_top_k: k must be a positive int"),
        (dict(scores=torch.zeros(2, 2), density=1.5), r"density must lie in \(0, 1\]"),
        (dict(scores=torch.tensor([[1.0, float("nan")]]), k=1), "scores must be finite"),
    ],
)
def test_block_top_k_from_bad_scores(kwargs, expected):
    with pytest.raises(PatternError, match=expected):
        BlockTopK.from_block_scores(kwargs.pop("scores"), **kwargs)


@settings(max_examples=100, deadline=None)
@given(leaf_patterns, st.integers(1, 20), st.integers(1, 20), st.booleans())
def test_density_is_kept_blocks_over_computed_blocks(pattern, q_blocks, k_blocks, causal):
    mask = pattern.block_mask(q_blocks, k_blocks, block_size=16, causal=causal)
    total = int(causal_block_mask(q_blocks, k_blocks).sum()) if causal else q_blocks * k_blocks
    density = pattern.density(q_blocks, k_blocks, block_size=16, causal=causal)
    assert density == int(mask.sum()) / total and 0 < density <= 1


@pytest.mark.parametrize(
    ("pattern", "text", "data"),
    [
        (skip(), "skip()", {"pattern": "skip"}),
        (last_tokens(8), "last_tokens(8)", {"pattern": "last_tokens", "num_tokens": 8}),
        (
            a_shape(4, 512),
            "a_shape(4, 512)",
            {"pattern": "a_shape", "sink_tokens": 4, "window": 512},
        ),
        (
            multi_diagonal(1560, width=64),
            "multi_diagonal(1560, width=64)",
            {"pattern": "multi_diagonal", "period": 1560, "width": 64, "count": None},
        ),
        (
            multi_diagonal(100, count=2),
            "multi_diagonal(100, count=2)",
            {"pattern": "multi_diagonal", "period": 100, "width": 0, "count": 2},
        ),
        (strided(64), "strided(64)", {"pattern": "strided", "stride": 64, "width": 1}),
        (
            radial(128),
            "radial(128, decay_tokens=128)",
            {"pattern": "radial", "window": 128, "decay_tokens": 128},
        ),
        (
            power_of_two(),
            "power_of_two()",
            {"pattern": "power_of_two", "max_exponent": None, "width": 0},
        ),
        (
            vertical_stripes([0.5, 0.0, 0.5]),
            "vertical_stripes([0.0, 0.5])",
            {"pattern": "vertical_stripes", "positions": [0.0, 0.5], "width": 1},
        ),
        (
            vertical_slash(slash=[64, 0], width=8),
            "vertical_slash([], [0, 64], width=8)",
            {"pattern": "vertical_slash", "vertical": [], "slash": [0, 64], "width": 8},
        ),
        (
            block_top_k([[1, 0], [1, 1]], 2, 3, "diagonal", 2),
            "block_top_k(<2x3 table, 3 blocks>, relative_to='diagonal', near_blocks=2)",
            {
                "pattern": "block_top_k", "table": [[0, 1], [1]], "source_q_blocks": 2,
                "source_k_blocks": 3, "relative_to": "diagonal", "near_blocks": 2,
            },
        ),
    ],
)
def test_new_families_display_and_json(pattern, text, data):
    assert str(pattern) == repr(pattern) == text
    assert pattern.to_dict() == data
    assert json.loads(json.dumps(data)) == data
    assert pattern_from_dict(data) == pattern
    assert pattern.pattern_name in known_patterns()


@settings(max_examples=200, deadline=None)
@given(all_leaf_patterns)
def test_leaf_json_round_trip(pattern):
    rebuilt = pattern_from_dict(json.loads(json.dumps(pattern.to_dict())))
    assert rebuilt == pattern and hash(rebuilt) == hash(pattern) and str(rebuilt) == str(pattern)
    for block_size in (16, 64):
        expected = pattern.block_mask(5, 7, block_size=block_size)
        assert torch.equal(rebuilt.block_mask(5, 7, block_size=block_size), expected)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: last_tokens(0), r"last_tokens: num_tokens must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: a_shape(0, 8), r"a_shape: sink_tokens must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: a_shape(4, -1), r"a_shape: window must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got -1"),
        (lambda: multi_diagonal(0), r"multi_diagonal: period must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: multi_diagonal(8, width=-1), r"multi_diagonal: width must be an int in \[0, 16777216\] \(MAX_TOKENS in sparsify.limits\), got -1"),
        (lambda: multi_diagonal(8, count=1.0), r"multi_diagonal: count must be an int in \[0, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 1.0"),
        (lambda: strided(0), r"strided: stride must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: strided(8, width=0), r"strided: width must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: strided(8, width=9), "strided: width must be at most stride=8, got 9"),
        (lambda: radial(0), r"radial: window must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: radial(8, decay_tokens=0), r"radial: decay_tokens must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: power_of_two(-1), r"power_of_two: max_exponent must be an int in \[0, 24\] \(MAX_EXPONENT in sparsify.limits\), got -1"),
        (lambda: power_of_two(width=True), r"power_of_two: width must be an int in \[0, 16777216\] \(MAX_TOKENS in sparsify.limits\), got True"),
        (lambda: vertical_stripes([]), "vertical_stripes: positions must hold at least one"),
        (lambda: vertical_stripes([1.0]), r"vertical_stripes: positions must lie in \[0, 1\)"),
        (lambda: vertical_stripes([-0.1]), r"positions must lie in \[0, 1\)"),
        (lambda: vertical_stripes(["a"]), "vertical_stripes: positions must be a list of relative"),
        (lambda: vertical_stripes([0.5], width=0), r"vertical_stripes: width must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: vertical_slash(), "vertical_slash: vertical and slash are both empty"),
        (lambda: vertical_slash([0.5], [1.5]), "vertical_slash: slash must be a list of ints"),
        (lambda: vertical_slash([2.0]), r"vertical_slash: vertical must lie in \[0, 1\)"),
        (lambda: vertical_slash(slash=[0], width=0), r"vertical_slash: width must be an int in \[1, 16777216\] \(MAX_TOKENS in sparsify.limits\), got 0"),
        (lambda: block_top_k([[0]], 2, 2), "block_top_k: table has 1 rows, source_q_blocks is 2"),
        (lambda: block_top_k([[0, 2]], 1, 2), r"block_top_k: table\[0\] holds key blocks outside"),
        (lambda: block_top_k([[-1]], 1, 2), r"table\[0\] holds key blocks outside \[0, 2\)"),
        (lambda: block_top_k([["0"]], 1, 2), r"block_top_k: table\[0\] must be a list of ints"),
        (lambda: block_top_k(5, 1, 2), "block_top_k: table must be a list of lists"),
        (lambda: block_top_k([[0]], 0, 2), r"block_top_k: source_q_blocks must be an int in \[1, 16777216\] \(MAX_GRID_BLOCKS in sparsify.limits\), got 0"),
        (lambda: block_top_k([[0]], 1, 1, "end"), "relative_to must be one of start, diagonal"),
        (lambda: block_top_k([[0]], 1, 1, "diagonal", -1), r"block_top_k: near_blocks must be an int in \[0, 16777216\] \(MAX_TOKENS in sparsify.limits\), got -1"),
    ],
)
def test_bad_parameters_of_the_new_families(make, expected):
    with pytest.raises(PatternError, match=expected):
        make()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"pattern": "radial", "window": 8},
            "pattern 'radial': missing parameter(s) 'decay_tokens'",
        ),
        ({"pattern": "vertical_stripes", "positions": 0.5, "width": 1}, "positions must be a list"),
        (
            {"pattern": "block_top_k", "table": [[0], [5]], "source_q_blocks": 2,
             "source_k_blocks": 2, "relative_to": "start", "near_blocks": 0},
            "block_top_k: table[1] holds key blocks outside [0, 2): [5]",
        ),
        (
            {
                "pattern": "union",
                "parts": [{"pattern": "dense"}, {"pattern": "strided", "stride": 4, "width": 5}],
            },
            "union.parts[1]: strided: width must be at most stride=4, got 5",
        ),
    ],
)
def test_bad_dicts_of_the_new_families(data, expected):
    with pytest.raises(PatternError) as caught:
        pattern_from_dict(data)
    assert expected in str(caught.value)


# --- FlexAttention agrees ----------------------------------------------------------------------


def flex_block_mask(mask_mod, q_len: int, k_len: int, block_size: int) -> torch.Tensor:
    """Partial and full blocks of FlexAttention's mask as ``bool [q_blocks, k_blocks]``."""
    block_mask = flex_attention.create_block_mask(
        mask_mod, None, None, q_len, k_len, device="cpu", BLOCK_SIZE=block_size
    )
    q_blocks, k_blocks = blocks(q_len, block_size), blocks(k_len, block_size)
    dense_mask = torch.zeros(q_blocks, k_blocks, dtype=torch.bool)
    for counts, indices in (
        (block_mask.kv_num_blocks, block_mask.kv_indices),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        if counts is None:
            continue
        for row in range(q_blocks):
            dense_mask[row, indices[0, 0, row, : counts[0, 0, row]].long()] = True
    return dense_mask


def window_mod(window: int, causal: bool):
    def mask_mod(batch, head, query, key):
        near = (query - key).abs() <= window
        return near & (query >= key) if causal else near

    return mask_mod


def sinks_mod(num_tokens: int, causal: bool):
    def mask_mod(batch, head, query, key):
        sink = key < num_tokens
        return sink & (query >= key) if causal else sink

    return mask_mod


def causal_mod(batch, head, query, key):
    return query >= key


def with_causal(mod, causal: bool):
    def mask_mod(batch, head, query, key):
        kept = mod(batch, head, query, key)
        return kept & (query >= key) if causal else kept

    return mask_mod


def multi_diagonal_mod(period: int, width: int, count: int | None):
    # |d - m * period| <= width for m = floor((d + width) / period), the only candidate when
    # 2 * width < period.
    assert 2 * width < period

    def mask_mod(batch, head, query, key):
        shifted = query - key + width
        residue = torch.remainder(shifted, period)
        near = residue <= 2 * width
        if count is None:
            return near
        return near & ((shifted - residue).abs() <= count * period)

    return mask_mod


def a_shape_mod(sink_tokens: int, window: int):
    def mask_mod(batch, head, query, key):
        return (key < sink_tokens) | ((query - key).abs() <= window)

    return mask_mod


def strided_mod(stride: int, width: int):
    def mask_mod(batch, head, query, key):
        return torch.remainder(query - key, stride) < width

    return mask_mod


def last_tokens_mod(num_tokens: int, k_len: int):
    def mask_mod(batch, head, query, key):
        return key >= k_len - num_tokens

    return mask_mod


def slash_mod(offsets: list[int], width: int):
    def mask_mod(batch, head, query, key):
        distance = query - key
        kept = (distance >= offsets[0]) & (distance < offsets[0] + width)
        for offset in offsets[1:]:
            kept = kept | ((distance >= offset) & (distance < offset + width))
        return kept

    return mask_mod


FLEX_SIZES = [(1, 1), (16, 16), (40, 100), (100, 40), (129, 129), (200, 77)]


@pytest.mark.parametrize(("q_len", "k_len"), FLEX_SIZES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_agrees_with_flex_attention_create_block_mask(q_len, k_len, block_size, causal):
    q_blocks, k_blocks = blocks(q_len, block_size), blocks(k_len, block_size)
    cases = [
        (sliding_window(1), window_mod(1, causal)),
        (sliding_window(20), window_mod(20, causal)),
        (attention_sinks(4), sinks_mod(4, causal)),
        (attention_sinks(40), sinks_mod(40, causal)),
    ]
    cases += [
        (pattern, with_causal(mod, causal))
        for pattern, mod in [
            (multi_diagonal(24, width=3), multi_diagonal_mod(24, 3, None)),
            (multi_diagonal(50, width=0, count=1), multi_diagonal_mod(50, 0, 1)),
            (a_shape(4, 20), a_shape_mod(4, 20)),
            (a_shape(40, 1), a_shape_mod(40, 1)),
            (strided(24, width=2), strided_mod(24, 2)),
            (strided(7), strided_mod(7, 1)),
            (last_tokens(10), last_tokens_mod(10, k_len)),
            (vertical_slash(slash=[-20, 0, 33], width=5), slash_mod([-20, 0, 33], 5)),
        ]
    ]
    if causal:
        cases.append((dense(), causal_mod))
    for pattern, mask_mod in cases:
        got = pattern.block_mask(
            q_blocks, k_blocks, block_size=block_size, causal=causal, q_len=q_len, k_len=k_len
        )
        # Flex may leave a row empty; our fallback rule then applies on top of it.
        expected = with_fallback(flex_block_mask(mask_mod, q_len, k_len, block_size))
        assert torch.equal(got, expected), (pattern, q_len, k_len, block_size, causal)


@pytest.mark.parametrize("pattern", [sliding_window(40), attention_sinks(8) | strided(48, 4), dense(),
                                     vertical_slash([0.5], [0, 64], width=8)])
@pytest.mark.parametrize("causal, q_len, k_len, q_offset", [(True, 100, 100, 0), (False, 70, 130, 0),
                                                            (True, 40, 130, 90), (True, 1, 97, 96)])
def test_runtime_mask_is_the_block_mask_classified(pattern, causal, q_len, k_len, q_offset):
    from sparsify.block_mask import causal_element_mask
    from sparsify.runtime.mask_source import StaticMaskSource

    block = 16
    mask = pattern.runtime_mask(q_len, k_len, block_size=block, causal=causal, q_offset=q_offset)
    source = StaticMaskSource([pattern], block_size=block, causal=causal, kv_head_index=torch.tensor([0]))
    built = source.mask(q_len=q_len, k_len=k_len, q_offset=q_offset, device="cpu")
    assert torch.equal(mask.to_block_masks(), built.to_block_masks())
    assert torch.equal(mask.full_block_masks(), built.full_block_masks())
    if q_offset == 0:
        kept = pattern.block_mask(blocks(q_len, block), blocks(k_len, block), block_size=block, causal=causal,
                                  q_len=q_len, k_len=k_len)
        assert torch.equal(mask.to_block_masks()[0, 0], kept)
        assert mask.density() == pytest.approx(pattern.density(*kept.shape, block_size=block, causal=causal,
                                                                q_len=q_len, k_len=k_len))
    # Full blocks need no element mask: every key slot exists and is visible to every real query of
    # the block (padded query rows past q_len are never computed). Every kept block holds a visible pair.
    visible = causal_element_mask(q_len, k_len, q_offset) if causal else torch.ones(q_len, k_len, dtype=torch.bool)
    padded = torch.zeros(blocks(q_len, block) * block, blocks(k_len, block) * block, dtype=torch.bool)
    padded[:q_len, :k_len] = visible
    tiles = padded.view(blocks(q_len, block), block, blocks(k_len, block), block)
    real_rows = (torch.arange(blocks(q_len, block) * block) < q_len).view(-1, block, 1, 1)
    assert not bool((mask.full_block_masks()[0, 0] & ~(tiles | ~real_rows).all(3).all(1)).any())
    assert not bool((mask.to_block_masks()[0, 0] & ~tiles.any(3).any(1)).any())


def test_runtime_mask_refuses_skip_and_adaptive_patterns():
    with pytest.raises(PatternError, match="skip"):
        skip().runtime_mask(64, 64)
    adaptive = pattern_from_dict({"pattern": "estimated_vertical_slash", "vertical": 0.1, "slash": 0.1,
                                  "probe_blocks": 1, "sink_blocks": 0})
    with pytest.raises(PatternError, match="estimated per input"):
        (sliding_window(16) | adaptive).runtime_mask(64, 64)
