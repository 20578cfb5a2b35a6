"""The pattern base: the registry, block grids, `Pattern` and the parameter checks every family shares."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import torch

from sparsify.errors import PatternError
from sparsify.limits import MAX_LINES, MAX_TOKENS, int_range_problem, shown
from sparsify.block_mask import RuntimeBlockMask, block_geometry, block_token_bounds, pattern_block_masks

__all__ = [
    "BlockGrid",
    "DEFAULT_MAX_TRACED_LEN",
    "Pattern",
    "TracedBlockGrid",
    "causal_block_mask",
    "known_patterns",
    "register_pattern",
]

_REGISTRY: dict[str, type[Pattern]] = {}

_PatternClass = TypeVar("_PatternClass", bound="type[Pattern]")


def register_pattern(name: str) -> Callable[[_PatternClass], _PatternClass]:
    """Class decorator that files a `Pattern` subclass under ``name`` (its JSON ``"pattern"`` key).

    Registration happens once, at import time; names must be unique.

    Example:
        >>> @register_pattern("my_diagonal")                      # doctest: +SKIP
        ... @dataclasses.dataclass(frozen=True)
        ... class MyDiagonal(Pattern):
        ...     def _block_mask(self, grid):
        ...         return torch.eye(grid.q_blocks, grid.k_blocks, dtype=torch.bool)
    """

    def decorate(cls: _PatternClass) -> _PatternClass:
        if name in _REGISTRY:
            raise PatternError(
                f"pattern name {name!r} is already registered by {_REGISTRY[name].__qualname__}"
            )
        if not (isinstance(cls, type) and issubclass(cls, Pattern)):
            raise PatternError(f"register_pattern({name!r}) decorates Pattern subclasses only")
        cls.pattern_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def known_patterns() -> list[str]:
    """Names of every registered pattern, sorted.

    Example:
        >>> "sliding_window" in known_patterns()
        True
    """
    return sorted(_REGISTRY)


def causal_block_mask(q_blocks: int, k_blocks: int, *, block_size: int = 64, q_len: int | None = None,
                      k_len: int | None = None, q_offset: int = 0) -> torch.Tensor:
    """Causally visible blocks ``bool [q_blocks, k_blocks]``: those holding a (query, key) pair with ``key <= query``.

    `sparsify.block_mask.block_geometry`'s classification (the runtime mask's), with
    query ``i`` at absolute position ``q_offset + i``. Lengths default to full blocks; at
    ``q_offset = 0`` this is the lower block triangle (key block ``j <= i``) whatever the lengths.

    Example:
        >>> causal_block_mask(3, 2).int().tolist()
        [[1, 0], [1, 1], [1, 1]]
        >>> causal_block_mask(1, 4, block_size=16, q_len=16, k_len=64, q_offset=48).int().tolist()
        [[1, 1, 1, 1]]
    """
    q_len = q_blocks * block_size if q_len is None else q_len
    k_len = k_blocks * block_size if k_len is None else k_len
    visible, _ = block_geometry(q_len, k_len, block_size, True, q_offset, "cpu")
    if tuple(visible.shape) != (q_blocks, k_blocks):
        raise PatternError(f"causal_block_mask: q_len={q_len}, k_len={k_len} at block_size={block_size} make "
                           f"{tuple(visible.shape)} blocks, not ({q_blocks}, {k_blocks})")
    return visible

class _BlockTokenBounds:
    """Token coordinates of a block grid's blocks (`block_token_bounds`), for grids with ``q_len``/``k_len``/``block_size``.

    Patterns see the whole query range (query offset 0); a query chunk at an offset reads the
    rows of the full-length grid (`sparsify.block_mask.pattern_block_masks`).
    """

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return block_token_bounds(self.q_len, self.k_len, self.block_size)

    @property
    def query_first(self) -> torch.Tensor:
        """First token of each query block, ``int64 [q_blocks, 1]``."""
        return self._bounds()[0]

    @property
    def query_last(self) -> torch.Tensor:
        """Last token of each query block, ``int64 [q_blocks, 1]``."""
        return self._bounds()[1]

    @property
    def key_first(self) -> torch.Tensor:
        """First token of each key block, ``int64 [1, k_blocks]``."""
        return self._bounds()[2]

    @property
    def key_last(self) -> torch.Tensor:
        """Last token of each key block, ``int64 [1, k_blocks]``."""
        return self._bounds()[3]

    def visible_blocks(self) -> torch.Tensor:
        """``bool [q_blocks, k_blocks]``: the blocks a dense call computes (the causal ones at causal grids)."""
        return block_geometry(self.q_len, self.k_len, self.block_size, self.causal)[0]


@dataclasses.dataclass(frozen=True)
class BlockGrid(_BlockTokenBounds):
    """The block layout of one attention: how many blocks and which tokens each block covers.

    Query block ``i`` covers tokens ``[i * block_size, min((i + 1) * block_size, q_len))`` and
    key block ``j`` likewise up to ``k_len``; query and key token ``t`` are aligned top-left (as
    ``F.scaled_dot_product_attention(is_causal=True)`` does when ``q_len != k_len``). Without
    explicit lengths the last blocks are taken to be full.

    Example:
        >>> grid = BlockGrid(2, 3, block_size=64, q_len=100, k_len=192)
        >>> grid.query_last.flatten().tolist()
        [63, 99]
    """

    q_blocks: int
    k_blocks: int
    block_size: int = 64
    q_len: int | None = None
    k_len: int | None = None
    causal: bool = False

    def __post_init__(self) -> None:
        for field in ("q_blocks", "k_blocks", "block_size"):
            _check_positive_int("block grid", field, getattr(self, field))
        if not isinstance(self.causal, bool):
            raise PatternError(f"block grid: causal must be a bool, got {self.causal!r}")
        for length_field, blocks_field in (("q_len", "q_blocks"), ("k_len", "k_blocks")):
            length = getattr(self, length_field)
            blocks = getattr(self, blocks_field)
            if length is None:
                object.__setattr__(self, length_field, blocks * self.block_size)
                continue
            _check_positive_int("block grid", length_field, length)
            if -(-length // self.block_size) != blocks:
                raise PatternError(
                    f"block grid: {length_field}={length} needs {-(-length // self.block_size)} "
                    f"blocks of {self.block_size} tokens, not {blocks_field}={blocks}"
                )


#: Default `TracedBlockGrid.max_len`: lengths an any-length export serves unless told otherwise.
DEFAULT_MAX_TRACED_LEN = 1 << 20


@dataclasses.dataclass(frozen=True)
class TracedBlockGrid(_BlockTokenBounds):
    """A `BlockGrid` whose lengths are known only when the graph runs: what `Pattern.traced_block_mask` reads.

    ``q_len`` and ``k_len`` are ints or the symbolic sizes of a traced graph (``torch.SymInt``
    under ``torch.export``, so an exported ONNX graph computes everything below from the input
    shapes). The coordinates are the int64 tensors of `BlockGrid`, built from ops that export to
    ONNX ``Range``, ``Clip`` and comparisons; block counts are ``(n + b - 1) // b`` because the
    exporter lowers floor division of sizes to ONNX's truncating ``Div``, which is exact for
    non-negative operands only. ``max_len`` is the declared maximum of both lengths, for the
    lowerings whose loops run over distance scales (`radial`, `power_of_two`).

    Example:
        >>> grid = TracedBlockGrid(100, 192, block_size=64, max_len=4096)
        >>> grid.q_blocks, grid.query_last.flatten().tolist(), int(grid.key_length())
        (2, [63, 99], 192)
    """

    q_len: Any
    k_len: Any
    block_size: int = 64
    causal: bool = False
    max_len: int = DEFAULT_MAX_TRACED_LEN

    def __post_init__(self) -> None:
        _check_positive_int("traced block grid", "block_size", self.block_size)
        _check_positive_int("traced block grid", "max_len", self.max_len)
        if not isinstance(self.causal, bool):
            raise PatternError(f"traced block grid: causal must be a bool, got {self.causal!r}")
        for field in ("q_len", "k_len"):
            length = getattr(self, field)
            if isinstance(length, torch.SymInt):
                continue
            _check_positive_int("traced block grid", field, length)
            if length > self.max_len:
                raise PatternError(f"traced block grid: {field}={length} exceeds max_len={self.max_len}")

    @property
    def q_blocks(self) -> Any:
        """Query blocks (an int, or a symbolic size while tracing)."""
        return (self.q_len + self.block_size - 1) // self.block_size

    @property
    def k_blocks(self) -> Any:
        """Key blocks (an int, or a symbolic size while tracing)."""
        return (self.k_len + self.block_size - 1) // self.block_size

    def key_length(self) -> torch.Tensor:
        """``k_len`` as a 0-dim int64 tensor (for arithmetic the exporter should keep in the graph)."""
        return torch.full((), self.k_len, dtype=torch.int64)


@dataclasses.dataclass(frozen=True)
class Pattern(abc.ABC):
    """Base of every sparsity pattern: a frozen, JSON round-trippable recipe for a block mask.

    Subclasses are frozen dataclasses whose fields are the pattern's parameters (plain JSON
    values; lists are kept as tuples, so patterns stay hashable), are registered with
    `register_pattern`, validate themselves in ``__post_init__`` and implement only
    `_block_mask`; the base class adds the causal triangle and guarantees that every query block
    keeps at least one key block. `DistancePattern` is the base of patterns that depend on
    ``i - j`` only.

    Example:
        >>> pattern = sliding_window(64) | attention_sinks(4)
        >>> pattern.block_mask(4, 4, block_size=64, causal=True).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
        >>> pattern_from_dict(pattern.to_dict()) == pattern
        True
    """

    pattern_name: ClassVar[str] = ""
    # How many leading parameters `str` shows without their names; later ones show as
    # ``name=value`` and are left out while they equal their default.
    _positional: ClassVar[int] = 1

    @property
    def is_skip(self) -> bool:
        """True for `skip`: the head's output is dropped (the rewrite writes zeros for it)."""
        return False

    @property
    def is_adaptive(self) -> bool:
        """True when the mask is estimated per input (`sparsify.patterns.adaptive`), or a part of it is."""
        return False

    @property
    def is_dense(self) -> bool:
        """True when the pattern keeps every block at every length (`dense`): the head runs dense attention.

        Example:
            >>> dense().is_dense, sliding_window(64).is_dense
            (True, False)
        """
        return False

    @abc.abstractmethod
    def _block_mask(self, grid: BlockGrid) -> torch.Tensor:
        """Kept blocks ``bool [q_blocks, k_blocks]`` before the causal triangle and row fallback."""

    def block_mask(
        self,
        q_blocks: int,
        k_blocks: int,
        *,
        block_size: int = 64,
        causal: bool = False,
        q_len: int | None = None,
        k_len: int | None = None,
    ) -> torch.Tensor:
        """Kept blocks ``bool [q_blocks, k_blocks]`` on CPU; every row keeps at least one block.

        A block is kept when the pattern keeps any (query, key) token pair inside it. ``causal``
        drops the blocks causal attention never sees (`causal_block_mask`, the runtime mask's
        classification at query offset 0: key block ``j > i``). A query row left empty keeps
        key block ``min(i, k_blocks - 1)``. ``q_len``/``k_len`` give the true token counts when
        the last block is partial (default: full blocks).

        Example:
            >>> sliding_window(64).block_mask(3, 3, block_size=64).int().tolist()
            [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
        """
        grid = BlockGrid(q_blocks, k_blocks, block_size, q_len, k_len, causal)
        mask = self._block_mask(grid)
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or tuple(mask.shape) != (q_blocks, k_blocks)
        ):
            got = (
                f"{mask.dtype} {tuple(mask.shape)}"
                if isinstance(mask, torch.Tensor)
                else type(mask).__name__
            )
            raise PatternError(
                f"pattern {self}: _block_mask must return bool [{q_blocks}, {k_blocks}], got {got}"
            )
        # A fresh tensor either way: the fallback below writes into it.
        mask = mask.cpu() & grid.visible_blocks() if causal else mask.cpu().clone()
        empty_rows = (~mask.any(dim=1)).nonzero().flatten()
        if empty_rows.numel():
            mask[empty_rows, empty_rows.clamp(max=k_blocks - 1)] = True
        return mask

    def density(
        self,
        q_blocks: int,
        k_blocks: int,
        *,
        block_size: int = 64,
        causal: bool = False,
        q_len: int | None = None,
        k_len: int | None = None,
    ) -> float:
        """Kept blocks over the blocks dense attention computes (the causally visible ones at causal sites).

        The one meaning of density (`sparsify.runtime.RuntimeBlockMask.density` is the same
        quantity for a built mask).

        `skip` computes nothing and has density 0.0 (its block mask is only a placeholder).

        Example:
            >>> dense().density(4, 4, causal=True)
            1.0
            >>> attention_sinks(64).density(4, 4)
            0.25
        """
        kept = self.block_mask(
            q_blocks, k_blocks, block_size=block_size, causal=causal, q_len=q_len, k_len=k_len
        )
        if self.is_skip:
            return 0.0
        visible = BlockGrid(q_blocks, k_blocks, block_size, q_len, k_len, causal).visible_blocks()
        return int(kept.sum()) / int(visible.sum())

    def runtime_mask(
        self,
        q_len: int,
        k_len: int,
        *,
        block_size: int = 64,
        causal: bool = False,
        q_offset: int = 0,
        device: torch.device | str = "cpu",
    ) -> RuntimeBlockMask:
        """This pattern's `RuntimeBlockMask` for one head: the kept blocks split into full and partial ones.

        The mask the kernels, the cost model and the ONNX lowering read, built as a site builds it
        (`sparsify.runtime.StaticMaskSource`): for a query chunk at ``q_offset`` the pattern's rows at
        that position. Input-adaptive patterns have no mask without an input
        (`sparsify.runtime.mask_source.AdaptiveMaskSource` estimates one per call), and `skip`
        computes nothing; both are refused.

        Example:
            >>> mask = sliding_window(64).runtime_mask(256, 256, block_size=64, causal=True)
            >>> mask.kept_counts().tolist(), mask.density()
            ([[[1, 2, 2, 2]]], 0.7)
        """
        if self.is_skip or self.is_adaptive:
            kind = "skip() computes nothing" if self.is_skip else "an input-adaptive pattern is estimated per input"
            raise PatternError(f"pattern {self}: no static runtime mask ({kind})")
        kept = pattern_block_masks([self], block_size=block_size, q_len=q_len, k_len=k_len, causal=causal,
                                   q_offset=q_offset)
        return RuntimeBlockMask.from_block_masks(kept.to(device), block_size=block_size, q_len=q_len, k_len=k_len,
                                                 causal=causal, q_offset=q_offset)

    # --- lowering: the block mask as tensor ops of a length known only when the graph runs ---------

    def traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        """`block_mask` for a `TracedBlockGrid`: kept blocks ``bool [q_blocks, k_blocks]`` as tensor ops of the lengths.

        What an any-length ONNX export puts in the graph (``sparsify.export_onnx``): the same
        blocks as `block_mask` at every length — causal triangle and row fallback included —
        computed from the run-time sequence length. Families declare `_traced_block_mask`;
        patterns that cannot (see `fixed_length_reason`) raise `PatternError`.

        Example:
            >>> grid = TracedBlockGrid(192, 192, block_size=64, causal=True)
            >>> torch.equal(sliding_window(64).traced_block_mask(grid),
            ...             sliding_window(64).block_mask(3, 3, block_size=64, causal=True))
            True
        """
        reason = self.fixed_length_reason()
        if reason is not None:
            raise PatternError(f"pattern {self} has no any-length lowering: {reason}")
        mask = self._traced_block_mask(grid)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise PatternError(f"pattern {self}: _traced_block_mask must return bool [q_blocks, k_blocks], got {got}")
        query = torch.arange(grid.q_blocks).unsqueeze(1)
        key = torch.arange(grid.k_blocks).unsqueeze(0)
        if grid.causal:
            mask = mask & grid.visible_blocks()
        # As `block_mask`: a row left empty keeps key block min(i, k_blocks - 1).
        empty = ~mask.any(dim=1, keepdim=True)
        return mask | (empty & (key == query.clamp(max=grid.k_blocks - 1)))

    def _traced_block_mask(self, grid: TracedBlockGrid) -> torch.Tensor:
        """Kept blocks before the causal triangle and row fallback, as tensor ops of ``grid``'s coordinates.

        The contract of `_block_mask`, for lengths that may be symbolic: no Python branch or loop
        on the lengths, no ``int()``/``.item()``/``.tolist()`` of a tensor. Families whose
        `_block_mask` is such an expression already return it; loops over distance scales run
        to ``grid.max_len``. The base class has none (`fixed_length_reason` says so).
        """
        raise PatternError(f"pattern {self}: {self.fixed_length_reason()}")

    def fixed_length_reason(self) -> str | None:
        """Why an exported graph must fix this pattern's sequence length; ``None`` when it serves any length.

        ``None`` exactly when the family declares `_traced_block_mask`.

        Example:
            >>> sliding_window(512).fixed_length_reason() is None
            True
        """
        if type(self)._traced_block_mask is Pattern._traced_block_mask:
            return (f"{type(self).__qualname__} declares no _traced_block_mask (its kept blocks as tensor ops of "
                    f"the run-time length)")
        return None

    def traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        """At most how many key blocks one query block keeps at ``grid``'s lengths (an int or symbolic size).

        The slot count of an any-length export's block tables. It must be known without the
        data (a data-dependent count makes every later shape data-dependent, which the exporter
        cannot cut into chunks), so families bound it from their parameters and the grid's
        (possibly symbolic) lengths in `_traced_row_bound`; the result is at least 1 and at most
        ``k_blocks``. A family that declares none gets ``k_blocks``: correct, but every row then
        computes every key block.

        Example:
            >>> grid = TracedBlockGrid(4096, 4096, block_size=64)
            >>> (sliding_window(160) | attention_sinks(64)).traced_row_bound(grid)
            8
        """
        return torch.sym_min(torch.sym_max(self._traced_row_bound(grid), 1), grid.k_blocks)

    def _traced_row_bound(self, grid: TracedBlockGrid) -> Any:
        """An upper bound on the key blocks one query block keeps (uncapped); the base has ``k_blocks``."""
        return grid.k_blocks

    # --- JSON -----------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        """Parameters as plain JSON values (tuples become lists), in field order."""
        return {
            field.name: _json_value(getattr(self, field.name)) for field in dataclasses.fields(self)
        }

    @classmethod
    def _from_params(cls, params: Mapping[str, Any], location: str, depth: int = 0) -> Pattern:
        """Build from parameters already checked for unknown and missing names (``depth``: nesting, for composites)."""
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """``{"pattern": name, **params}`` with plain JSON values; `pattern_from_dict` inverts it.

        Example:
            >>> sliding_window(512).to_dict()
            {'pattern': 'sliding_window', 'window': 512}
        """
        return {"pattern": self.pattern_name, **self._params()}

    # --- composition and display ----------------------------------------------------------------

    def __or__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        union = _REGISTRY["union"]  # `sparsify.patterns.composites` registers it (it builds on this module)
        return union(_flatten(union, (self, other)))

    def __and__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        intersection = _REGISTRY["intersection"]  # registered by `sparsify.patterns.composites`, as union
        return intersection(_flatten(intersection, (self, other)))

    def __str__(self) -> str:
        fields = dataclasses.fields(self)
        shown = []
        for index, (field, value) in enumerate(zip(fields, self._params().values())):
            if index < self._positional:
                shown.append(repr(value))
            elif field.default is dataclasses.MISSING or _json_value(field.default) != value:
                shown.append(f"{field.name}={value!r}")
        return f"{self.pattern_name}({', '.join(shown)})"

    def __repr__(self) -> str:
        return str(self)


