"""Layering: no import cycle among the project's modules, and validation never imports the training stack.

The import graph is read from the code itself (``ast``): every ``import`` / ``from ... import`` of a
project module, at module level or inside a function (a lazy import still couples the two modules and
only hides the cycle until that function runs), except those under ``if TYPE_CHECKING:``.
``from package import name`` counts as an edge to ``package.name`` when that is a module, else to
``package``; a module's own parent packages are not edges (Python imports them first anyway).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "unisd_components")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")
                    anchor = anchor[: len(anchor) - child.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.add(full if full in known else base)
    return {name for name in out if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_detector_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports_and_skips_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from harness.spec import StudySpec\n"
        "def f():\n    from harness.data import load_benchmark\n    from harness import plan\n"
    )
    known = {"harness", "harness.spec", "harness.data", "harness.plan", "harness.x"}
    assert _imports(tree, "harness.x", False, known) == {"harness.data", "harness.plan"}


def test_no_import_cycle_among_the_project_modules():
    graph = import_graph()
    assert "harness.trial" in graph and "unisd_components.trainer" in graph  # the graph is real
    assert "harness.data_parallel" in graph["harness.trial"]
    assert find_cycles(graph) == []


def test_unisd_components_never_imports_the_harness():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("harness")) for m, deps in graph.items()}
    assert {m: d for m, d in offenders.items() if m.startswith("unisd_components") and d} == {}


def test_validating_a_spec_never_imports_torch():
    code = (
        "import sys, harness.spec, harness.plan, harness.cli\n"
        "from harness.plan import describe_plan\n"
        "describe_plan(harness.spec.load_spec('studies/full_ablation.yaml'))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval', 'optuna', 'mlflow') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
