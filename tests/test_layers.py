"""The package's shape: layers that import downwards only, no import cycle, the statistics
without torch, and notebooks that import only from their own stage or earlier ones.

Read from the source (ast), so a lazy import inside a function counts like a top-level one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cxrlib"
#: Lowest first; a module may import from its own layer or a lower one.
LAYERS: dict[str, int] = {
    "core": 0, "stats": 1, "hardware": 1, "data": 2, "classifier": 3, "diffusion": 3,
    "cluster": 1, "synthetic": 4, "experiments": 5, "study": 6, "cost": 6,
    "notebook_runner": 7, "__main__": 7, "network": 7, "generator": 7,
}
#: Modules that must load without the training stack (notebook 05 reads a finished grid).
NO_TORCH = ("cxrlib.core", "cxrlib.stats", "cxrlib.study", "cxrlib.experiments.grid",
            "cxrlib.experiments.diagnostics")
TORCH_STACK = ("torch", "torchvision", "accelerate", "diffusers", "timm", "torchmetrics")
#: The notebook that first uses each stage's subpackage: a notebook may not reach forward.
FIRST_NOTEBOOK = {"data": 1, "classifier": 1, "diffusion": 2, "synthetic": 3,
                  "experiments": 4, "study": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(tree: ast.AST) -> set[str]:
    """Every module an import statement names (``from a.b import c`` gives a.b, or a.b.c when
    that is a module of the package)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in MODULES}
    return found


def top_level_imports(tree: ast.Module) -> set[str]:
    """Imports run when the module loads (outside functions and ``if TYPE_CHECKING``)."""
    body = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)],
                      type_ignores=[])
    return imports_of(body)


GRAPH = {name: {m for m in imports_of(ast.parse(path.read_text())) if m in MODULES}
         for name, path in MODULES.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    return 0 if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer():
    assert all(name == "cxrlib" or name.split(".")[1] in LAYERS for name in MODULES)


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                    for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a))
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node] - {node, "cxrlib"}):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checks_can_fail():
    """The two checks above catch what they look for (a graph with an upward edge and a
    cycle)."""
    assert layer("cxrlib.study.plan") > layer("cxrlib.core.layout")
    tree = ast.parse("from cxrlib.core.layout import RunLayout\n"
                     "def f():\n    from cxrlib.study.plan import experiment_info\n")
    assert {"cxrlib.core.layout", "cxrlib.study.plan"} <= imports_of(tree)


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith(NO_TORCH)])
def test_statistics_side_imports_no_training_stack_at_load(name):
    tree = ast.parse(MODULES[name].read_text())
    heavy = sorted(m for m in top_level_imports(tree) if m.split(".")[0] in TORCH_STACK)
    assert not heavy, f"{name} imports {heavy} when it loads"


def test_statistics_stage_loads_without_the_training_stack():
    """Every torch-free module, imported together in a fresh interpreter, leaves torch out."""
    names = [n for n in MODULES if n.startswith(NO_TORCH)]
    probe = (f"import sys; import {', '.join(names)}; "
             f"print(sorted(m for m in {TORCH_STACK!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")),
                         ids=lambda p: p.name)
def test_notebooks_import_only_their_stage_or_earlier(path):
    number = int(path.name[:2])
    cells = json.loads(path.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    used = {m.split(".")[1] for m in imports_of(ast.parse(source))
            if m.startswith("cxrlib.") and m.split(".")[1] in FIRST_NOTEBOOK}
    ahead = sorted(p for p in used if FIRST_NOTEBOOK[p] > number)
    assert not ahead, f"{path.name} imports from later stages: {ahead}"
