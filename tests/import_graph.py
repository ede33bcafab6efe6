"""The project's import graph, read from the source with `ast` (no module is imported): the cycle
check the structure tests share."""

from __future__ import annotations

import ast
from pathlib import Path


def import_cycles(package_dir: Path, package: str) -> list[list[str]]:
    """Cycles among the modules of ``package`` (a directory of .py files), from every import
    statement (function-level ones too). Importing ``a.b.c`` also runs the ``__init__`` of each
    package on the way that is not already a parent of the importer, so those count as edges."""
    modules: dict[str, Path] = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir).with_suffix("").parts
        name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
        modules[name] = path

    def resolve(importer: str, node: ast.AST) -> set[str]:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = importer if modules[importer].name == "__init__.py" else importer.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        out = set()
        for n in names:
            parts = n.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package on the way to it
                m = ".".join(parts[:i])
                if m in modules and m != importer and not importer.startswith(m + "."):
                    out.add(m)
        return out

    graph = {
        m: set().union(*(resolve(m, n) for n in ast.walk(ast.parse(p.read_text()))))
        for m, p in modules.items()
    }
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles
