"""bs_kernels' layout, checked on the source: imports (lazy ones and importlib strings included) only run downward
and form no cycle. tests/driver/test_layers.py checks bs_unlearn the same way."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "bs_kernels"

# bs_kernels' layers, lowest first; a module may import from its own layer and the ones before it.
LAYERS = [
    {"_options", "_dtypes"},
    # native_build: the C++ kernel's build and cache; triton_plan: which Triton kernel a launch takes
    {"_rows", "backends.contract", "backends.native_build", "backends.triton_plan"},
    {"backends.torch_chunked", "backends.native", "backends.triton_kernels", "backends.triton_launch"},
    {"backends"},  # the registry: imports the backends above by name, lazily
    {"epilogue"},
    {"reference", "autograd", "_chunks", "_weight_grad"},
    {"one_pass"},  # the native one-pass gradient: loss.py and linear.py use it
    {"_vocab_call"},
    {"_vocab_shards"},
    {"_vocab_checks"},  # a rank's local checks, then the agreement step: before any other collective
    {"vocab_parallel"},
    {"dtensor"},  # loss.py and linear.py dispatch a DTensor to it
    {"loss"},
    {"linear"},
    {"hf"},
    {""},  # the package itself: the public API
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def module_name(path: pathlib.Path) -> str:
    """The dotted name: "backends.contract" for backends/contract.py, "backends" for its __init__, "" for the root."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _known(dotted: str) -> str | None:
    """The bs_kernels module a dotted name (relative to the package) names, or None (a function, a class)."""
    return dotted if dotted in MODULES else None


def imports_of(name: str) -> set[str]:
    """The bs_kernels modules ``name`` imports anywhere in its source: top-level, inside functions, or by a string
    passed to importlib (the backend registry and the Triton launcher load their modules that way)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [part for part in package if part]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module and (node.module == "bs_kernels" or node.module.startswith("bs_kernels.")):
                target = node.module.removeprefix("bs_kernels").removeprefix(".")
            else:
                continue
            for alias in node.names:  # "from . import _options": the submodule itself
                submodule = _known(f"{target}.{alias.name}".lstrip("."))
                found.add(submodule if submodule is not None else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "bs_kernels" or alias.name.startswith("bs_kernels."):
                    found.add(alias.name.removeprefix("bs_kernels").removeprefix("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("bs_kernels."):
            dotted = node.value.removeprefix("bs_kernels.")
            if _known(dotted) is not None:
                found.add(dotted)
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a list of module names."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_and_string_imports():
    """The parser itself: the edges that made the old loop (lazy imports) and the registry's strings are found."""
    assert "dtensor" in GRAPH["loss"] and "dtensor" in GRAPH["linear"]
    assert {"backends.torch_chunked", "backends.native", "backends.triton_launch"} <= GRAPH["backends"]
    assert "backends.triton_kernels" in GRAPH["backends.triton_launch"]
    assert "_options" in GRAPH["loss"]  # "from . import _options as opts"


def test_cycles_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("name", sorted(MODULES), ids=lambda name: name or "bs_kernels")
def test_imports_only_downward(name):
    assert name in LAYER_OF, f"bs_kernels.{name} has no layer in this test"
    for target in GRAPH[name]:
        assert LAYER_OF[target] <= LAYER_OF[name], f"{name or 'bs_kernels'} imports {target} from a higher layer"
