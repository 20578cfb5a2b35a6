"""Benchmark rows that survive a crash: each row is printed and written to the JSON file the moment it is measured.

GPU time is scarce and runs die late (a timeout, an out-of-memory in the last case): a
benchmark that prints its table only at the end loses everything. `RowLog` prints each row as
one line (``key=value`` pairs, in the order given) and rewrites the JSON file atomically after
every row, so the file always holds the header and every row measured so far::

    {"meta": {...}, "rows": [{...}, {...}], "complete": false}

``complete`` turns true when the log is closed normally (``with`` block left without an
exception); a reader can tell a finished run from a cut one. At the end `RowLog.table` gives the
usual tabulate table of all rows.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "bench.json"
    >>> with RowLog(path, meta={"device": "cpu"}, echo=False) as log:
    ...     _ = log.add(tokens=1024, speedup=2.5)
    >>> import json; json.loads(path.read_text())["rows"]
    [{'tokens': 1024, 'speedup': 2.5}]
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from typing import Any

from tabulate import tabulate

from sparsify.io import write_text_atomically

__all__ = ["RowLog"]


def _plain(value: Any) -> Any:
    """A JSON-safe copy of ``value`` (tensors and numpy scalars as numbers, NaN/inf as strings)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RowLog:
    """A benchmark's rows: printed one by one and kept in a JSON file rewritten after every row.

    ``meta`` (device, torch version, options) is written before the first row, so even a run
    that dies measuring its first row leaves a file that says what it was. ``path=None`` keeps
    rows in memory only (smoke runs).

    Example:
        >>> log = RowLog(None, echo=False)
        >>> _ = log.add(density=0.1, ms=3.2)
        >>> log.rows
        [{'density': 0.1, 'ms': 3.2}]
    """

    def __init__(self, path: str | os.PathLike[str] | None, meta: dict | None = None, *, echo: bool = True) -> None:
        self.path = pathlib.Path(path) if path is not None else None
        self.meta = dict(meta or {})
        self.rows: list[dict] = []
        self.echo = echo
        self.complete = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write()

    def add(self, **row: Any) -> dict:
        """Record one measured row: print it at once and rewrite the JSON file with it."""
        row = {key: _plain(value) for key, value in row.items()}
        self.rows.append(row)
        if self.echo:
            print("row: " + "  ".join(f"{key}={_short(value)}" for key, value in row.items()), flush=True)
        self._write()
        return row

    def update_meta(self, **items: Any) -> None:
        """Add to the header (e.g. a value known only after the first rows) and rewrite the file."""
        self.meta.update({key: _plain(value) for key, value in items.items()})
        self._write()

    def table(self, floatfmt: str = ".3g") -> str:
        """All rows so far as a tabulate table (columns in first-seen order)."""
        columns: list[str] = []
        for row in self.rows:
            columns.extend(key for key in row if key not in columns)
        return tabulate([[row.get(column, "") for column in columns] for row in self.rows], headers=columns,
                        floatfmt=floatfmt)

    def close(self) -> None:
        """Mark the run complete (the file says so) and write it a last time."""
        self.complete = True
        self._write()

    def __enter__(self) -> "RowLog":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        elif self.echo:
            print(f"run stopped by {kind.__name__}; {len(self.rows)} rows kept in {self.path}", file=sys.stderr,
                  flush=True)

    def _write(self) -> None:
        if self.path is None:
            return
        document = {"meta": self.meta, "rows": self.rows, "complete": self.complete}
        write_text_atomically(self.path, json.dumps(document, indent=1) + "\n")
