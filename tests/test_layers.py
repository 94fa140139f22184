"""The package's floors: every import of ``mgup_dist`` (at module level or inside a function)
goes down the table of docs/code.md, so there is no import cycle, the backends never
communicate on their own, and the pure selection math imports nothing of the package."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "mgup_dist"

#: module (or package prefix ending in '.') -> floor; an import must go to a lower floor, or
#: stay inside one package of the same floor (kernels.cpu -> kernels.torch_ops)
FLOORS = {
    "mgup_dist.radix": 0, "mgup_dist.layout": 0, "mgup_dist.device": 0, "mgup_dist.collectives": 0,
    "mgup_dist.rules": 0, "mgup_dist.reference": 0, "mgup_dist.memory": 0,
    "mgup_dist.plan": 1, "mgup_dist.kernels.": 1, "mgup_dist.kernels": 1,
    "mgup_dist.selection": 2, "mgup_dist.state": 2, "mgup_dist.options": 2, "mgup_dist.agreement": 2,
    "mgup_dist.buffers": 3, "mgup_dist.pipeline": 4,
    "mgup_dist.optim": 5,
    "mgup_dist": 6,
    "mgup_dist.integrations.": 7, "mgup_dist.integrations": 7, "mgup_dist.deepspeed": 8, "mgup_dist.megatron": 8,
    "mgup_dist.run": 9,
    "mgup_dist.train.": 9, "mgup_dist.train": 9,
    "mgup_dist.bench": 10, "mgup_dist.bench_cuda": 11, "mgup_dist.bench_selection": 10, "mgup_dist.opcount": 11,
    "mgup_dist.counterexample": 10, "mgup_dist.triton_table": 10, "mgup_dist.cli": 12,
}
#: what a backend may never import: communication is handed in by the pipeline
ABOVE_BACKENDS = ("mgup_dist.collectives", "mgup_dist.selection", "mgup_dist.pipeline", "mgup_dist.optim",
                  "mgup_dist.agreement", "mgup_dist.buffers", "mgup_dist.options", "mgup_dist.state")


def _modules():
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _imports(name, path, is_pkg, mods):
    """Every mgup_dist module ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    base = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mgup_dist"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base.split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mgup_dist":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in mods else target)
    return {m for m in out if m in mods and m != name}


def _floor(mod):
    if mod in FLOORS:
        return FLOORS[mod]
    prefixes = [p for p in FLOORS if p.endswith(".") and mod.startswith(p)]
    if prefixes:
        return FLOORS[max(prefixes, key=len)]
    raise KeyError(mod)


def _graph():
    mods = _modules()
    return {m: _imports(m, p, pkg, mods) for m, (p, pkg) in mods.items()}


def test_every_module_has_a_floor_and_imports_go_down():
    graph = _graph()
    missing = sorted(m for m in graph if not any(m == k or (k.endswith(".") and m.startswith(k)) for k in FLOORS))
    assert not missing, f"add these modules to FLOORS (and to docs/code.md): {missing}"
    up = []
    for a, targets in graph.items():
        for b in targets:
            same_package = a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0] and _floor(a) == _floor(b) and a.count(".") > 1
            own_child = b.startswith(a + ".")   # a package's __init__ re-exporting its modules
            if _floor(b) >= _floor(a) and not (same_package or own_child):
                up.append(f"{a} (floor {_floor(a)}) -> {b} (floor {_floor(b)})")
    assert not up, "imports that do not go down:\n" + "\n".join(up)


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("mod", sorted(m for m in _modules() if m.startswith("mgup_dist.kernels")))
def test_backends_import_nothing_above_them(mod):
    graph = _graph()
    assert not graph[mod] & set(ABOVE_BACKENDS), graph[mod] & set(ABOVE_BACKENDS)


def test_the_selection_math_imports_nothing_of_the_package():
    assert _graph()["mgup_dist.radix"] == set()


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The walker itself: a cycle planted in the graph is reported."""
    real = _graph()
    planted = dict(real, **{"mgup_dist.radix": {"mgup_dist.selection"}})
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: planted)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()


def test_docs_code_md_lists_every_floor():
    text = (ROOT / "docs" / "code.md").read_text()
    for mod in FLOORS:
        short = re.sub(r"^mgup_dist\.?", "", mod).rstrip(".")
        if short:
            assert short.replace(".", "/") in text or short in text, f"docs/code.md does not place {mod}"


def test_every_module_says_its_job():
    missing = [m for m, (path, _) in _modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"modules without a docstring saying their job: {missing}"
