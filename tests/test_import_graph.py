"""The package's imports run one way: from a higher layer to a lower one, never back, with no
cycles between modules and no private names taken from another package.

Every module under qmamba/ is parsed with `ast`; every import statement counts, at module level
and inside functions alike (an import deferred into a function body is still a dependency, it is
only paid for later). Relative imports are resolved against the importing module. The layers,
highest first (see docs/design.md, "Layering"):

    6  qmamba (the package root), qmamba.__main__    what `import qmamba` / `python -m qmamba` run
    5  qmamba.cli                                    the command line
    4  qmamba.api, qmamba.quantize, qmamba.generate  the Python API
    3  qmamba.eval, qmamba.methods                   evaluation; the quantization methods
    2  qmamba.quant, qmamba.formats                  quantizers, quantized modules; on-disk formats
    1  qmamba.models, qmamba.kernels                 the float model; native kernels
    0  qmamba.errors, qmamba.utils, qmamba._version  leaves, importable from anywhere

A module may import its own layer (no cycle allowed) and any layer below.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qmamba"
PACKAGE = "qmamba"

LAYERS: dict[str, int] = {
    "qmamba": 6, "qmamba.__main__": 6,
    "qmamba.cli": 5,
    "qmamba.api": 4, "qmamba.quantize": 4, "qmamba.generate": 4,
    "qmamba.eval": 3, "qmamba.methods": 3,
    "qmamba.quant": 2, "qmamba.formats": 2,
    "qmamba.models": 1, "qmamba.kernels": 1,
    "qmamba.errors": 0, "qmamba.utils": 0, "qmamba._version": 0,
}


@dataclass(frozen=True)
class Import:
    source: str          # the importing module, dotted
    file: str            # its file, relative to the folder above the package
    line: int
    target: str          # the imported module, dotted (the deepest one that exists)
    names: tuple         # the names taken `from` it (empty for `import a.b`)
    text: str            # the statement as written

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """dotted name -> file, every .py under root."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def layer_of(module: str) -> Optional[int]:
    """The layer of the longest entry of LAYERS that is `module` or a package above it."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:i]))
        if layer is not None:
            return layer
    return None


def package_of(module: str) -> str:
    """qmamba.X for everything under qmamba/X (the unit that may share private names)."""
    return ".".join(module.split(".")[:2])


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, path: Path, known: dict[str, Path], root: Path = ROOT) -> Iterator[Import]:
    """Every import of a qmamba module in `path`, at any depth of the syntax tree."""
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    lines = text.splitlines()
    file = path.relative_to(root.parent).as_posix()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield Import(source, file, node.lineno, alias.name, (), lines[node.lineno - 1].strip())
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(source, is_package, node)
            if base.split(".")[0] != PACKAGE:
                continue
            stmt = " ".join(line.strip() for line in lines[node.lineno - 1:node.end_lineno])
            for alias in node.names:
                sub = f"{base}.{alias.name}"          # `from pkg import module` imports the module
                target = sub if sub in known else base
                yield Import(source, file, node.lineno, target, (alias.name,), stmt)


def all_imports(root: Path = ROOT) -> list[Import]:
    known = modules(root)
    return [imp for name, path in known.items() for imp in imports_of(name, path, known, root)]


# ------------------------------------------------------------------------------------ the checks
def upward_imports(imps: list[Import]) -> list[str]:
    """One message per statement that imports a module of a higher layer."""
    out = []
    for imp in imps:
        src, dst = layer_of(imp.source), layer_of(imp.target)
        assert src is not None, f"{imp.file}: module {imp.source} is in no layer; add it to LAYERS"
        assert dst is not None, f"{imp.where()}: {imp.target} is in no layer; add it to LAYERS"
        msg = f"{imp.where()}  ({imp.source}, layer {src}, imports {imp.target}, layer {dst})"
        if dst > src and msg not in out:
            out.append(msg)
    return out


def cycles(imps: list[Import]) -> list[str]:
    """One message per strongly connected component of more than one module (or a module that
    imports itself): a shortest cycle through it, edge by edge with file and line."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imps:
        graph.setdefault(imp.source, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str):            # Tarjan's algorithm (recursion depth: the module count)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    out = []
    for comp in components:
        start = min(comp)
        if len(comp) == 1 and start not in graph.get(start, {}):
            continue
        members = set(comp)
        # breadth-first from start back to start, inside the component
        prev: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()
        path.append(start)
        edges = "\n    ".join(graph[a][b].where() for a, b in zip(path, path[1:]))
        more = "" if len(comp) == len(path) - 1 else f"\n    (one of the cycles among {', '.join(sorted(comp))})"
        out.append(f"cycle {' -> '.join(path)}:\n    {edges}{more}")
    return out


def private_imports(imps: list[Import]) -> list[str]:
    out = []
    for imp in imps:
        if package_of(imp.source) == package_of(imp.target):
            continue
        for name in imp.names:
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                out.append(f"{imp.where()}  (private name {name} of {imp.target})")
    return out


# ------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def imps() -> list[Import]:
    found = all_imports()
    assert len(found) > 100, f"only {len(found)} imports found under {ROOT}: is the walk broken?"
    return found


def test_every_module_has_a_layer():
    missing = [name for name in modules() if layer_of(name) is None]
    assert not missing, f"modules in no layer (add them to LAYERS and docs/design.md): {missing}"


def test_imports_run_downward(imps):
    bad = upward_imports(imps)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_import_cycles(imps):
    bad = cycles(imps)
    assert not bad, "import cycles (function-level imports included):\n" + "\n".join(bad)


def test_no_private_names_across_packages(imps):
    bad = private_imports(imps)
    assert not bad, "private names imported from another package:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------ the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/mixer.py": "def f():\n    from ..quant.qscan import scan\n",
        "quant/__init__.py": "",
        "quant/qscan.py": "from ..models.mixer import _helper\nfrom . import linear\n",
        "quant/linear.py": "import qmamba.quant.qscan\n",
    })
    imps = all_imports(root)
    up = upward_imports(imps)
    assert len(up) == 1 and "qmamba/models/mixer.py:2: from ..quant.qscan import scan" in up[0], up
    cyc = cycles(imps)
    assert len(cyc) == 1, cyc
    assert cyc[0].startswith("cycle qmamba.models.mixer -> qmamba.quant.qscan -> qmamba.models.mixer:"), cyc
    assert "qmamba/models/mixer.py:2: from ..quant.qscan import scan" in cyc[0], cyc
    assert "qmamba/quant/qscan.py:1: from ..models.mixer import _helper" in cyc[0], cyc
    priv = private_imports(imps)
    assert len(priv) == 1 and "qmamba/quant/qscan.py:1" in priv[0] and "_helper" in priv[0], priv
