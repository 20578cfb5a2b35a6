"""Tests of the package's import structure: every module imports, no import cycles, layers only import downwards."""

from __future__ import annotations

import ast
import importlib
import sys
import pathlib
import pkgutil

import pytest

import sparsify
import sparsify.backends
import sparsify.passes

# The pipeline's layers, top first: at load time a module imports its own layer and those below
# it, never one above (a library module never imports the CLI). A module belongs to the layer of
# its longest listed prefix; the runtime block mask is the currency every layer reads, so it sits
# below the backends that consume it. Modules not named here are unconstrained.
LAYERS = (
    ("sparsify.cli",),
    ("sparsify.api",),
    ("sparsify.search", "sparsify.adaptive_search"),
    ("sparsify.strategy", "sparsify.cost"),
    ("sparsify.patterns", "sparsify.runtime"),
    ("sparsify.backends",),
    ("sparsify.runtime.block_mask",),
    ("sparsify.ops",),
)


def library_sources() -> tuple[dict[str, str], set[str]]:
    """``(sources, packages)``: the source of every module of the installed package (`sparsify` with its
    passes and backends) by dotted name, and which of them are packages."""
    sources: dict[str, str] = {}
    packages: set[str] = set()
    for package in (sparsify, sparsify.passes, sparsify.backends):
        sources[package.__name__] = pathlib.Path(package.__file__).read_text()
        packages.add(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                sources[info.name] = pathlib.Path(spec.origin).read_text()
                if info.ispkg:
                    packages.add(info.name)
    return sources, packages


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.Module, module: str, is_package: bool) -> tuple[set[str], set[str]]:
    """``(top_level, function_level)``: dotted names a module imports when it loads / when a function runs.

    ``if TYPE_CHECKING:`` blocks import nothing at run time and are left out. ``from a import b``
    names ``a.b`` (which may be a module or an attribute of ``a``; see `import_edges`).
    """
    top_level: set[str] = set()
    function_level: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, inside_function: bool) -> None:
        if _is_type_checking_block(node):
            return
        target = function_level if inside_function else top_level
        if isinstance(node, ast.Import):
            target.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            target.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, inside_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top_level, function_level


