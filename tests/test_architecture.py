"""The package's layers (docs/architecture.md): no import cycle, none hidden inside a
function, and no import from a later layer; inside lrpjax.core, each module imports only
the ones before it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lrpjax

PACKAGE = Path(lrpjax.__file__).parent

#: Sub-packages and modules by layer: a module imports from its own layer or earlier ones.
LAYERS = (
    ("core",),
    ("models", "zoo", "data", "viz"),
    ("analysis",),
    ("runs",),
    ("bench", "peers"),
    ("commands",),
)

#: lrpjax.core's modules, each importing only ones before it (`lrpjax.core`'s docstring).
CORE_ORDER = (
    "layers", "layer_types", "rules", "jaxprs", "glue", "tracing", "canonizers", "composites",
    "structure", "checks", "compilation", "linen", "engine",
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported lrpjax module, whether the import is inside a function) for each import."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [m for m in subs if m in MODULES] or [node.module]
        else:
            continue
        found += [(n, id(node) not in top) for n in names if n.split(".")[0] == "lrpjax"]
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # the package itself: the public API, above every layer
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        _layer(module)  # StopIteration for a module outside the layers


@pytest.mark.parametrize("module", [m for m in MODULES if m != "lrpjax"])
def test_imports_go_down_the_layers_and_none_hide_in_functions(module):
    for imported, local in _imports(MODULES[module]):
        assert not local, f"{module} imports {imported} inside a function"
        assert _layer(imported) <= _layer(module), f"{module} imports {imported}, above it"


def test_no_import_cycles():
    graph = {m: {i for i, _ in _imports(p) if i in MODULES} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: tuple[str, ...]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError(" -> ".join((*trail[trail.index(n) :], m, n)))
            if n not in state:
                visit(n, (*trail, m) if n not in trail else trail)
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, ())


def test_core_modules_import_only_the_ones_before_them():
    core = PACKAGE / "core"
    assert {p.stem for p in core.glob("*.py")} - {"__init__"} == set(CORE_ORDER)
    for i, name in enumerate(CORE_ORDER):
        imported = {
            m.split(".")[2] if m.startswith("lrpjax.core.") else m
            for m, _ in _imports(core / f"{name}.py")
        }
        allowed = set(CORE_ORDER[:i])
        assert imported <= allowed, (name, imported - allowed)
