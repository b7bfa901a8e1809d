"""The layering table of `espmed.__doc__`, and no import cycle between the project's files.

Which imports count. Every `.py` file under the package roots of pyproject's `package-dir`
(`espmed/`; `export/` is `espmed.export`, `runtimes/` is `espmed.runtimes`) is parsed with `ast`,
nothing of the project is imported, and every import anywhere in a file counts: at module level,
inside functions, under `if TYPE_CHECKING:` or `try:`, and `importlib.import_module("<literal>")`.
Relative imports are resolved against the file's package (an `__init__.py` is its own package). An
import names one project module (imports of anything else are ignored):

- `import a.b.c` names `a.b.c`;
- `from a.b import c` names `a.b.c` when that is a module (a file or a package), else `a.b`, the
  package whose `__init__` defines `c`; the same for `from . import c` and `from .. import __version__`;
- a module of a project package that does not exist (a moved file) is named as written, so reported.

Only the named module is an edge of the module graph. Python also runs the `__init__` of every
enclosing package first, but that is how packages load, not something the importing file uses:
counting it would make every submodule depend on its package's `__init__`, and so close a false
cycle with every `__init__` that re-exports from its submodules. A file that takes a *name* from
its package (`from . import name`, `name` not a module) does use that `__init__`; that edge counts,
and if the `__init__` imports the file back, the cycle is reported (it only works by import order).

The layering. The Markdown table in `espmed.__doc__` is read here, not copied. Its rows, top to
bottom, are the layers; the first cell names a row's packages or modules, each covering itself and
its submodules (the top-level package only its own `__init__`: the version). The second cell is one
of "nothing of espmed", "the above" (the packages of every row above) or "everything", a remark in
parentheses allowed, then optionally clauses "; `A` only in `B`": of this row, only `B` (and its
submodules) may import `A` (and its submodules); `B` may be written without the top package name.
Every module may import its own table entry. A module the table does not place, or a cell that does
not parse, fails the test too, so the table cannot drift from the tree unnoticed.

Cycles: the strongly connected components of the module graph (Tarjan; a module importing itself is
ignored); each one with two or more modules is reported as one cycle through it, `file:line` per edge.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import espmed

REPO = Path(__file__).resolve().parents[1]

NOTHING, ABOVE, EVERYTHING = "nothing", "above", "everything"


# -- the package roots and the modules in them ---------------------------------------------------------
def package_roots(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Path]:
    """pyproject's `[tool.setuptools] package-dir`: package name -> its folder."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the one line, `package-dir = { "a" = "b", ... }`
        line = re.search(r"^package-dir\s*=\s*\{(.*)\}", pyproject.read_text(), re.M)
        assert line, f"{pyproject}: no package-dir line"
        dirs = dict(re.findall(r'"([\w.]+)"\s*=\s*"([^"]+)"', line.group(1)))
    else:
        dirs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: pyproject.parent / folder for name, folder in dirs.items()}


def find_modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Module name -> its file, for every .py file under the roots (a package: its __init__.py)."""
    modules: dict[str, Path] = {}
    for name, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


# -- imports ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported project module
    path: Path
    line: int


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is in a project package (a module that is missing too, so it is reported by its
    name), None for anything else."""
    return name if name in modules or name.partition(".")[0] in modules else None


