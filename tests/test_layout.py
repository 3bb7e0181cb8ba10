"""The package's import graph: no cycle, and data flows one way (docs/architecture.md).

The graph is read from the source (every ``import`` statement, inside functions and
``TYPE_CHECKING`` blocks too), not from what happens to be imported at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sparse_lightning

PACKAGE = Path(sparse_lightning.__file__).resolve().parent

#: The layers of the package, lowest first: a module may import from its own layer or below.
LAYERS = (
    ("version", "units"),
    ("architectures",),
    ("attribution",),
    ("checkpoint", "data"),
    ("selection",),
    ("kernels",),
    ("inference",),
    ("models",),
    ("module",),
    ("calibration", "evaluation", "lmeval"),
    ("recipe",),
    ("cli",),
    ("",),  # the package root, sparse_lightning/__init__.py
)


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("sparse_lightning", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import submodule`` depends on the submodule itself.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names
                ]
            graph[name].update(t for t in targets if t in names and t != name)
    return graph


def layer_of(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert "sparse_lightning.units" in graph["sparse_lightning.architectures.resolver"]
    assert "sparse_lightning.module" in graph["sparse_lightning.calibration"]
    assert len(graph) > 30


def test_no_import_cycle_among_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_only_go_down_the_layers():
    every_module_has_a_layer = {name: layer_of(name) for name in module_names()}
    upward = [
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        for target in targets
        if layer_of(target) > every_module_has_a_layer[name]
    ]
    assert not upward, upward
