"""The package's import graph: layers only look down, families never import each other, no cycles.

Read from the source (every ``import`` / ``from ... import`` of a ``fasttrack`` module, at any depth of
the file, lazy ones included), so the rules hold for what a module may import at any time, not only
for what one ``import fasttrack`` happens to execute.

Layers, bottom up: ``reference`` / ``backend`` / ``_validate`` / ``_opchecks`` / ``_extension`` /
``kernels``; ``ops``; the shared ``nn`` pieces; the family modules; ``patch`` / ``zoo`` / ``demo`` /
``check`` / ``info`` / ``testing`` on top.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ("ostrack", "utptrack", "compresstracker", "etctrack", "abtrack", "avtrack")
BOTTOM = ("fasttrack.reference", "fasttrack.backend", "fasttrack._validate", "fasttrack._opchecks",
          "fasttrack._extension", "fasttrack._C", "fasttrack.kernels")
TOP = ("fasttrack.patch", "fasttrack.zoo", "fasttrack.demo", "fasttrack.check", "fasttrack.info", "fasttrack.testing")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for base, pkg in ((ROOT / "fasttrack", "fasttrack"), (ROOT / "kernels", "fasttrack.kernels")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()
MODULES["fasttrack._C"] = None   # the compiled extension: a leaf


def _resolve(name: str) -> str | None:
    """The fasttrack module an import names (``from fasttrack.ops import x`` names fasttrack.ops or,
    when x is a submodule, fasttrack.ops.x; the caller passes both)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    if MODULES[module] is None:
        return set()
    tree = ast.parse(MODULES[module].read_text())
    is_pkg = MODULES[module].name == "__init__.py"   # (implicit imports of parent packages are not edges)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("fasttrack"):
                r = _resolve(n)
                if r and r != module:
                    out.add(r)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _family(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "nn" and parts[2] in FAMILIES else None


def _layer(module: str) -> int:
    if module in ("fasttrack", "fasttrack.nn"):
        return 4   # facades: they re-export every layer (importing a submodule runs them first; not an edge)
    if module.startswith(BOTTOM):
        return 0
    if module.startswith("fasttrack.ops"):
        return 1
    if module.startswith("fasttrack.nn") or module == "fasttrack.prune":
        return 3 if _family(module) else 2
    assert module.startswith(TOP), f"{module}: place it in a layer (tests/test_architecture.py)"
    return 4


def test_the_graph_is_read():
    assert "fasttrack.nn.vit" in GRAPH["fasttrack.nn.ostrack"]
    assert "fasttrack.ops._registry" in GRAPH["fasttrack.ops.topk_select"]
    assert "fasttrack.nn.utptrack.pruning" in GRAPH["fasttrack.nn.utptrack.o"]


def test_families_never_import_each_other():
    bad = [(m, d) for m, deps in GRAPH.items() for d in deps
           if _family(m) and _family(d) and _family(m) != _family(d)]
    assert not bad, f"family modules importing another family: {bad}"


def test_layers_only_look_down():
    bad = [(m, d) for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)]
    assert not bad, f"imports of a higher layer: {bad}"


@pytest.mark.parametrize("start", sorted(MODULES))
def test_no_import_cycle(start):
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for d in GRAPH[node]:
            if d == start:
                pytest.fail("import cycle: " + " -> ".join(path + [d]))
            if d not in seen:
                seen.add(d)
                stack.append((d, path + [d]))


def test_private_names_stay_in_their_module():
    """A name with a leading underscore is its module's own: another module of the package (or of
    bench/) that needs it gets a public name instead. Underscore *modules* (``_extension``,
    ``_opchecks``, ``_registry``...) are the package's internals and may be imported."""
    crossing = []
    files = [f for f in MODULES.values() if f is not None] + sorted((ROOT / "bench").rglob("*.py"))
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("fasttrack", "bench")):
                continue
            for alias in node.names:
                name = alias.name
                is_module = f"{node.module}.{name}" in MODULES or (ROOT / node.module.replace(".", "/") / f"{name}.py").exists()
                if name.startswith("_") and not name.startswith("__") and not is_module:
                    crossing.append(f"{f.relative_to(ROOT)}: from {node.module} import {name}")
    assert not crossing, "\n".join(crossing)
