"""The package layout rules, checked on the source: imports only run downward, private names stay in their module."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
APP = ROOT / "python" / "bs_unlearn"
KERNELS = ROOT / "bs_kernels"

# bs_unlearn's layers, lowest first; a module may import from its own layer and the ones before it.
LAYERS = [
    {"data", "models", "outputs", "tiny_model"},
    {"config"},
    {"scoring", "metrics"},
    {"objectives"},
    {"beliefs", "trainer", "probe", "plotting"},
    {"experiment"},
    {"commands", "cli", "integrations"},
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def _imports(path: pathlib.Path):
    """(imported module parts relative to the package, imported names) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package_parts = path.relative_to(APP).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("bs_unlearn"):
                target = node.module.split(".")[1:]
            else:
                yield node.module or "", [alias.name for alias in node.names], False
                continue
            yield target, [alias.name for alias in node.names], True
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], False


def _top(path: pathlib.Path) -> str:
    return path.relative_to(APP).parts[0].removesuffix(".py")


APP_FILES = sorted(p for p in APP.rglob("*.py") if p.name != "__init__.py" or p.parent != APP)


@pytest.mark.parametrize("path", APP_FILES, ids=lambda p: str(p.relative_to(APP)))
def test_bs_unlearn_imports_only_downward(path):
    layer = LAYER_OF[_top(path)]
    for target, names, internal in _imports(path):
        if not internal:
            continue
        if not target:  # "from . import x" at the package root
            target = names[:1]
        module = target[0]
        assert LAYER_OF[module] <= layer, f"{path.relative_to(APP)} imports {'.'.join(target)} from a higher layer"


@pytest.mark.parametrize("path", APP_FILES, ids=lambda p: str(p.relative_to(APP)))
def test_no_private_name_crosses_a_module(path):
    """Neither a ``_name`` nor a ``_module`` of bs_unlearn or bs_kernels is imported by another module."""
    for target, names, internal in _imports(path):
        parts = target if internal else target.split(".")
        if not internal and parts[0] != "bs_kernels":
            continue  # third-party packages are theirs to organise
        private = [name for name in names if name.startswith("_")] + [p for p in parts if p.startswith("_")]
        assert not private, f"{path.relative_to(APP)} imports private {private} from {'.'.join(parts)}"


def test_bs_kernels_never_imports_bs_unlearn():
    for path in KERNELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            assert not any(m.startswith("bs_unlearn") for m in modules), f"{path} imports bs_unlearn"


def test_every_module_has_a_layer():
    tops = {_top(path) for path in APP_FILES}
    assert tops <= set(LAYER_OF), f"modules without a layer in this test: {sorted(tops - set(LAYER_OF))}"
