"""The package's import graph keeps its shape: no cycles, no upward imports, no test code.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from … import`` at any depth, function-level ones included, relative imports resolved, and
``importlib.import_module("…")`` calls with a literal name. Rules (framework/ARCHITECTURE.md, "Layers"):

- no import cycle between longreach modules;
- imports only point down the stack ``launchers -> framework -> parallel -> kernels``;
- no module of the package imports pytest or anything under ``tests/``.

Edges. ``import a.b.c`` / ``from a.b import c`` depend on module ``a.b.c`` when it exists, else on the
package ``a.b`` whose ``__init__`` defines the name; importing a module also runs the ``__init__`` of
every enclosing package the importer is not itself inside. A submodule importing a name from its own
package's ``__init__`` is a cycle edge only if that ``__init__`` imports the submodule.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> (import name, layer); a module may import only from its own layer or lower ones
FOLDERS = {
    "kernels": ("longreach.kernels", 0),
    "parallel": ("longreach.parallel", 1),
    "framework": ("longreach", 2),
    "launchers": ("longreach.launchers", 3),
}
LAYER_NAMES = {0: "kernels", 1: "parallel", 2: "framework", 3: "launchers"}
TEST_ROOTS = ("pytest", "_pytest", "tests", "conftest")


@dataclass(slots=True)
class Module:
    name: str
    path: Path
    is_package: bool
    # (imported dotted name, line, the names of a `from … import`) for each import statement
    imports: list[tuple[str, int, tuple[str, ...]]] = field(default_factory=list)


def _module_name(folder: str, path: Path) -> tuple[str, bool]:
    base = FOLDERS[folder][0]
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join([base, *parts]) if parts else base, is_package


def _resolve_relative(mod: Module, node: ast.ImportFrom) -> str:
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    parts = package.split(".")
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _read_imports(mod: Module) -> None:
    tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mod.imports.extend((alias.name, node.lineno, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(mod, node) if node.level else (node.module or "")
            mod.imports.append((target, node.lineno, tuple(a.name for a in node.names)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and not node.args[0].value.startswith(".")):
            mod.imports.append((node.args[0].value, node.lineno, ()))


def load_modules() -> dict[str, Module]:
    """Every module of the four folders, keyed by its import name, with its import statements."""
    modules: dict[str, Module] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name, is_package = _module_name(folder, path)
            modules[name] = Module(name, path, is_package)
    for mod in modules.values():
        _read_imports(mod)
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _direct_targets(modules: dict[str, Module], target: str, names: tuple[str, ...]) -> set[str]:
    """The longreach modules one import statement loads, before the package-``__init__`` rule."""
    out: set[str] = set()
    if names:  # from target import names: a submodule per name where one exists, else target itself
        for n in names:
            out.add(f"{target}.{n}" if f"{target}.{n}" in modules else target)
    else:
        # `import a.b.c`: the deepest existing module of the dotted name
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            out.add(".".join(parts))
    return {t for t in out if t in modules}


def _init_imports(modules: dict[str, Module], package: str) -> set[str]:
    mod = modules[package]
    return {t for target, _, names in mod.imports for t in _direct_targets(modules, target, names)}


def import_graph(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """``graph[a][b] = line``: module ``a`` imports module ``b`` (first such line)."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for mod in modules.values():
        own_packages = set(_ancestors(mod.name))
        for target, line, names in mod.imports:
            for dep in _direct_targets(modules, target, names):
                loaded = {dep} | {p for p in _ancestors(dep) if p in modules and p not in own_packages}
                for t in loaded:
                    if t == mod.name:
                        continue
                    if t in own_packages and mod.name not in _init_imports(modules, t):
                        continue  # the enclosing package is already loading; only a name lookup
                    graph[mod.name].setdefault(t, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected component of two or more modules, as a shortest cycle through each member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan, iterative over the edge lists
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles: list[list[str]] = []
    seen: set[frozenset[tuple[str, str]]] = set()
    for comp in components:
        members = set(comp)
        for start in comp:  # a shortest cycle through each member (breadth-first, inside the component)
            path = _shortest_cycle(graph, members, start)
            edges = frozenset(zip(path, path[1:] + path[:1]))
            if edges not in seen:
                seen.add(edges)
                cycles.append(path)
    return cycles


def _shortest_cycle(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
    prev = {start: ""}
    frontier = [start]
    while frontier:
        nxt = []
        for u in frontier:
            for w in sorted(graph[u]):
                if w == start:
                    path = [u]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1]
                if w in members and w not in prev:
                    prev[w] = u
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


@functools.lru_cache(maxsize=1)
def _package() -> tuple[dict[str, Module], dict[str, dict[str, int]]]:
    """The modules and the import graph, read once for all the tests below."""
    modules = load_modules()
    return modules, import_graph(modules)


def _layer(modules: dict[str, Module], name: str) -> int:
    folder = next(f for f, (_, _) in FOLDERS.items() if modules[name].path.is_relative_to(ROOT / f))
    return FOLDERS[folder][1]


def _where(modules: dict[str, Module], name: str, line: int) -> str:
    return f"{modules[name].path.relative_to(ROOT)}:{line}"


def test_graph_reader_resolves_relative_and_nested_imports() -> None:
    modules, graph = _package()
    # kernels/__init__.py: `from .api import attention` (relative, module level)
    assert "longreach.kernels.api" in graph["longreach.kernels"]
    # kernels/__init__.py imports lightning only inside its module-level __getattr__
    assert "longreach.kernels.lightning" in graph["longreach.kernels"]
    # every folder contributed modules, and every module was read
    layers = {_layer(modules, n) for n in modules}
    assert layers == {0, 1, 2, 3}
    assert sum(len(m.imports) for m in modules.values()) > 500


def test_no_import_cycles() -> None:
    modules, graph = _package()
    cycles = find_cycles(graph)
    lines = []
    for cycle in cycles:
        hops = [f"{a} ({_where(modules, a, graph[a][b])})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        lines.append(" -> ".join(hops + [cycle[0]]))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


def upward_imports(modules: dict[str, Module], graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import from a lower layer to a higher one, as ``file:line: …`` lines."""
    upward = []
    for name, deps in graph.items():
        src = _layer(modules, name)
        for dep, line in deps.items():
            dst = _layer(modules, dep)
            if dst > src:
                upward.append(f"{_where(modules, name, line)}: {LAYER_NAMES[src]} module {name} imports "
                              f"{LAYER_NAMES[dst]} module {dep}")
    return upward


def test_imports_point_down_the_stack() -> None:
    upward = upward_imports(*_package())
    assert not upward, "imports must point launchers -> framework -> parallel -> kernels:\n" + "\n".join(upward)


def test_layer_check_reports_a_planted_upward_import() -> None:
    modules = {n: Module(n, ROOT / path, False) for n, path in [
        ("longreach.kernels.x", "kernels/x.py"), ("longreach.parallel.y", "parallel/y.py"),
        ("longreach.z", "framework/z.py")]}
    graph = {"longreach.kernels.x": {"longreach.parallel.y": 3}, "longreach.parallel.y": {"longreach.kernels.x": 1},
             "longreach.z": {"longreach.parallel.y": 2}}
    assert upward_imports(modules, graph) == [
        "kernels/x.py:3: kernels module longreach.kernels.x imports parallel module longreach.parallel.y"]


def test_package_imports_no_test_code() -> None:
    modules, _ = _package()
    bad = []
    for mod in modules.values():
        for target, line, _ in mod.imports:
            if target.split(".")[0] in TEST_ROOTS:
                bad.append(f"{_where(modules, mod.name, line)}: {mod.name} imports {target}")
    assert not bad, "the installed package must not import pytest or tests/:\n" + "\n".join(bad)


def test_cycle_finder_reports_a_planted_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e2": 1}, "e2": {"e": 1}}
    cycles = sorted(find_cycles(graph))
    assert cycles == [["a", "b", "c"], ["e", "e2"]], cycles
