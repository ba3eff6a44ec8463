"""The package's shape holds: no private name imported across modules, no import cycle, layers point one way.

Read from the source with `ast` (nothing is imported), so a violation names the module and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mixtral"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str, int]]:
    """(module imported, name imported or "", line) for every mixtral import of a module, at any depth."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mixtral":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append(
                    (sub, "", node.lineno) if sub in MODULES else (node.module, alias.name, node.lineno)
                )
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "mixtral"]
    return found


def _top_level_imports(name: str) -> set[str]:
    """Modules imported when `name` is imported (module level, not inside functions)."""
    tree = ast.parse(MODULES[name].read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mixtral":
            out |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            }
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mixtral"}
    return out


def test_the_package_is_found():
    assert {"mixtral", "mixtral.model.transformer", "mixtral.kernels.policy", "mixtral.cli"} <= set(MODULES)


def test_no_private_name_is_imported_from_another_module():
    bad = [
        f"{name}:{line} imports {name_} from {module}"
        for name in MODULES
        for module, name_, line in _imports(name)
        if name_.startswith("_") and module != name
    ]
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (module-level imports), or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _with_packages(modules: set[str]) -> set[str]:
    """Importing mixtral.a.b imports the package mixtral.a first (the root package is left out: it
    only re-exports the public API)."""
    out = set(modules)
    for m in modules:
        parts = m.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts))}
    return out


def test_no_import_cycle_between_modules():
    # A module's own ancestors are being imported already when it runs: not edges.
    graph = {
        name: {
            m for m in _with_packages(_top_level_imports(name)) if m != name and not name.startswith(m + ".")
        }
        for name in MODULES
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# Which subpackages each layer may import (besides itself, config and errors); see docs/architecture.md.
ALLOWED = {
    "model": set(),
    "kernels": {"model"},
    "quant": {"model", "kernels"},
    "text": set(),
    "checkpoint": {"model", "kernels", "quant", "text", "atomic"},
    "inference": {"model", "text"},
    "data": {"text", "atomic"},
    "eval": {"model", "text", "data", "inference"},
    "train": {"model", "checkpoint", "text", "data", "eval", "atomic", "parallel"},
    "parallel": {"model"},
    "analysis": {"model", "checkpoint", "text", "data", "eval", "atomic"},
    "offload": {"model", "kernels", "quant", "checkpoint"},
    "serve": {"inference", "text"},  # never model/ or torch: the engine is behind inference/
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_lies_below_them(layer):
    base = {"mixtral.config", "mixtral.errors"}
    bad = []
    for name in (n for n in MODULES if n.split(".")[1:2] == [layer]):
        for module, _, line in _imports(name):
            top = module.split(".")[1] if module.count(".") else ""
            if module not in base and top != layer and top not in ALLOWED[layer]:
                bad.append(f"{name}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_model_imports_only_torch_config_and_errors():
    for name in (n for n in MODULES if n.startswith("mixtral.model")):
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                root = node.module.split(".")[0]
                assert root in ("__future__", "torch", "dataclasses", "typing", "collections", "mixtral"), (
                    f"{name} imports {node.module}"
                )
                if root == "mixtral":
                    assert node.module.startswith(("mixtral.model", "mixtral.config", "mixtral.errors")), (
                        f"{name} imports {node.module}"
                    )
