"""Find import cycles between qtool's modules, statically (nothing is imported).

Every ``import`` and ``from ... import`` counts wherever it stands, inside functions included:
a function-level import is how a cycle hides, and it still makes the two modules depend on each
other. ``from qtool.pkg import name`` is an edge to ``qtool.pkg.name`` when that is a module, else
to ``qtool.pkg``; ``importlib.import_module("qtool.x")`` with a literal name counts too. Imports
under ``if TYPE_CHECKING:`` are left out: they never run.

Usage: python scripts/import_cycles.py [ROOT]   (ROOT: the folder holding the qtool package,
default this repository). Prints each cycle and exits 1 if there is any, else exits 0.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "qtool"


@dataclass(frozen=True)
class ImportEdge:
    importer: str
    imported: str
    path: Path
    line: int


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([target] if target else [])])


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts))}


def module_imports(module: str, path: Path, known: dict[str, Path]) -> list[ImportEdge]:
    """The edges from ``module`` to other modules of ``known``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges = []

    own_packages = _ancestors(module) | ({module} if is_package else set())

    def add(target: str, line: int) -> None:
        # The deepest known module the dotted name names ("qtool.a.b.Class" -> "qtool.a.b").
        while target and target not in known:
            target = target.rpartition(".")[0]
        if not target:
            return
        # Importing qtool.a.b runs qtool/a/__init__.py first, unless it already runs above this module.
        for imported in sorted((_ancestors(target) | {target}) - own_packages - {module}):
            if imported in known:
                edges.append(ImportEdge(module, imported, path, line))

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                    else node.module or "")
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node.lineno)
    unique = {}
    for edge in edges:
        unique.setdefault(edge.imported, edge)     # the first statement that imports it
    return list(unique.values())


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, list[ImportEdge]]:
    known = module_files(root, package)
    return {module: module_imports(module, path, known) for module, path in known.items()}


def _strongly_connected(graph: dict[str, list[ImportEdge]]) -> list[list[str]]:
    """Tarjan's components with more than one module, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted({edge.imported for edge in graph[start]})))]
        index[start] = lowlink[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted({edge.imported for edge in graph[successor]}))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
                if lowlink[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def _shortest_cycle(graph: dict[str, list[ImportEdge]], component: list[str]) -> list[ImportEdge]:
    """A shortest cycle through the component's first module, as the import statements that make it."""
    members = set(component)
    start = component[0]
    previous: dict[str, ImportEdge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.imported not in members or edge.imported in previous:
                    continue
                previous[edge.imported] = edge
                if edge.imported == start:
                    cycle = [edge]
                    while cycle[0].importer != start:
                        cycle.insert(0, previous[cycle[0].importer])
                    return cycle
                following.append(edge.imported)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its own component")


def find_cycles(root: Path, package: str = PACKAGE) -> list[list[ImportEdge]]:
    """One cycle (a list of import edges, the last one back to the first module) per group of
    modules that import each other, directly or through others."""
    graph = import_graph(root, package)
    return [_shortest_cycle(graph, component) for component in _strongly_connected(graph)]


def describe(cycle: list[ImportEdge], root: Path) -> str:
    steps = [cycle[0].importer]
    for edge in cycle:
        steps.append(f"-> {edge.imported} ({edge.path.relative_to(root)}:{edge.line})")
    return " ".join(steps)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    cycles = find_cycles(root)
    for cycle in cycles:
        print(f"import cycle: {describe(cycle, root)}")
    if cycles:
        print(f"{len(cycles)} import cycle(s) between {PACKAGE} modules; move what both sides need into a "
              "leaf module (constants, errors) or pass it in as an argument", file=sys.stderr)
        return 1
    print(f"no import cycles between {PACKAGE} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