def _flatten(kind: type[Pattern], parts: tuple[Pattern, ...]) -> tuple[Pattern, ...]:
    """Splice the parts of nested unions (or intersections) into one flat tuple."""
    flat: list[Pattern] = []
    for part in parts:
        flat.extend(part.parts if type(part) is kind else (part,))  # type: ignore[attr-defined]
    return tuple(flat)


def _json_value(value: Any) -> Any:
    """Tuples (how patterns store lists, to stay hashable) as JSON lists, recursively."""
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(owner: str, field: str, value: Any) -> None:
    """A run-time size (block counts, lengths): any positive int."""
    if not _is_int(value) or value < 1:
        raise PatternError(f"{owner}: {field} must be a positive int, got {shown(value)}")


def _check_tokens(owner: str, field: str, value: Any, low: int = 1) -> None:
    """A pattern parameter counted in tokens: an int in ``[low, MAX_TOKENS]``."""
    _check_bounded(owner, field, value, low, MAX_TOKENS, "MAX_TOKENS")


def _check_bounded(owner: str, field: str, value: Any, low: int, high: int, bound: str) -> None:
    problem = int_range_problem(value, low, high, bound)
    if problem is not None:
        raise PatternError(f"{owner}: {field} {problem}")


def _check_count(owner: str, field: str, values: Any, high: int, bound: str) -> None:
    if isinstance(values, (list, tuple)) and len(values) > high:
        raise PatternError(
            f"{owner}: {field} holds {len(values)} entries; at most {high} ({bound} in sparsify.limits)"
        )


