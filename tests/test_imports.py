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

# The house's floors, top first (issue 17: CLI -> api -> search -> strategy/cost -> patterns/runtime ->
# backends -> ops). A module imports only modules of its own floor or below — at load time, inside a
# function, or for type checking alike: a deferred or type-only import still runs back up. A module
# stands on the floor of its longest listed name (a dotted prefix; the root package, the face that
# hands the front doors' names on, by its exact name only), and every module must stand on one.
FLOORS = (
    ("sparsify.cli",),
    ("sparsify",),
    ("sparsify.export",),
    ("sparsify.api",),
    ("sparsify.search",),
    ("sparsify.options", "sparsify.passes", "sparsify.integrations", "sparsify.distributed", "sparsify.report"),
    ("sparsify.strategy", "sparsify.cost", "sparsify.onnx_lowering", "sparsify.profile"),
    ("sparsify.patterns", "sparsify.runtime", "sparsify.adaptive_patterns"),
    ("sparsify.backends",),
    ("sparsify.estimators", "sparsify.estimator_kernels"),
    ("sparsify.block_mask", "sparsify.block_list_kernels"),
    ("sparsify.ops", "sparsify.site", "sparsify.capture", "sparsify.output_metrics", "sparsify.errors",
     "sparsify.io", "sparsify.limits", "sparsify.version", "sparsify.toy_models", "sparsify.examples"),
)
ROOT_PACKAGE = "sparsify"


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


def imported_names(tree: ast.Module, module: str, is_package: bool, *,
                   type_checking: bool = False) -> tuple[set[str], set[str]]:
    """``(top_level, function_level)``: dotted names a module imports when it loads / when a function runs.

    ``if TYPE_CHECKING:`` blocks import nothing at run time and are left out, unless ``type_checking``
    (then they count as top-level). ``from a import b`` names ``a.b`` (which may be a module or an
    attribute of ``a``; see `import_edges`).
    """
    top_level: set[str] = set()
    function_level: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, inside_function: bool) -> None:
        if _is_type_checking_block(node) and not type_checking:
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


def import_edges(sources: dict[str, str], packages: set[str], *,
                 type_checking: bool = False) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(top_level, function_level)`` edges between the modules of ``sources``: ``module -> {modules it imports}``.

    Importing ``a.b.c`` runs ``a.b``'s ``__init__`` first, so the edge goes to every package on
    the way (below the root package and outside the importer's own packages, which are already
    loading) as well as to ``a.b.c`` itself.
    """
    top_level: dict[str, set[str]] = {}
    function_level: dict[str, set[str]] = {}
    for module, text in sources.items():
        names = imported_names(ast.parse(text, filename=module), module, module in packages,
                               type_checking=type_checking)
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


def floor_of(module: str, floors: tuple[tuple[str, ...], ...] = FLOORS, root: str = ROOT_PACKAGE) -> int | None:
    """The index in ``floors`` (0: the top) of the module's longest listed name; ``None``: on no floor."""
    best, best_length = None, -1
    for depth, names in enumerate(floors):
        for name in names:
            matches = module == name or (name != root and module.startswith(name + "."))
            if matches and len(name) > best_length:
                best, best_length = depth, len(name)
    return best


def imports_running_up(edges: dict[str, set[str]], floors: tuple[tuple[str, ...], ...] = FLOORS,
                       root: str = ROOT_PACKAGE) -> list[str]:
    """``"a -> b (floor i -> floor j)"`` for every import of a module from a floor above its own (a smaller index)."""
    found = []
    for module, targets in sorted(edges.items()):
        source = floor_of(module, floors, root)
        for target in sorted(targets):
            floor = floor_of(target, floors, root)
            if source is not None and floor is not None and floor < source:
                found.append(f"{module} -> {target} (floor {source} -> floor {floor})")
    return found


@pytest.fixture(scope="module")
def library() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The library's ``(top_level, function_level)`` import edges."""
    return import_edges(*library_sources())


