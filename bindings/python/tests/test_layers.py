"""The Python package's layering (docs/architecture.md): its modules import each other without
a circle, and only ``calibrl._abi`` defines ctypes structures (the package's and the
benchmarks' code imports them from there)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "bindings" / "python" / "calibrl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The package modules that ``path`` imports (anywhere in the file, relative or absolute)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("calibrl"):
                continue
            found.add(target)
            # `from . import ops` names a module, not an attribute.
            for alias in node.names:
                if (PACKAGE.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").exists():
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("calibrl"))
    return found - {me}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    names = {_module_name(f) for f in files}
    # A package's __init__ imports its submodules; an edge into a package is an edge to its
    # __init__, so only the edges between non-package modules form circles worth reporting.
    return {_module_name(f): {t for t in _imports(f) if t in names} for f in files}


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            if nxt in ("calibrl", "calibrl.integrations"):
                continue  # importing a package's __init__ (see _graph)
            circle = visit(nxt, stack + [node])
            if circle:
                return circle
        done.add(node)
        return None

    for start in sorted(graph):
        circle = visit(start, [])
        if circle:
            return circle
    return None


def test_package_modules_import_without_a_circle():
    assert _find_circle(_graph()) is None, " → ".join(_find_circle(_graph()) or [])


def test_the_circle_finder_finds_one():
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_circle({"a": {"b"}, "b": set()}) is None


def test_only_abi_defines_ctypes_structures():
    owners = []
    for path in sorted(list(PACKAGE.rglob("*.py")) + list((ROOT / "benchmarks").glob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(b) in ("ctypes.Structure", "Structure", "ctypes.Union") for b in node.bases
            ):
                owners.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert owners and all(o.startswith("bindings/python/calibrl/_abi.py:") for o in owners), owners
