"""dvc.yaml is honest: each stage's deps cover every project file (lmpipe/, models/) whose change
can change what the stage produces, and name no code the stage does not run.

What a stage runs: `lmpipe stage NAME` calls one function of lmpipe/stages.py (lmpipe/cli/main.py
cmd_stage; the command line only dispatches, so it is no root). Its code is stages.py itself, the
imports at stages.py's module level, the imports inside that function and inside the stages.py
functions it calls, and everything those reach (tests/importgraph.py, function-level imports too).
"""
from __future__ import annotations

import ast

import pytest
import yaml
from importgraph import ROOT, Graph, build

STAGES = "lmpipe.stages"
# dvc.yaml stage → the lmpipe/stages.py function `lmpipe stage NAME` runs.
STAGE_FUNCTIONS = {"prepare": "prepare", "tokenizer": "build_tokenizer", "train": "train",
                   "evaluate": "evaluate", "generate": "generate", "register": "register"}
# Code a stage ships without running it. register logs lmpipe/serving_model.py as the registered
# model ("models from code"): what it imports is what serves the model.
SHIPPED = {"register": ("lmpipe.serving_model",)}
CODE = ("lmpipe", "models")  # the project code a dep can name (top-level folders)


def _stages_functions() -> dict[str, ast.FunctionDef]:
    tree = ast.parse((ROOT / "lmpipe" / "stages.py").read_text(encoding="utf-8"))
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _called(function: str, functions: dict[str, ast.FunctionDef]) -> set[str]:
    """function and the stages.py functions it uses, transitively."""
    seen, stack = {function}, [function]
    while stack:
        for node in ast.walk(functions[stack.pop()]):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in seen:
                seen.add(node.id)
                stack.append(node.id)
    return seen


def stage_code(graph: Graph, stage: str) -> tuple[dict[str, str], set[str]]:
    """(roots, every module the stage runs) for one dvc.yaml stage; roots maps each module the
    stage's own code imports to where it does (lmpipe.stages, lmpipe.stages.train, ...)."""
    used = _called(STAGE_FUNCTIONS[stage], _stages_functions())
    roots = {e.target: STAGES + (f".{e.function}" if e.function else "")
             for e in graph.project_edges(STAGES) if e.function in (None, *used)}
    roots |= {m: "the registered model" for m in SHIPPED.get(stage, ())}
    return roots, graph.reachable(set(roots)) | {STAGES}


def _how(graph: Graph, roots: dict[str, str], module: str) -> str:
    if module == STAGES:
        return "it is the stage's own code"
    chain = graph.chain(set(roots), module) or []
    first = chain[0].source if chain else module
    return " -> ".join([roots[first], first] + [e.target for e in chain])


def _covers(dep: str, path: str) -> bool:
    dep = dep.rstrip("/")
    return path == dep or path.startswith(dep + "/")


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_every_stage_runs_a_known_stage_function():
    functions = _stages_functions()
    for name, stage in _dvc_stages().items():
        cmd = stage["cmd"]
        assert cmd == f"lmpipe stage {name}", f"dvc.yaml stage {name}: cmd {cmd!r}"
        assert STAGE_FUNCTIONS.get(name) in functions, f"{name}: add it to STAGE_FUNCTIONS"


def test_stage_deps_cover_the_code_each_stage_runs():
    graph = build()
    problems = []
    for name, stage in _dvc_stages().items():
        deps = [d for d in stage.get("deps", []) if d.split("/")[0] in CODE]
        roots, code = stage_code(graph, name)
        for module in sorted(code):
            path = graph.path(module)
            if not any(_covers(d, path) for d in deps):
                problems.append(f"stage {name}: {path} is not in deps; the stage runs it: "
                                f"{_how(graph, roots, module)}")
        for dep in deps:
            if not (ROOT / dep).exists():
                problems.append(f"stage {name}: dep {dep} does not exist")
            elif not any(_covers(dep, graph.path(m)) for m in code):
                problems.append(f"stage {name}: dep {dep} is code the stage never runs")
    if problems:
        pytest.fail("dvc.yaml deps:\n" + "\n".join(f"  {p}" for p in problems), pytrace=False)
