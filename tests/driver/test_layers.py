"""The package layout rules, checked on the source: imports only run downward, private names stay in their module."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
APP = ROOT / "python" / "bs_unlearn"
KERNELS = ROOT / "bs_kernels"

# bs_unlearn's layers, lowest first; a module may import from its own layer and the ones before it. A package's
# modules are layered too ("metrics.tofu"): a package name alone ("objectives") stands for all of its modules.
LAYERS = [
    {"prompts"},
    {"data", "loss_guard", "models", "outputs", "tiny_model", "tofu_data", "tofu_source"},
    {"config"},
    {"scoring", "generation", "fused", "step_timing"},
    {"metrics.tofu", "metrics.intervals"},
    {"metrics.paper", "metrics.leak"},
    {"metrics.evaluation", "metrics.table"},
    {"metrics"},  # the package's __init__: its public names
    {"objectives"},
    {"beliefs", "trainer", "probe", "plotting"},
    {"experiment.progress", "experiment.settings", "experiment.run_specs", "experiment.profile"},
    {"experiment.model_cache"},
    {"experiment.finetune_stage", "experiment.belief_band_stage", "experiment.unlearn_stage"},
    {"experiment.evaluate_stage", "experiment.matched_stage", "experiment.tables"},
    {"experiment.seed_tables"},
    {"experiment.results"},
    {"experiment.comparison"},
    {"experiment"},
    {"commands.base", "commands.config_args"},
    {"commands.compare_methods"},
    {"commands.finetune", "commands.unlearn", "commands.evaluate", "commands.compare"},
    {"commands.demo", "commands.tofu"},
    {"commands", "cli"},
    {"integrations"},
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}
LAYERED_PACKAGES = {"metrics", "experiment", "commands"}
# Commands are siblings: what two of them share goes to a lower module, never from one command to another.
SIBLINGS = ("commands.finetune", "commands.unlearn", "commands.evaluate", "commands.compare", "commands.demo")
SIBLINGS += ("commands.tofu",)


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


def _layer_name(parts) -> str:
    """The most specific name of LAYER_OF that a module (its parts relative to the package) falls under."""
    parts = [part.removesuffix(".py") for part in parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    for length in range(len(parts), 0, -1):
        name = ".".join(parts[:length])
        # In a package layered module by module, every module has its own entry (a new one must be placed).
        if name in LAYER_OF and (length == len(parts) or parts[0] not in LAYERED_PACKAGES):
            return name
    return ".".join(parts)


def _top(path: pathlib.Path) -> str:
    return _layer_name(path.relative_to(APP).parts)


APP_FILES = sorted(p for p in APP.rglob("*.py") if p.name != "__init__.py" or p.parent != APP)


@pytest.mark.parametrize("path", APP_FILES, ids=lambda p: str(p.relative_to(APP)))
def test_bs_unlearn_imports_only_downward(path):
    name = _top(path)
    layer = LAYER_OF[name]
    for target, names, internal in _imports(path):
        if not internal:
            continue
        if not target:  # "from . import x" at the package root
            target = names[:1]
        module = _layer_name(target)
        if module not in LAYER_OF and len(target) > 1:  # "from .pkg import module"
            module = _layer_name(target[:-1])
        assert LAYER_OF[module] <= layer, f"{path.relative_to(APP)} imports {'.'.join(target)} from a higher layer"
        if name in SIBLINGS and module in SIBLINGS:
            assert module == name, f"{path.relative_to(APP)} imports from the command {module}: share it lower down"


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


def _module_of(parts) -> str | None:
    """The file a dotted target names (a module, or a package's __init__), as a path relative to the package."""
    for candidate in (APP.joinpath(*parts).with_suffix(".py"), APP.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return str(candidate.relative_to(APP))
    return None


def test_bs_unlearn_has_no_import_loop():
    """No chain of imports (module-level or inside a function) leads from a module back to itself; a package's
    __init__ importing its own modules is the one edge left out (they are loaded through it by design)."""
    graph: dict[str, set[str]] = {}
    for path in APP_FILES:
        name = str(path.relative_to(APP))
        edges = graph.setdefault(name, set())
        for target, names, internal in _imports(path):
            if not internal:
                continue
            found = [_module_of(target + [n]) for n in names] if target else []
            found = [f for f in found if f] or [_module_of(target or names[:1])]
            for module in filter(None, found):
                if path.name == "__init__.py" and module.startswith(str(path.parent.relative_to(APP)) + "/"):
                    continue
                if module != name:
                    edges.add(module)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join(trail[trail.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
