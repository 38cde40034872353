"""No module reads the environment at import time; entry points apply the offline defaults."""
from __future__ import annotations

import ast
import os

from importgraph import ROOT, build

from lmpipe.common import env


def test_offline_defaults_read_the_environment_when_applied(monkeypatch):
    for key in [*env.OFFLINE_DEFAULTS, "TRANSFORMERS_OFFLINE"]:
        monkeypatch.setenv(key, "unset")  # so that monkeypatch restores (or removes) each one
        monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # after lmpipe.common.env was imported
    env.apply_offline_defaults()
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert os.environ["DO_NOT_TRACK"] == "true"


def _reads_environment(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
            or isinstance(node, ast.Name) and node.id in ("environ", "getenv"))


def _import_time_nodes(body: list[ast.stmt]):
    """The nodes Python evaluates when it imports a module: everything but function bodies."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for part in [*stmt.decorator_list, *stmt.args.defaults, *stmt.args.kw_defaults]:
                if part is not None:
                    yield from ast.walk(part)
        elif isinstance(stmt, ast.ClassDef):
            for part in [*stmt.decorator_list, *stmt.bases]:
                yield from ast.walk(part)
            yield from _import_time_nodes(stmt.body)
        else:
            yield from _walk_outside_lambdas(stmt)


def _walk_outside_lambdas(node: ast.AST):
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.Lambda):  # a lambda's body runs when it is called
            yield from _walk_outside_lambdas(child)


def test_no_module_reads_the_environment_at_import():
    graph = build()
    found = []
    for _, path in sorted(graph.files.items()):
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        found += [f"{path.as_posix()}:{node.lineno}: {ast.unparse(node)}"
                  for node in _import_time_nodes(tree.body) if _reads_environment(node)]
    why = "environment read at import time (read it in a function instead)"
    assert not found, why + ":\n" + "\n".join(found)