def file_imports(module: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """Every import of a project module anywhere in `path` (see the module docstring)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: list[Edge] = []

    def add(name: str | None, node: ast.AST) -> None:
        target = _project_module(name, modules) if name else None
        if target is not None:
            edges.append(Edge(module, target, path, node.lineno))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                assert node.level - 1 < len(base), f"{path}:{node.lineno}: relative import above the top package"
                base = base[: len(base) - (node.level - 1)]
                if node.module:
                    base.append(node.module)
                base_name = ".".join(base)
            else:
                base_name = node.module
            for alias in node.names:
                full = f"{base_name}.{alias.name}"
                add(full if alias.name != "*" and full in modules else base_name, node)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            add(node.args[0].value, node)
    return edges


def all_imports(modules: dict[str, Path]) -> list[Edge]:
    return [edge for module, path in modules.items() for edge in file_imports(module, path, modules)]


@functools.cache
def project() -> tuple[dict[str, Path], list[Edge]]:
    """This repository's modules and their imports (parsed once for the tests below)."""
    modules = find_modules(package_roots())
    return modules, all_imports(modules)


# -- the layering table -----------------------------------------------------------------------------
@dataclass
class Row:
    entries: list[str]
    base: str  # NOTHING, ABOVE or EVERYTHING
    only_in: dict[str, list[str]] = field(default_factory=dict)  # imported entry -> the importers allowed


@dataclass
class Layers:
    top: str  # the top-level package: its entry covers only its __init__
    rows: list[Row]

    def entry(self, module: str) -> tuple[int, str] | None:
        """(row index, table entry) that places `module`; None if the table does not."""
        best = None
        for i, row in enumerate(self.rows):
            for name in row.entries:
                covers = module == name or (name != self.top and module.startswith(name + "."))
                if covers and (best is None or len(name) > len(best[1])):
                    best = (i, name)
        return best

    def allows(self, source: str, target: str) -> bool:
        (i, mine), (j, theirs) = self.entry(source), self.entry(target)
        if mine == theirs:
            return True
        row = self.rows[i]
        if row.base == EVERYTHING:
            return True
        if row.base != ABOVE or j >= i:
            return False
        for name, allowed in row.only_in.items():
            if _within(target, name) and not any(_within(source, b) for b in allowed):
                return False
        return True


def _within(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


_NAME = r"`([\w.]+)`"


def parse_layers(doc: str) -> Layers:
    """The layering table of a package docstring (its first Markdown table: header, rule, rows)."""
    lines = [line.strip() for line in doc.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) > 2 and re.fullmatch(r"\|[-|: ]+\|", table[1]), "no layering table (header, rule, rows)"
    rows: list[Row] = []
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 2, f"layering table row has {len(cells)} cells, not 2: {line}"
        entries = re.findall(_NAME, cells[0])
        assert entries, f"layering table row names no package: {line}"
        clauses = [c.strip() for c in re.sub(r"\([^)]*\)", "", cells[1]).split(";")]
        base = {"the above": ABOVE, "everything": EVERYTHING}.get(clauses[0])
        if base is None and re.fullmatch(r"nothing of [\w.]+", clauses[0]):
            base = NOTHING
        assert base is not None, f"layering table: {clauses[0]!r} is not 'nothing of ...', 'the above' or 'everything'"
        row = Row(entries, base)
        for clause in clauses[1:]:
            m = re.fullmatch(rf"{_NAME} only in ({_NAME}(?:\s*(?:,|,?\s*or)\s*{_NAME})*)", clause)
            assert m and base == ABOVE, f"layering table: cannot read {clause!r} in: {line}"
            row.only_in[m.group(1)] = re.findall(_NAME, m.group(2))
        rows.append(row)
    tops = [name for row in rows for name in row.entries if "." not in name]
    assert len(tops) == 1, f"layering table: one top-level package expected, got {tops}"
    layers = Layers(tops[0], rows)
    # The exceptions name table entries, their importers modules (the top package's name may be left out).
    for row in rows:
        for name, allowed in list(row.only_in.items()):
            placed = layers.entry(name)
            assert placed and placed[1] == name, f"layering table: `{name}` (an exception) is no entry of the table"
            full = []
            for b in allowed:
                b = b if layers.entry(b) else f"{layers.top}.{b}"
                assert layers.entry(b) and any(_within(b, e) for e in row.entries), (
                    f"layering table: `{b}` (allowed to import `{name}`) is not in the row of {row.entries}"
                )
                full.append(b)
            row.only_in[name] = full
    return layers


# -- the checks ---------------------------------------------------------------------------------------
def _where(edge: Edge, base: Path) -> str:
    return f"{edge.path.relative_to(base).as_posix()}:{edge.line}"


def layering_violations(modules: dict[str, Path], edges: list[Edge], layers: Layers, base: Path) -> list[str]:
    """`file:line: a -> b` for every import against the table, and every module the table does not place."""
    found = [
        f"{path.relative_to(base).as_posix()}: {module} is not placed in the layering table"
        for module, path in modules.items()
        if layers.entry(module) is None
    ]
    for e in edges:
        if layers.entry(e.source) and layers.entry(e.target) and not layers.allows(e.source, e.target):
            found.append(f"{_where(e, base)}: {e.source} -> {e.target}")
    return found


def import_cycles(edges: list[Edge], base: Path) -> list[str]:
    """One cycle per strongly connected component of two or more modules: `a (file:line) -> b (...) -> a`,
    each module with the line where it imports the next."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, {}).setdefault(e.target, e)  # the first import of each pair
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the project's graph is far shallower than the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
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
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # Shortest path back to `start` inside the component (breadth first).
        previous: dict[str, str] = {}
        frontier = [start]
        while start not in previous:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(previous[path[-1]])
        path.reverse()
        steps = [f"{a} ({_where(graph[a][b], base)})" for a, b in zip(path, path[1:], strict=False)]
        cycles.append(" -> ".join([*steps, start]))
    return sorted(cycles)


# -- the tests ----------------------------------------------------------------------------------------
def test_imports_follow_the_layering_table():
    modules, edges = project()
    violations = layering_violations(modules, edges, parse_layers(espmed.__doc__), REPO)
    assert not violations, "imports against the layering table of espmed/__init__.py:\n" + "\n".join(violations)


def test_no_import_cycles():
    cycles = import_cycles(project()[1], REPO)
    assert not cycles, "import cycles between the project's files:\n" + "\n".join(cycles)


def test_the_table_is_read_as_written():
    layers = parse_layers(espmed.__doc__)
    assert layers.top == "espmed"
    assert layers.entry("espmed") == (0, "espmed") and layers.entry("espmed.cli.main")[1] == "espmed.cli"
    assert layers.entry("espmed.export.targets")[0] > layers.entry("espmed.runtimes.base")[0]
    assert layers.allows("espmed.runtimes.torch_reference", "espmed.model.esp_medsam")
    assert not layers.allows("espmed.runtimes.ort", "espmed.model")
    assert layers.allows("espmed.export.targets", "espmed.model")
    assert not layers.allows("espmed.errors", "espmed.atomic")  # one row, two entries: "nothing of espmed"


SYNTHETIC_DOC = """A package.

| package | may import |
|---|---|
| `pkg` (version), `pkg.low` | nothing of pkg (the standard library) |
| `pkg.mid` | the above |
| `pkg.other` | the above; `pkg.mid` only in `other.special` |
| `pkg.high` | everything |
"""

SYNTHETIC_TREE = {
    "pkg/pyproject.toml": '[tool.setuptools]\npackage-dir = { "pkg" = "pkg", "pkg.other" = "other" }\n',
    "pkg/pkg/__init__.py": '__version__ = "1"\n',
    "pkg/pkg/low.py": "import os\n\n\ndef f():\n    from .mid import a\n",
    "pkg/pkg/mid/__init__.py": "from .a import A\n",
    "pkg/pkg/mid/a.py": "from . import b\nimport os\n\nA = 1\n",
    "pkg/pkg/mid/b.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import A\n",
    "pkg/pkg/high.py": "from . import mid\nfrom .other import special\n",
    "pkg/pkg/stray.py": "x = 1\n",
    "pkg/other/__init__.py": "from .. import __version__\n",
    "pkg/other/special.py": "from pkg.mid import A\n",
    "pkg/other/plain.py": "from ..mid import a\nimport importlib\n\nimportlib.import_module('pkg.high')\n",
}


def test_the_checker_finds_wrong_way_imports_and_cycles(tmp_path):
    for name, text in SYNTHETIC_TREE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    base = tmp_path / "pkg"
    roots = package_roots(base / "pyproject.toml")
    assert roots == {"pkg": base / "pkg", "pkg.other": base / "other"}
    modules = find_modules(roots)
    edges = all_imports(modules)
    pairs = {(e.source, e.target) for e in edges}
    assert {
        ("pkg.other", "pkg"),  # from .. import __version__, in an __init__
        ("pkg.mid", "pkg.mid.a"),  # from .a import A
        ("pkg.mid.a", "pkg.mid.b"),  # from . import b: a module
        ("pkg.other.special", "pkg.mid"),  # from pkg.mid import A: a name of the package
        ("pkg.high", "pkg.other.special"),
        ("pkg.other.plain", "pkg.high"),  # importlib.import_module("pkg.high")
    } <= pairs
    assert not any(target == "pkg.mid" for source, target in pairs if source.startswith("pkg.mid."))

    layers = parse_layers(SYNTHETIC_DOC)
    assert layers.rows[2].only_in == {"pkg.mid": ["pkg.other.special"]}
    assert sorted(layering_violations(modules, edges, layers, base)) == [
        "other/plain.py:1: pkg.other.plain -> pkg.mid.a",  # pkg.mid only in other.special
        "other/plain.py:4: pkg.other.plain -> pkg.high",  # upwards, through importlib
        "pkg/low.py:5: pkg.low -> pkg.mid.a",  # upwards, inside a function
        "pkg/stray.py: pkg.stray is not placed in the layering table",
    ]
    assert import_cycles(edges, base) == [
        "pkg.mid.a (pkg/mid/a.py:1) -> pkg.mid.b (pkg/mid/b.py:4) -> pkg.mid.a"
    ]
