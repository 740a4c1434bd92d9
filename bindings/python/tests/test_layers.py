"""The Python package's layering (docs/architecture.md): its modules import each other without
a circle and only from the layers under them, every name is imported from the module that
defines it (no module passes on a name it imported: one name for each thing), and only
``calibrl._abi`` defines ctypes structures (the package's and the benchmarks' code imports them
from there).

``CALIBRL_LAYERS_ROOT`` points the checks at another checkout (to see them fail on an older
revision: ``git archive REV bindings benchmarks | tar -x -C /tmp/old``, then run this file with
``CALIBRL_LAYERS_ROOT=/tmp/old``)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(os.environ.get("CALIBRL_LAYERS_ROOT") or Path(__file__).resolve().parents[3])
PACKAGE = ROOT / "bindings" / "python" / "calibrl"

# The package's layers, bottom first: a module imports only from layers under its own. A new
# module gets a place here (the test fails until it has one). The packages' ``__init__`` files
# are the public facade on top and are not listed: no module imports names from them.
LAYERS = [
    {"calibrl._abi", "calibrl._errors"},
    {"calibrl._lib", "calibrl._dlpack"},
    {"calibrl.config"},
    {"calibrl.ops"},
    {"calibrl.plan", "calibrl.linear"},
    {"calibrl.autograd", "calibrl.custom_ops"},
    {"calibrl.linear_autograd"},
    {"calibrl.integrations._common"},
    {"calibrl.integrations.deepspeed", "calibrl.integrations.megatron",
     "calibrl.integrations.trl", "calibrl.integrations.verl"},
    {"calibrl.integrations.verl_main"},
]
PACKAGES = {"calibrl", "calibrl.integrations"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _target(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from … import`` in ``path`` reads from."""
    if not node.level:
        return node.module or ""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


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
            # `from . import ops` names a module, not an attribute of the package.
            for alias in node.names:
                if _is_module(f"{target}.{alias.name}"):
                    found.add(f"{target}.{alias.name}")
                else:
                    found.add(target)
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


def _arrows_up(graph: dict[str, set[str]]) -> list[str]:
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    wrong = [f"{m}: no layer in LAYERS (test_layers.py)" for m in graph if m not in level and m not in PACKAGES]
    for m, targets in sorted(graph.items()):
        if m in PACKAGES or m not in level:
            continue
        for t in sorted(targets):
            if t in PACKAGES or level.get(t, -1) >= level[m]:
                wrong.append(f"{m} imports {t}, which is not under it")
    return wrong


def _borrowed(path: Path) -> dict[str, str]:
    """The names a module binds by importing them from another package module (not a
    submodule), name → the module it came from, less those its ``__all__`` publishes (a
    drop-in's API may include a helper it shares with the others)."""
    out = {}
    tree = ast.parse(path.read_text())
    public = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(ast.unparse(t) == "__all__" for t in node.targets):
            public = set(ast.literal_eval(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _target(path, node)
            if target.startswith("calibrl"):
                for alias in node.names:
                    name = alias.asname or alias.name
                    if not _is_module(f"{target}.{alias.name}") and name not in public:
                        out[name] = target
    return out


def _module_file(name: str) -> Path:
    path = PACKAGE.parent / name.replace(".", "/")
    return path / "__init__.py" if (path / "__init__.py").exists() else path.with_suffix(".py")


def _second_names(sources: list[tuple[Path, str]]) -> list[str]:
    """Uses of a name through a module that only imported it (``from calibrl._lib import
    DLTensor``, ``_lib.DLTensor`` after ``from calibrl import _lib``). The packages' __init__
    files are the public facade and may pass names on."""
    borrowed = {m: _borrowed(_module_file(m)) for m in _graph() if m not in PACKAGES}
    found = []
    for path, text in sources:
        tree = ast.parse(text)
        aliases = {}  # local name → package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _target(path, node) if path.is_relative_to(PACKAGE) else node.module or ""
                for alias in node.names:
                    if target in borrowed and alias.name in borrowed[target]:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {alias.name} from {target} "
                                     f"(defined in {borrowed[target][alias.name]})")
                    if _is_module(f"{target}.{alias.name}"):
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in borrowed:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                module = ast.unparse(node.value)
                module = aliases.get(module, module)
                if module in borrowed and node.attr in borrowed[module]:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module}.{node.attr} "
                                 f"(defined in {borrowed[module][node.attr]})")
    return sorted(found)


def _python_files() -> list[Path]:
    dirs = [ROOT / "bindings" / "python", ROOT / "benchmarks", ROOT / "integration", ROOT / "examples"]
    return sorted(p for d in dirs if d.exists() for p in d.rglob("*.py"))


def test_package_modules_import_only_from_layers_under_them():
    assert _arrows_up(_graph()) == []


def test_every_name_is_imported_from_the_module_that_defines_it():
    assert _second_names([(p, p.read_text()) for p in _python_files()]) == []


def test_the_layer_checks_see_a_violation():
    assert _arrows_up({"calibrl._abi": {"calibrl.ops"}, "calibrl.ops": set()}) == [
        "calibrl._abi imports calibrl.ops, which is not under it"
    ]
    assert _arrows_up({"calibrl.ops": {"calibrl"}}) == ["calibrl.ops imports calibrl, which is not under it"]
    assert _arrows_up({"calibrl.new": set()}) == ["calibrl.new: no layer in LAYERS (test_layers.py)"]
    # `ops` imports `Normalizers` from `_abi`: reading it through `ops` is a second name;
    # `ops.loss` (defined there) and `ops._abi` (a module) are not.
    probe = PACKAGE / "integrations" / "probe.py"
    text = "from .. import ops\nfrom ..ops import Normalizers, loss\nops.Normalizers\nops.loss\nops._abi\n"
    assert _second_names([(probe, text)]) == [
        "bindings/python/calibrl/integrations/probe.py:2: Normalizers from calibrl.ops (defined in calibrl._abi)",
        "bindings/python/calibrl/integrations/probe.py:3: calibrl.ops.Normalizers (defined in calibrl._abi)",
    ]


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
