"""Print the rows of benchmark JSON files (RowLog's ``{"meta", "rows", "complete"}``) and pytest JUnit counts, briefly.

What the GPU session prints at the end of each step, so a cut or failed run still shows its
numbers on stdout: the device, whether the run completed, and one line per row with the chosen
keys (all keys when none are given).

    python benchmarks/show_rows.py results/e2e_cuda.json --keys tokens mode speedup fraction_of_ideal
    python benchmarks/show_rows.py --junit tests_gpu.xml          # passed / failed / skipped counts
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import xml.etree.ElementTree as ElementTree


def describe_rows(path: pathlib.Path, keys: list[str] | None) -> str:
    """The file's device, completeness and rows, one line each (only ``keys`` when given).

    Example:
        >>> import tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> _ = path.write_text('{"meta": {"device": "cpu"}, "rows": [{"a": 1, "b": 2}], "complete": false}')
        >>> print(describe_rows(path, ["b"]))
        run.json: cpu, 1 rows, INCOMPLETE (cut or failed)
          b=2
    """
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{path.name}: unreadable ({type(error).__name__}: {error})"
    meta, rows = document.get("meta", {}), document.get("rows", [])
    state = "complete" if document.get("complete") else "INCOMPLETE (cut or failed)"
    lines = [f"{path.name}: {meta.get('device', '?')}, {len(rows)} rows, {state}"]
    for row in rows:
        shown = {key: row[key] for key in keys if key in row} if keys else row
        if "error" in row and "error" not in shown:
            shown["error"] = row["error"]
        lines.append("  " + "  ".join(f"{key}={value}" for key, value in shown.items()))
    extras = {key: meta[key] for key in ("graph_breaks", "graph_breaks_error", "seconds") if key in meta}
    if extras:
        lines.append("  meta: " + "  ".join(f"{key}={value}" for key, value in extras.items()))
    return "\n".join(lines)


def junit_counts(path: pathlib.Path) -> str:
    """``passed / failed / errors / skipped`` of a pytest ``--junitxml`` file, and the failing tests' names.

    Example:
        >>> import tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "tests.xml"
        >>> _ = path.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        ...                     '<testcase classname="tests.test_a" name="test_b"><failure/></testcase>'
        ...                     '</testsuite></testsuites>')
        >>> print(junit_counts(path))
        tests.xml: 1 passed, 1 failed, 0 errors, 1 skipped
          FAILED tests.test_a::test_b
    """
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        return f"{path.name}: unreadable ({type(error).__name__}: {error})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {name: sum(int(suite.get(name, 0)) for suite in suites) for name in ("tests", "failures", "errors",
                                                                                   "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    lines = [f"{path.name}: {passed} passed, {total['failures']} failed, {total['errors']} errors, "
             f"{total['skipped']} skipped"]
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            lines.append(f"  FAILED {case.get('classname')}::{case.get('name')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=pathlib.Path, help="RowLog JSON files")
    parser.add_argument("--keys", nargs="+", default=None, help="row keys to show (default: all)")
    parser.add_argument("--junit", nargs="+", type=pathlib.Path, default=[], help="pytest --junitxml files")
    args = parser.parse_args(argv)
    for path in args.junit:
        print(junit_counts(path) if path.exists() else f"{path.name}: missing (the step did not get that far)")
    for path in args.files:
        print(describe_rows(path, args.keys) if path.exists() else f"{path.name}: missing (the step wrote nothing)")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
