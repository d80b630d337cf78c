"""The import graph of ``src/gpufleet`` has no new circle. Every import counts, wherever it stands: one moved inside
a function, or under ``TYPE_CHECKING``, still ties the two modules together, so moving it does not dodge this test."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# None left. A circle that comes back, or a new one, fails the test.
KNOWN_CIRCLES: list[set[str]] = []


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The gpufleet modules that ``name`` imports: ``from a import b`` is module ``a.b`` where that is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {module for module in found if module in known and module != name}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_the_circle_finder_finds_a_circle_and_only_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert circles(graph) == [{"a", "b", "c"}]


def test_no_new_import_circle_in_src() -> None:
    known = modules()
    assert "gpufleet.worker.runtime" in known and "gpufleet.dev.local" in known  # the walk found the tree
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "gpufleet.dev.services" in graph["gpufleet.dev.local"]  # both import forms are read
    found = circles(graph)
    assert not [c for c in found if c not in KNOWN_CIRCLES], "a new or grown import circle: break it"
    assert not [c for c in KNOWN_CIRCLES if c not in found], "a known circle is gone: take it off KNOWN_CIRCLES"


def test_the_worker_and_the_triggers_never_import_each_other() -> None:
    # What both need of object stores (the key rules, the S3 client) is in gpufleet.aws.
    known = modules()
    crossing = {(name, to) for name, path in known.items() for to in imports(name, path, known)
                for a, b in (("gpufleet.worker", "gpufleet.triggers"), ("gpufleet.triggers", "gpufleet.worker"))
                if name.startswith(a) and to.startswith(b)}  # fmt: skip
    assert not crossing
