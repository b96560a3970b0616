"""Print figures of the code's structure: lines per package, the longest functions,
and the import graph between rampart's modules (every import, lazy ones too).

    python3 scripts/structure.py [--json] [SRC]      (SRC defaults to src/rampart)

Used for the before/after figures of a restructuring; it reads the files as text and
runs none of them.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", default="src/rampart", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--longest", type=int, default=10, help="how many functions")
    args = parser.parse_args()
    root: Path = args.src.resolve()
    files = sorted(p for p in root.rglob("*.py") if "migrations" not in p.parts)
    modules = {module_name(root, p): p for p in files}

    lines: dict[str, int] = defaultdict(int)
    functions: list[tuple[int, str]] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        text = path.read_text()
        rel = path.relative_to(root)
        package = rel.parts[0] if len(rel.parts) > 1 else rel.name
        lines[package] += len(text.splitlines())
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{rel}:{node.lineno} {node.name}"))
        for target in imported(tree, name, path.name == "__init__.py"):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != root.name:
                graph[name].add(target)

    functions.sort(key=lambda item: (-item[0], item[1]))

    def package_of(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    package_edges = sorted(
        {(package_of(a), package_of(b)) for a, targets in graph.items() for b in targets}
        - {(x, x) for x in map(package_of, graph)}
    )
    found = cycles(graph)
    result: dict[str, Any] = {
        "lines_per_package": dict(sorted(lines.items(), key=lambda kv: -kv[1])),
        "total_lines": sum(lines.values()),
        "modules": len(modules),
        "longest_functions": [{"lines": n, "where": w} for n, w in functions[: args.longest]],
        "import_edges": sum(len(t) for t in graph.values()),
        "package_edges": [f"{a} -> {b}" for a, b in package_edges],
        "cycles": found,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    show(result, args.longest)
    return 0


def show(result: dict[str, Any], longest: int) -> None:
    print(f"{result['total_lines']} lines in {result['modules']} modules")
    for package, count in result["lines_per_package"].items():
        print(f"  {count:6d}  {package}")
    print(f"the {longest} longest functions:")
    for item in result["longest_functions"]:
        print(f"  {item['lines']:5d}  {item['where']}")
    print(f"import edges between modules: {result['import_edges']}")
    edges = result["package_edges"]
    print(f"import edges between packages (top-level modules count as one): {len(edges)}")
    for edge in edges:
        print(f"  {edge}")
    print(f"import cycles: {len(result['cycles'])}")
    for component in result["cycles"]:
        print("  " + " <-> ".join(component))


if __name__ == "__main__":
    sys.exit(main())
