"""The house rules of the code base, read off its source: the import graph reads top-down (no cycle, no
import from a lower layer up to a higher one), ``models/`` imports nothing outside itself, and no product
module edits Python's module search path (the project is installed with ``pip install -e .``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Layers, bottom first: a module imports from its own layer and the ones below it only.
LAYERS = (
    ("utils",),
    ("models",),
    ("dataloaders",),
    ("data",),
    ("engine",),
    ("inference",),
    ("config",),
    ("launcher",),  # resolves each run's config through config/; train.py never imports it
    ("train", "test", "segment", "script", "benchmarks"),
)


def _product_modules() -> dict[str, Path]:
    """Dotted name → file of every Python module of the project: the top-level modules, the packages at the
    top (folders with an ``__init__.py``) and ``script/``; tests and run outputs are not the product."""
    roots = [p for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file() and p.name != "tests"]
    files = [p for p in REPO.glob("*.py")] + [
        f for root in [*roots, REPO / "script"] for f in root.rglob("*.py")
    ]
    modules = {}
    for path in files:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _product_modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports at import time (``if TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
                continue  # imports inside functions run later, not at import time
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            else:
                visit(child)

    visit(tree)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    top = name.split(".")[0]
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"module {name} belongs to no layer of tests/test_layout.py: add it to LAYERS")


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        _layer(name)


def test_no_import_goes_up_a_layer() -> None:
    upward = [
        f"{name} imports {other}"
        for name, deps in GRAPH.items()
        for other in deps
        if _layer(other) > _layer(name)
    ]
    assert upward == []


def test_models_import_nothing_outside_models() -> None:
    models = {name: deps for name, deps in GRAPH.items() if name.split(".")[0] == "models"}
    assert {
        name: sorted(d for d in deps if d.split(".")[0] != "models") for name, deps in models.items()
    } == {name: [] for name in models}


def test_no_import_cycle() -> None:
    """Depth-first search over the module graph (a package counts as its ``__init__``)."""
    state: dict[str, int] = {}
    cycles = []

    def walk(name: str, stack: list[str]) -> None:
        state[name] = 1
        for other in sorted(GRAPH[name]):
            if state.get(other) == 1:
                cycles.append(" -> ".join([*stack[stack.index(other) :], other]))
            elif other not in state:
                walk(other, [*stack, other])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_no_module_search_path_edits() -> None:
    edit = re.compile(r"\bsys\s*\.\s*path\b")
    assert [str(path) for path in MODULES.values() if edit.search(path.read_text())] == []
