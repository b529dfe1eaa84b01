"""The project's import graph, read from the source (no imports executed).

Every `import` counts, at module level or inside a function (a function-level import that only
hides a cycle is still a cycle); imports under `if TYPE_CHECKING:` do not, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, here: str, is_package: bool, known: set[str]) -> set[str]:
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        # The longest known module that `name` is or lies inside.
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := resolve(alias.name)) is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here if is_package else here.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                if target is not None:
                    found.add(target)
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    visit(tree)
    found.discard(here)
    return found


def graph(packages: list[str]) -> dict[str, set[str]]:
    files = [p for pkg in packages for p in (ROOT / pkg).rglob("*.py") if "migrations" not in p.parts]
    known = {module_name(p) for p in files}
    return {
        module_name(p): _imports(ast.parse(p.read_text()), module_name(p), p.name == "__init__.py", known)
        for p in files
    }


def cycles(packages: list[str], *, within: str) -> list[list[str]]:
    """Strongly connected components (size > 1) among the modules under `within`."""
    g = {
        m: {t for t in ts if t.startswith(within)}
        for m, ts in graph(packages).items()
        if m.startswith(within)
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


if __name__ == "__main__":
    import sys

    apps = sys.argv[1:] or ["fleetops", "curtailment", "migrations_app", "indexer"]
    for app in apps:
        for comp in cycles(["fleetops", "curtailment", "migrations_app", "indexer"], within=app):
            print(f"{app}: cycle among {', '.join(comp)}")  # noqa: T201
