"""Patterns from their JSON dicts: `pattern_from_dict`, checking names and parameters."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from sparsify.errors import PatternError
from sparsify.limits import MAX_PATTERN_DEPTH
from sparsify.patterns.base import _REGISTRY, Pattern, known_patterns

__all__ = ["pattern_from_dict"]

def pattern_from_dict(data: Mapping[str, Any]) -> Pattern:
    """Rebuild a pattern from `Pattern.to_dict` output, checking name and parameters.

    Raises `PatternError` naming the pattern and listing the known names or the expected
    parameters; every number is checked against its bound in `sparsify.limits`.

    Example:
        >>> pattern_from_dict({"pattern": "sliding_window", "window": 512})
        sliding_window(512)
    """
    return _from_dict(data, "")


def _from_dict(data: Any, location: str, depth: int = 0) -> Pattern:
    where = f"{location}: " if location else ""
    if depth > MAX_PATTERN_DEPTH:
        raise PatternError(
            f"{where}patterns nested more than {MAX_PATTERN_DEPTH} deep "
            f"(MAX_PATTERN_DEPTH in sparsify.limits)"
        )
    if not isinstance(data, Mapping):
        raise PatternError(
            f"{where}a pattern must be a JSON object like {{\"pattern\": \"dense\"}}, "
            f"got {type(data).__name__}"
        )
    if "pattern" not in data:
        raise PatternError(
            f"{where}pattern object has no 'pattern' key; known patterns: "
            f"{', '.join(known_patterns())}"
        )
    name = data["pattern"]
    if not isinstance(name, str) or name not in _REGISTRY:
        close = (
            difflib.get_close_matches(name, known_patterns(), n=1) if isinstance(name, str) else []
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PatternError(
            f"{where}unknown pattern {name!r}{hint}; known: {', '.join(known_patterns())}"
        )
    cls = _REGISTRY[name]
    params = {key: value for key, value in data.items() if key != "pattern"}
    expected = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(expected))
    missing = [key for key in expected if key not in params]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown parameter(s) {', '.join(map(repr, unknown))}")
        if missing:
            problems.append(f"missing parameter(s) {', '.join(map(repr, missing))}")
        raise PatternError(
            f"{where}pattern {name!r}: {'; '.join(problems)}; expected: "
            f"{', '.join(expected) if expected else '(no parameters)'}"
        )
    try:
        return cls._from_params(params, location or name, depth)
    except PatternError as error:
        if location and not str(error).startswith(location):
            raise PatternError(f"{where}{error}") from error
        raise


