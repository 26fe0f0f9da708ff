"""The code's shape, checked from the sources: no import cycles, layers that point one way, no reaching
into other modules' private names, files of a readable size, comments that stay inside the repository.

Imports are read from every module's AST, those inside functions included (a lazy import is still a
dependency)."""

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"scenec": "scenec", "spec": "scenec.spec", "compiler": "scenec.compiler", "runtime": "scenec.runtime"}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for d, pkg in PACKAGES.items():
        for f in sorted((ROOT / d).rglob("*.py")):
            parts = [p for p in f.relative_to(ROOT / d).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = modules()


def imports(name: str, f: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import of ``f``, relative ones resolved."""
    base = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                pkg = base.split(".")[: len(base.split(".")) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            out += [(mod, a.name) for a in node.names]
    return out


def graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for name, f in MODULES.items():
        g.add_node(name)
        for mod, what in imports(name, f):
            target = f"{mod}.{what}" if what and f"{mod}.{what}" in MODULES else mod
            if target in MODULES and target != name:
                g.add_edge(name, target)
    return g


def test_there_are_no_import_cycles():
    cycles = list(nx.simple_cycles(graph()))
    assert cycles == []


def test_layers_point_one_way():
    """spec ← compiler ← runtime ← scenec (build, CLI); the compiler never imports torch."""
    bad = []
    for name, f in MODULES.items():
        deps = {m for m, _ in imports(name, f)}
        if name.startswith("scenec.spec"):
            bad += [(name, d) for d in deps if d.startswith(("scenec.compiler", "scenec.runtime", "scenec.build",
                                                           "scenec.cli", "torch", "diffusers"))]
        if name.startswith("scenec.compiler"):
            bad += [(name, d) for d in deps if d.startswith(("scenec.runtime", "scenec.build", "scenec.cli", "torch",
                                                           "diffusers", "transformers"))]
        if name.startswith("scenec.runtime"):
            bad += [(name, d) for d in deps if d.startswith(("scenec.build", "scenec.cli", "yaml"))]
    assert bad == []


def test_no_module_imports_another_modules_private_names():
    bad = [(name, mod, what) for name, f in MODULES.items() for mod, what in imports(name, f)
           if mod.startswith("scenec") and what and what.startswith("_") and not what.startswith("__")]
    assert bad == []


def test_no_production_file_is_over_500_lines():
    files = list(MODULES.values()) + sorted((ROOT / "bench").glob("*.py"))
    sizes = {str(f.relative_to(ROOT)): len(f.read_text(encoding="utf-8").splitlines()) for f in files}
    assert {f: n for f, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("pattern", [r"\.\./shared", r"/work/", r"\bissues? ?#\d", r"issues/\d+"])
def test_comments_point_inside_the_repository_and_at_no_issue_number(pattern):
    files = list(MODULES.values()) + sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    rx = re.compile(pattern, re.IGNORECASE)
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files if f.name != Path(__file__).name
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if rx.search(line)]
    assert hits == []
