"""edge/ is grouped in rooms (edge/__init__.py): this walks every module's own import statements (top-level and
inside functions alike, so a late import cannot hide a cycle) and fails on an import cycle between files, on a room
importing a room above it, and on a module its room's docstring does not name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

EDGE = Path(__file__).resolve().parents[2] / "edge"

# room -> the rooms it may import (besides itself and anything outside edge)
ALLOWED = {
    "llamacpp": set(),
    "policy": set(),
    "export": {"llamacpp"},
    "backends": {"llamacpp", "export"},
    "sdk": {"backends", "policy"},
    "apps": {"sdk", "backends", "policy", "export", "llamacpp"},
}
SUBPACKAGES = ("llamacpp", "policy", "export", "backends", "apps")


def module_name(path: Path) -> str:
    parts = path.relative_to(EDGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "sdk"


MODULES = {module_name(p): p for p in EDGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The edge modules a file imports: `import edge.x.y`, `from edge.x import y` (y a module, else edge.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "edge"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "edge":
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs or {node.module}
    return {m for m in out if m in MODULES}


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_the_walk_sees_the_imports():
    assert "edge.run" in GRAPH["edge.client"] and "edge.lossless" in GRAPH["edge.client"]
    assert "edge.run" in GRAPH["edge.lossless"]
    assert "edge.policy.calibrate" in GRAPH["edge.client"]  # a function-level import counts too


def test_no_room_imports_a_room_above_it():
    bad = [f"{a} ({room(a)}) imports {b} ({room(b)})" for a, deps in GRAPH.items() for b in deps
           if room(b) != room(a) and room(b) not in ALLOWED[room(a)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_files():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("package", ["edge", *(f"edge.{p}" for p in SUBPACKAGES)])
def test_each_room_says_what_it_holds(package):
    doc = importlib.import_module(package).__doc__ or ""
    here = EDGE if package == "edge" else EDGE / package.split(".")[1]
    names = [p.stem for p in here.glob("*.py") if p.stem != "__init__"]
    if package == "edge":
        names += list(SUBPACKAGES)
    missing = [n for n in names if f"`{n}`" not in doc and f"`edge.{n}`" not in doc]
    assert not missing, f"{package}'s docstring does not name {missing}"