def _int_tuple(owner: str, field: str, values: Any, low: int = -MAX_TOKENS) -> tuple[int, ...]:
    """``values`` (a list or tuple of ints in ``[low, MAX_TOKENS]``) sorted and deduplicated."""
    if not isinstance(values, (list, tuple)) or not all(_is_int(value) for value in values):
        raise PatternError(f"{owner}: {field} must be a list of ints, got {shown(values)}")
    for value in values:
        _check_bounded(owner, f"{field} entry", value, low, MAX_TOKENS, "MAX_TOKENS")
    return tuple(sorted(set(values)))


def _relative_positions(owner: str, field: str, values: Any) -> tuple[float, ...]:
    """Relative key positions in ``[0, 1)`` as sorted, deduplicated floats."""
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(value, (int, float)) and not isinstance(value, bool) for value in values
    ):
        raise PatternError(
            f"{owner}: {field} must be a list of relative positions in [0, 1), got {shown(values)}"
        )
    _check_count(owner, field, values, MAX_LINES, "MAX_LINES")
    for value in values:
        if not 0.0 <= value < 1.0:
            raise PatternError(
                f"{owner}: {field} must lie in [0, 1) (fractions of the key length), "
                f"got {value!r}"
            )
    return tuple(sorted({float(value) for value in values}))


