"""Imports go one way. The import graph of lmpipe/, models/, tasks/ and flows/ (every import
statement, in functions too: tests/importgraph.py) has no cycle and follows the table below, which
README's "How the code is laid out" describes."""
from __future__ import annotations

import pytest
from importgraph import Edge, Graph, build, cycles

# The layers, top to bottom. A file may import files of its own layer and of the layers below it.
# A pattern ending in / stands for every file under that folder.
LAYERS = [
    ("flows/",),  # the Prefect flow
    ("tasks/",),  # Prefect tasks, thin wrappers over lmpipe/stages.py
    ("lmpipe/cli/", "lmpipe/__main__.py"),  # the command line (`lmpipe`, `python -m lmpipe`)
    # the pipeline's stages (what tasks/ and `lmpipe stage` run), and `lmpipe compare` (A/B)
    ("lmpipe/stages.py", "lmpipe/compare.py"),
    ("lmpipe/train/", "lmpipe/tracking/", "lmpipe/serving.py", "lmpipe/serving_model.py"),
    ("lmpipe/ckpt/",),  # the checkpoint format and its tools: knows nothing of training
    ("lmpipe/config.py", "lmpipe/data.py", "lmpipe/tokenizer.py", "lmpipe/generate.py",
     "lmpipe/evaluation.py", "lmpipe/__init__.py"),
    ("lmpipe/common/",),  # errors, file I/O, paths, device, environment defaults
    ("models/",),  # the architectures: plain torch, no lmpipe
]

# Imports the layers would allow that are forbidden anyway: (importers, imported, why). Each side is
# space-separated patterns; * is every project file; !pattern leaves files out; an outside package
# (mlflow) is named by its top-level name.
FORBIDDEN = [
    ("* !lmpipe/cli/ !lmpipe/__main__.py", "lmpipe/cli/",
     "nothing imports the command line: it sits on top of what it calls"),
    ("lmpipe/common/", "* !lmpipe/common/",
     "lmpipe/common/ is the bottom layer of lmpipe: it imports nothing else of the project"),
    ("* !lmpipe/tracking/ !lmpipe/serving.py !lmpipe/serving_model.py", "mlflow",
     "MLflow is used through lmpipe/tracking/ and lmpipe/serving.py only"),
    ("lmpipe/ models/", "prefect", "Prefect is tasks/ and flows/ only: lmpipe runs without it"),
]

# The table must say at least this (issue #9): (importer, imported, allowed?).
EXPECTED = [
    ("lmpipe/ckpt/verify.py", "lmpipe/train/loop.py", False),
    ("lmpipe/ckpt/store.py", "lmpipe/tracking/runs.py", False),
    ("lmpipe/ckpt/store.py", "lmpipe/stages.py", False),
    ("lmpipe/ckpt/store.py", "lmpipe/serving.py", False),
    ("lmpipe/ckpt/store.py", "lmpipe/cli/ckpt.py", False),
    ("models/gpt.py", "lmpipe/common/errors.py", False),
    ("models/gpt.py", "lmpipe/config.py", False),
    ("models/gpt.py", "tasks/train.py", False),
    ("lmpipe/stages.py", "tasks/train.py", False),
    ("lmpipe/cli/main.py", "flows/pipeline.py", False),
    ("tasks/train.py", "lmpipe/cli/main.py", False),
    ("flows/pipeline.py", "lmpipe/cli/ckpt.py", False),
    ("lmpipe/stages.py", "lmpipe/cli/main.py", False),
    ("lmpipe/common/fileio.py", "lmpipe/config.py", False),
    ("lmpipe/common/fileio.py", "lmpipe/__init__.py", False),
    ("lmpipe/common/fileio.py", "models/__init__.py", False),
    ("lmpipe/ckpt/store.py", "mlflow", False),
    ("lmpipe/train/loop.py", "mlflow", False),
    ("models/gpt.py", "mlflow", False),
    ("lmpipe/stages.py", "prefect", False),
    ("lmpipe/cli/__init__.py", "lmpipe/cli/main.py", True),
    ("lmpipe/__main__.py", "lmpipe/cli/main.py", True),
    ("lmpipe/tracking/runs.py", "mlflow", True),
    ("lmpipe/serving_model.py", "mlflow", True),
    ("tasks/train.py", "prefect", True),
    ("flows/pipeline.py", "tasks/train.py", True),
    ("tasks/train.py", "lmpipe/stages.py", True),
    ("lmpipe/stages.py", "lmpipe/train/run.py", True),
    ("lmpipe/train/run.py", "lmpipe/ckpt/store.py", True),
    ("lmpipe/ckpt/store.py", "lmpipe/common/fileio.py", True),
    ("lmpipe/ckpt/rebuild.py", "models/__init__.py", True),
    ("lmpipe/common/device.py", "lmpipe/common/errors.py", True),
]


