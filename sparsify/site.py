"""`AttentionSite`: the typed description of one attention found in a captured graph."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention call of the model, as found by capture.

    It is stored in ``node.meta["sparsify"]`` of the canonical ``torch.ops.sparsify.attention``
    node and is what strategies are keyed by.

    Attributes:
        name: stable name derived from the module path (``"model.layers.3.self_attn"``); a
            second attention inside the same module gets ``"#1"``, ``"#2"``... appended.
        index: position of the site in graph order (0-based).
        num_heads: query heads.
        num_kv_heads: key/value heads (``< num_heads`` for grouped-query attention).
        head_dim: query/key feature size per head.
        value_head_dim: value feature size per head (usually ``head_dim``).
        q_len: query length seen at capture (strategies apply to other lengths too).
        k_len: key length seen at capture.
        causal: True when the site is causal, either by ``is_causal=True`` or because its mask
            hides every key after the query on the example inputs.
        is_self_attention: False for cross attention (keys from another sequence).
        has_mask: the call receives an ``attn_mask`` tensor (padding, causal or bias).
        source: which graph form was matched: ``"sdpa"``, ``"multihead_attention"`` or
            ``"manual"``.
        module_type: qualified class name of the module holding the attention.
        softcap: ``c`` when scores are soft-capped as ``c * tanh(scores / c)`` before the mask
            (Gemma 2), else None.
        has_sinks: the softmax of every row has one extra learned logit per head, whose
            column is dropped afterwards (gpt-oss "sinks").

    ``softcap`` and ``has_sinks`` describe what the site computes, and the canonical node
    carries their values; they are not part of `fingerprint`: a strategy is a block pattern
    per head, equally valid with or without them, so a strategy file stays applicable.

    Example:
        >>> site = AttentionSite("blocks.0.attn", 0, num_heads=8, num_kv_heads=8, head_dim=64,
        ...                      q_len=1024, k_len=1024, causal=True)
        >>> site.gqa_group_size
        1
    """

    name: str
    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_len: int
    k_len: int
    causal: bool = False
    is_self_attention: bool = True
    has_mask: bool = False
    value_head_dim: int | None = None
    source: str = "sdpa"
    module_type: str = ""
    softcap: float | None = None
    has_sinks: bool = False

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0:
            raise ValueError(f"site {self.name!r}: head counts must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"site {self.name!r}: {self.num_heads} query heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads"
            )
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"site {self.name!r}: softcap must be positive, got {self.softcap!r}")
        if self.value_head_dim is None:
            object.__setattr__(self, "value_head_dim", self.head_dim)

    @property
    def gqa_group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def kind(self) -> str:
        """``"self"`` or ``"cross"``."""
        return "self" if self.is_self_attention else "cross"

    def fingerprint(self) -> dict[str, Any]:
        """The fields a strategy checks to decide it belongs to this site (no sequence lengths)."""
        return {
            "name": self.name,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "causal": self.causal,
            "kind": self.kind,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON values."""
        return dataclasses.asdict(self)
