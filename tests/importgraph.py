"""The project's import graph, read from the source with ast (nothing is imported).

Every `import x` and `from x import y` counts, at module level or inside a function (lmpipe imports
heavy libraries and many of its own modules lazily). `from lmpipe import tokenizer` is an edge to
lmpipe.tokenizer, `from lmpipe.ckpt.store import x` one to lmpipe.ckpt.store. A package's
__init__.py is the module named after the package; importing a submodule adds no edge to its
parent packages. One import by name is followed too: `from models import build_model` reaches
the architecture modules that models/__init__.py's MODELS registry names.
"""
from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lmpipe", "models", "tasks", "flows")


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    target: str  # a project module, or the top-level name of an outside package ("mlflow")
    line: int
    function: str | None  # the top-level function (or class) the import is in; None: module level

    def where(self, graph: Graph) -> str:
        return f"{graph.path(self.source)}:{self.line}"


@dataclass
class Graph:
    files: dict[str, Path]  # module name → file, relative to ROOT
    edges: dict[str, list[Edge]] = field(default_factory=dict)  # project and outside targets

    def path(self, module: str) -> str:
        return self.files[module].as_posix()

    def project_edges(self, module: str) -> list[Edge]:
        return [e for e in self.edges[module] if e.target in self.files]

    def chain(self, start: set[str], goal: str) -> list[Edge] | None:
        """The shortest import chain from a module in start to goal: [] if goal is in start, None
        if goal cannot be reached."""
        came: dict[str, Edge | None] = {m: None for m in start}
        queue = deque(sorted(start))
        while queue:
            m = queue.popleft()
            if m == goal:
                break
            for e in self.project_edges(m):
                if e.target not in came:
                    came[e.target] = e
                    queue.append(e.target)
        if goal not in came:
            return None
        path: list[Edge] = []
        while (e := came[goal]) is not None:
            path.append(e)
            goal = e.source
        return path[::-1]

    def reachable(self, start: set[str]) -> set[str]:
        seen, stack = set(start), list(start)
        while stack:
            for e in self.project_edges(stack.pop()):
                if e.target not in seen:
                    seen.add(e.target)
                    stack.append(e.target)
        return seen


def module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def registry_modules() -> tuple[str, ...]:
    """The modules models/__init__.py's MODELS names: build_model imports them by name."""
    tree = ast.parse((ROOT / "models" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        names = [getattr(t, "id", "") for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "MODELS" in names:
            return tuple(module for module, _, _ in ast.literal_eval(node.value).values())
    raise AssertionError("models/__init__.py has no MODELS = {...} registry")


def _resolve(name: str, files: dict[str, Path]) -> str:
    """The project module an imported dotted name lives in, else the outside top-level package."""
    probe = name
    while probe and probe not in files:
        probe = probe.rpartition(".")[0]
    return probe or name.split(".")[0]


def _targets(node: ast.Import | ast.ImportFrom, module: str, files: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_resolve(a.name, files) for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".")
        if files[module].name != "__init__.py":
            package = package[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        out.append(full if full in files else _resolve(base, files))
        if full == "models.build_model":
            out += registry_modules()
    return out


def module_edges(module: str, files: dict[str, Path]) -> list[Edge]:
    tree = ast.parse((ROOT / files[module]).read_text(encoding="utf-8"))
    edges = []
    for top in tree.body:
        scope = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef,
                                             ast.ClassDef)) else None
        for node in ast.walk(top):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _targets(node, module, files)
                edges += [Edge(module, t, node.lineno, scope) for t in targets]
    return edges


@cache
def build() -> Graph:
    files = {module_name(p.relative_to(ROOT)): p.relative_to(ROOT)
             for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
    graph = Graph(files)
    graph.edges = {m: module_edges(m, files) for m in files}
    return graph


def cycles(graph: Graph) -> list[list[Edge]]:
    """One shortest cycle (its edges, ending where it starts) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[Edge]] = []

    def visit(m: str) -> None:  # Tarjan's algorithm
        index[m] = low[m] = len(index)
        stack.append(m)
        for e in graph.project_edges(m):
            if e.target not in index:
                visit(e.target)
                low[m] = min(low[m], low[e.target])
            elif e.target in stack:
                low[m] = min(low[m], index[e.target])
        if low[m] == index[m]:
            component = []
            while (top := stack.pop()) != m:
                component.append(top)
            component.append(m)
            if len(component) > 1 or any(e.target == m for e in graph.project_edges(m)):
                found.append(min((_shortest_cycle(graph, c) for c in sorted(component)), key=len))

    for m in sorted(graph.files):
        if m not in index:
            visit(m)
    return found


def _shortest_cycle(graph: Graph, start: str) -> list[Edge]:
    best: list[Edge] | None = None
    for e in graph.project_edges(start):
        back = graph.chain({e.target}, start)
        if back is not None and (best is None or len(back) + 1 < len(best)):
            best = [e] + back
    assert best is not None
    return best