def import_edges(sources: dict[str, str], packages: set[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(top_level, function_level)`` edges between the modules of ``sources``: ``module -> {modules it imports}``.

    Importing ``a.b.c`` runs ``a.b``'s ``__init__`` first, so the edge goes to every package on
    the way (below the root package and outside the importer's own packages, which are already
    loading) as well as to ``a.b.c`` itself.
    """
    top_level: dict[str, set[str]] = {}
    function_level: dict[str, set[str]] = {}
    for module, text in sources.items():
        names = imported_names(ast.parse(text, filename=module), module, module in packages)
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for kind, edges in zip(names, (top_level, function_level)):
            targets = set()
            for name in kind:
                while name and name not in sources:            # "from a import b": b is an attribute of a
                    name = name.rpartition(".")[0]
                if not name or name == module:
                    continue
                targets.add(name)
                parts = name.split(".")
                for depth in range(2, len(parts)):
                    parent = ".".join(parts[:depth])
                    if parent in sources and parent not in own_packages:
                        targets.add(parent)
            edges[module] = targets - {module}
    return top_level, function_level


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        members = set(component)
        # A shortest closed path through the component's first module (breadth-first search).
        start = component[0]
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            following = []
            for node in frontier:
                for target in sorted(edges.get(node, set()) & members):
                    if target == start:
                        found = node
                        break
                    if target not in previous:
                        previous[target] = node
                        following.append(target)
                if found is not None:
                    break
            frontier = following
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([start, *reversed(path[:-1]), start] if len(path) > 1 else [start, found, start])
    return cycles


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` of the module's longest listed prefix (``None``: unconstrained)."""
    best, best_length = None, -1
    for depth, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_length:
                best, best_length = depth, len(name)
    return best


@pytest.fixture(scope="module")
def library() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The library's ``(top_level, function_level)`` import edges."""
    return import_edges(*library_sources())


# Old module paths kept one release for users' imports; each warns, naming where its contents went.
DEPRECATED_MODULES = {"sparsify.adaptive_patterns": "sparsify.patterns", "sparsify.passes.profile": "sparsify.passes.observe",
                      "sparsify.examples": "sparsify.toy_models"}


def test_every_module_imports():
    sources, _ = library_sources()
    assert {"sparsify.patterns.base", "sparsify.runtime.block_mask", "sparsify.passes.find_attention",
            "sparsify.backends", "sparsify.integrations.transformers"} <= set(sources)
    for module in sources:
        if module in DEPRECATED_MODULES:                      # they warn on import, by design
            sys.modules.pop(module, None)                     # (another test may have imported it already)
            with pytest.warns(DeprecationWarning, match=DEPRECATED_MODULES[module]):
                importlib.import_module(module)
        else:
            importlib.import_module(module)


def test_no_cycles_of_top_level_imports(library):
    top_level, _ = library
    cycles = find_cycles(top_level)
    assert not cycles, "import cycles (top-level imports):\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_cycles_even_through_imports_inside_functions(library):
    # An import inside a function defers a cycle, it does not remove it: the two modules still need each other.
    top_level, function_level = library
    edges = {module: set(top_level.get(module, ())) | set(function_level.get(module, ()))
             for module in set(top_level) | set(function_level)}
    cycles = find_cycles(edges)
    assert not cycles, "import cycles (any imports):\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_layers_import_only_downwards():
    sources, packages = library_sources()
    upward = []
    for module, text in sorted(sources.items()):
        top_level, _ = imported_names(ast.parse(text), module, module in packages)
        for name in sorted(top_level):
            while name and name not in sources:                # "from a import b": b is an attribute of a
                name = name.rpartition(".")[0]
            source_layer, target_layer = layer_of(module), layer_of(name)
            if source_layer is not None and target_layer is not None and target_layer < source_layer:
                upward.append(f"{module} -> {name}")
    assert not upward, ("top-level imports running up the layers "
                        + " -> ".join("/".join(names) for names in LAYERS) + ":\n" + "\n".join(upward))


def test_no_library_module_imports_the_cli(library):
    top_level, function_level = library
    importers = sorted(module for edges in (top_level, function_level) for module, targets in edges.items()
                       if "sparsify.cli" in targets and module not in ("sparsify.cli", "sparsify.__main__"))
    assert not importers, f"library modules import the CLI: {importers}"


# --- the checker itself -----------------------------------------------------------------------


def test_checker_separates_top_level_function_level_and_type_checking_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import pkg.a\n"
        "from pkg.b import thing\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.c import Hint\n"
        "def later():\n"
        "    from pkg.d import helper\n"
        "class Holder:\n"
        "    def method(self):\n"
        "        import pkg.e\n"
    )
    top_level, function_level = imported_names(ast.parse(source), "pkg.m", False)
    assert top_level == {"typing.TYPE_CHECKING", "pkg.a", "pkg.b.thing"}
    assert function_level == {"pkg.d.helper", "pkg.e"}
    relative_top, _ = imported_names(ast.parse("from .a import x\nfrom . import b\n"), "pkg.sub.m", False)
    assert relative_top == {"pkg.sub.a.x", "pkg.sub.b"}


def test_checker_finds_cycles_and_only_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": {"x", "w"}, "w": set()}) == [["x", "y", "z", "x"]]
    top_level, function_level = import_edges({"pkg": "", "pkg.a": "import pkg.b\n",
                                              "pkg.b": "def f():\n    import pkg.a\n"}, {"pkg"})
    assert top_level == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert function_level["pkg.b"] == {"pkg.a"}
    assert find_cycles(top_level) == []
    assert find_cycles({name: top_level[name] | function_level[name] for name in top_level}) == [
        ["pkg.a", "pkg.b", "pkg.a"]]


def test_checker_counts_the_packages_an_import_runs():
    sources = {"lib": "", "lib.p": "from lib.p.base import Pattern\n",
               "lib.p.base": "from lib.r.mask import RuntimeMask\n",
               "lib.r": "from lib.r.mask import RuntimeMask\nfrom lib.r.source import Source\n",
               "lib.r.mask": "", "lib.r.source": "from lib.p.base import Pattern\n"}
    top_level, _ = import_edges(sources, {"lib", "lib.p", "lib.r"})
    # base reaches the runtime package's __init__ on the way to its mask; that imports a source,
    # which imports base back. The modules' own packages (lib.p for base) are not edges.
    assert top_level["lib.p.base"] == {"lib.r.mask", "lib.r"}
    assert top_level["lib.r.source"] == {"lib.p.base", "lib.p"}
    assert find_cycles(top_level) == [["lib.p", "lib.p.base", "lib.r", "lib.r.source", "lib.p"]]


def test_every_package_is_installed_by_pyproject():
    # An editable install finds any folder; a wheel holds only what pyproject lists.
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"sparsify." + "." .join(path.parent.relative_to(root / "sparsify").parts)
               for path in (root / "sparsify").rglob("__init__.py") if path.parent != root / "sparsify"}
    assert folders | {"sparsify", "sparsify.passes", "sparsify.backends"} == listed
