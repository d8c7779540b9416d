"""The shape of the house, read from the source: no import circle, packages layered, no private helper used across
packages, training independent of the broker and the sealer, heavy libraries imported lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "medtee"
#: Modules that wire packages together (they may import any package): the command line and the run's order.
WIRING = ("medtee.cli", "medtee.__main__", "medtee.run")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (annotations only, never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every medtee import in `name`, lazy ones included."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            out += [(base, a.name) for a in node.names]
    return [(m, n) for m, n in out if m == "medtee" or m.startswith("medtee.")]


def _edges() -> dict[str, set[str]]:
    edges = {}
    for name in MODULES:
        targets = set()
        for module, imported in _imports(name):
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in MODULES else module
            if target in MODULES and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_no_module_import_circle():
    assert _cycle(_edges()) is None


def test_packages_are_layered():
    """Below the wiring modules and the CLIs, packages import each other without a circle."""
    graph: dict[str, set[str]] = {}
    for name, targets in _edges().items():
        if name in WIRING or name.endswith(".cli"):
            continue
        graph.setdefault(_package(name), set()).update(
            _package(t) for t in targets if _package(t) != _package(name))
    assert _cycle(graph) is None


def test_no_private_helper_crosses_a_package():
    crossings = [f"{name} imports {module}.{imported}" for name in MODULES for module, imported in _imports(name)
                 if imported and imported.startswith("_") and not imported.startswith("__")
                 and _package(module) != _package(name)]
    assert crossings == []


def test_training_imports_nothing_from_the_broker_or_the_sealer():
    found = [f"{name} -> {t}" for name, targets in _edges().items() if name.startswith("medtee.training")
             for t in targets if _package(t) in ("broker", "sealing")]
    assert found == []


@pytest.mark.parametrize("module", ["medtee.cli", "medtee.config", "medtee.tracking.config", "medtee.tracking.guard",
                                    "medtee.training.config", "medtee.broker.config", "medtee.crypto.config"])
def test_schemas_and_the_cli_import_no_heavy_library(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'lightning', 'transformers', 'mlflow', 'pyarrow', "
            f"'hydra', 'omegaconf') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _documented_layers() -> dict[str, int]:
    """package -> layer, from the layer table of docs/architecture.md (`| N | `pkg` (...), `pkg` |`)."""
    import re

    layers = {}
    for line in (ROOT.parent / "docs" / "architecture.md").read_text().splitlines():
        if row := re.fullmatch(r"\| (\d) \| (.*) \|", line):
            for package in re.findall(r"(?:^|\), |, )`(\w+)`", row[2]):
                layers[package] = int(row[1])
    return layers


def test_packages_import_only_from_the_layers_below_them_as_documented():
    """docs/architecture.md's layer table is the rule: a package imports only from packages of lower layers (the
    wiring modules and the CLIs excepted)."""
    layers = _documented_layers()
    packages = {_package(name) for name in MODULES} - {"medtee", "cli", "__main__", "run"}
    assert packages <= set(layers), f"packages missing from the table: {sorted(packages - set(layers))}"
    upward = sorted({f"{_package(name)} (layer {layers[_package(name)]}) imports {_package(t)} (layer "
                     f"{layers.get(_package(t))}) in {name}"
                     for name, targets in _edges().items() if name not in WIRING and not name.endswith(".cli")
                     and _package(name) in layers
                     for t in targets if _package(t) != _package(name) and _package(t) != "medtee"
                     and layers.get(_package(t), 99) >= layers[_package(name)]})
    assert upward == []