def _matches(path: str, selector: str) -> bool:
    """path (a project file, or an outside package's name) against FORBIDDEN's selector syntax."""
    def one(pattern: str) -> bool:
        if pattern == "*":
            return "/" in path
        return path.startswith(pattern) if pattern.endswith("/") else path == pattern

    patterns = selector.split()
    return (any(one(p) for p in patterns if not p.startswith("!"))
            and not any(one(p[1:]) for p in patterns if p.startswith("!")))


def _layer_pattern(path: str) -> tuple[int, str]:
    found = [(i, pattern) for i, group in enumerate(LAYERS) for pattern in group
             if _matches(path, pattern)]
    assert len(found) == 1, f"{path} is in {len(found)} layers of LAYERS (tests/test_layout.py)"
    return found[0]


def why_forbidden(importer: str, imported: str) -> str | None:
    """None if importer may import imported (a project file or an outside package), else why not."""
    for who, what, why in FORBIDDEN:
        if _matches(importer, who) and _matches(imported, what):
            return why
    if "/" not in imported:
        return None
    (low, mine), (high, theirs) = _layer_pattern(importer), _layer_pattern(imported)
    if low > high:
        return f"{theirs} is a layer above {mine} in LAYERS (tests/test_layout.py): imports go down"
    return None


def _describe(graph: Graph, e: Edge) -> str:
    where = f" (in {e.function})" if e.function else ""
    target = f"{e.target} ({graph.path(e.target)})" if e.target in graph.files else e.target
    return f"{e.where(graph)}{where}: {e.source} imports {target}"


def _violations(graph: Graph) -> list[tuple[Edge, str]]:
    found = []
    for module in sorted(graph.files):
        for e in graph.edges[module]:
            target = graph.path(e.target) if e.target in graph.files else e.target
            why = why_forbidden(graph.path(module), target)
            if why:
                found.append((e, why))
    return found


def test_the_table_says_what_issue_9_asks():
    wrong = [f"{a} -> {b}: table says {'allowed' if ok else 'forbidden'}"
             for a, b, ok in EXPECTED if (why_forbidden(a, b) is None) != ok]
    assert not wrong, "\n".join(wrong)


def test_every_file_is_in_one_layer():
    graph = build()
    for module in graph.files:
        _layer_pattern(graph.path(module))


def test_no_import_cycles():
    graph = build()
    found = cycles(graph)
    if found:
        pytest.fail("import cycles:\n" + "\n".join(
            "  " + " -> ".join([c[0].source] + [e.target for e in c]) + "\n"
            + "\n".join(f"    {_describe(graph, e)}" for e in c) for c in found), pytrace=False)


def test_imports_follow_the_layers():
    graph = build()
    bad = [(e, why) for e, why in _violations(graph) if e.target != "mlflow"]
    if bad:
        pytest.fail("forbidden imports:\n" + "\n".join(
            f"  {_describe(graph, e)}\n    {why}" for e, why in bad), pytrace=False)


def test_mlflow_is_imported_by_tracking_and_serving_only():
    graph = build()
    bad = [e for e, _ in _violations(graph) if e.target == "mlflow"]
    if bad:
        pytest.fail("mlflow imported outside lmpipe/tracking/ and lmpipe/serving.py:\n"
                    + "\n".join(f"  {_describe(graph, e)}" for e in bad), pytrace=False)


def test_the_top_of_lmpipe_holds_at_most_twelve_modules():
    """Everything else lives in a subpackage named after what it does (issue #9)."""
    from importgraph import ROOT

    top = sorted(p.name for p in (ROOT / "lmpipe").glob("*.py"))
    assert len(top) <= 12, f"{len(top)} modules at the top of lmpipe/: {', '.join(top)}"