# Old module paths kept one release for users' imports; each warns, naming where its contents went.
DEPRECATED_MODULES = {"sparsify.adaptive_patterns": "sparsify.patterns", "sparsify.passes.profile": "sparsify.passes.observe",
                      "sparsify.examples": "sparsify.toy_models",
                      "sparsify.runtime.adaptive": "sparsify.estimators"}


def test_every_module_imports():
    sources, _ = library_sources()
    assert {"sparsify.patterns.base", "sparsify.block_mask", "sparsify.passes.find_attention",
            "sparsify.backends", "sparsify.integrations.transformers"} <= set(sources)
    for module in sources:
        if module in DEPRECATED_MODULES:                      # they warn on import, by design
            sys.modules.pop(module, None)                     # (another test may have imported it already)
            with pytest.warns(DeprecationWarning, match=DEPRECATED_MODULES[module]):
                importlib.import_module(module)
        else:
            importlib.import_module(module)


def test_the_runtime_packages_old_block_mask_names_warn_and_are_the_same_objects():
    import sparsify.block_mask
    import sparsify.runtime

    for name in ("RuntimeBlockMask", "blocks_for", "causal_element_mask", "pattern_block_masks"):
        with pytest.warns(DeprecationWarning, match=f"sparsify.runtime.{name} is deprecated: import it from "
                                                    f"sparsify.block_mask"):
            assert getattr(sparsify.runtime, name) is getattr(sparsify.block_mask, name)
    with pytest.raises(AttributeError, match="no attribute 'mask_sources'"):
        sparsify.runtime.mask_sources


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


def test_every_module_stands_on_a_floor():
    sources, _ = library_sources()
    homeless = sorted(module for module in sources if floor_of(module) is None)
    assert not homeless, f"modules on no floor of FLOORS (add each to the floor it belongs on): {homeless}"


def test_no_import_runs_back_up_the_floors():
    sources, packages = library_sources()
    top_level, function_level = import_edges(sources, packages, type_checking=True)
    edges = {module: top_level.get(module, set()) | function_level.get(module, set()) for module in sources}
    upward = imports_running_up(edges)
    floors = "\n".join(f"  {depth}: {', '.join(names)}" for depth, names in enumerate(FLOORS))
    assert not upward, ("imports running back up the floors (top first):\n" + floors + "\n" + "\n".join(upward))


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


def test_checker_places_modules_on_floors_and_finds_imports_running_up():
    floors = (("lib.front",), ("lib",), ("lib.model", "lib.model.io"), ("lib.core",))
    assert floor_of("lib.front.cli", floors, "lib") == 0
    assert floor_of("lib", floors, "lib") == 1
    assert floor_of("lib.other", floors, "lib") is None              # the root matches itself only
    assert floor_of("lib.model.io.disk", floors, "lib") == 2
    edges = {"lib.front.cli": {"lib.core"}, "lib.core": {"lib.model.io"}, "lib.model": {"lib.model.io"}}
    assert imports_running_up(edges, floors, "lib") == ["lib.core -> lib.model.io (floor 3 -> floor 2)"]
    type_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lib.front import App\n"
    assert import_edges({"lib": "", "lib.core": type_only, "lib.front": ""}, {"lib"})[0]["lib.core"] == set()
    assert import_edges({"lib": "", "lib.core": type_only, "lib.front": ""}, {"lib"},
                        type_checking=True)[0]["lib.core"] == {"lib.front"}


def test_every_package_is_installed_by_pyproject():
    # An editable install finds any folder; a wheel holds only what pyproject lists.
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"sparsify." + "." .join(path.parent.relative_to(root / "sparsify").parts)
               for path in (root / "sparsify").rglob("__init__.py") if path.parent != root / "sparsify"}
    assert folders | {"sparsify", "sparsify.passes", "sparsify.backends"} == listed
