"""Layers point one way: the library imports no ZenML, steps or pipelines (the console entry point excepted), and no
two ``hilight`` subpackages or modules import each other, directly or lazily."""

import ast
from pathlib import Path

HILIGHT = Path(__file__).resolve().parents[1] / "hilight"


def _unit(path: Path) -> str:
    """``hilight/train/loop.py`` -> ``train``; ``hilight/tracking.py`` -> ``tracking``."""
    rel = path.relative_to(HILIGHT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, lazy ones inside functions included
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_imports_no_orchestration():
    offenders = [f"{p.relative_to(HILIGHT.parent)} imports {m}" for p in HILIGHT.rglob("*.py") if p.name != "cli.py"
                 or p.parent != HILIGHT for m in _imports(p) if m.split(".")[0] in {"zenml", "steps", "pipelines"}]
    assert not offenders, offenders


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for path in HILIGHT.rglob("*.py"):
        unit = _unit(path)
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] == "hilight" and len(parts) > 1 and parts[1] != unit:
                graph.setdefault(unit, set()).add(parts[1])
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in graph.get(b, set()))
    assert not cycles, f"subpackages import each other: {cycles}"

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    loops = sorted(u for u in graph if u in reach(u) and u != "cli")
    assert not loops, f"import loops through: {loops}"
