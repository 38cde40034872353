"""The A/B flow: N configurations, each a list of `-S` overrides on params.yaml, trained side by
side (at most max_concurrency at once) on one prepared dataset and tokenizer, each an MLflow child
run of one parent run; it ends with `lmpipe compare`'s table of their final checkpoints, as a
Prefect artifact (key lmpipe-ab) and as the parent run's compare.md and compare.json."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.guard import guarded
from lmpipe import stages
from lmpipe.common.errors import ConfigError, UserError, joined
from lmpipe.config import Config, load_config
from tasks.ab import close_ab_run, compare_runs, open_ab_run
from tasks.prepare import prepare_data_cached
from tasks.tokenize import build_tokenizer_cached
from tasks.train import train_model

ARTIFACT_KEY = "lmpipe-ab"
# Settings every configuration must share: data/ holds one prepared dataset and one tokenizer, and
# the comparison scores and samples every model the same way.
SHARED_SECTIONS = ("data", "tokenizer", "evaluate", "generate")


@flow(name="lmpipe-ab")
@guarded
def ab_test(configs: list[list[str]], params_file: str = "params.yaml",
            max_concurrency: int = 2) -> dict:
    """Train each configuration (overrides on params_file) as a child run of one MLflow parent
    run, at most max_concurrency at once, and compare their final checkpoints."""
    cfgs, names = plan(configs, params_file, max_concurrency)
    base = cfgs[0].to_dict()
    prepared = prepare_data_cached(base)
    build_tokenizer_cached(base, wait_for=[prepared])
    parent = open_ab_run(base, names, {"params_file": params_file,
                                       "max_concurrency": max_concurrency,
                                       "prefect_flow_run_id": runtime.flow_run.id})
    ok = False
    try:
        children = [child(cfg, i, name, parent) for i, (cfg, name)
                    in enumerate(zip(cfgs, names, strict=True), 1)]
        trained = train_all(children, max_concurrency)
        compared = compare_runs(base, trained, names, parent)
        ok = True
    finally:
        close_ab_run(base, parent, ok)
    runs = [{"name": n, "run_id": t["run_id"], "checkpoint": t["checkpoint"]}
            for n, t in zip(names, trained, strict=True)]
    create_markdown_artifact(markdown=summary(base, parent, runs, compared["table"]),
                             key=ARTIFACT_KEY,
                             description=f"A/B of {len(runs)} configurations, MLflow run {parent}")
    return {"parent_run_id": parent, "runs": runs, "table": compared["table"]}


def train_all(children: list[dict], max_concurrency: int) -> list[dict]:
    """train_model on each configuration, at most max_concurrency at once (a thread pool: each
    training is mostly torch, which releases the GIL); waits for all before raising a failure."""
    with ThreadPoolTaskRunner(max_workers=max_concurrency) as runner:
        futures = [runner.submit(train_model.with_options(task_run_name=f"train-{i}"),
                                 {"config": c}) for i, c in enumerate(children, 1)]
        wait(futures)
        return [f.result() for f in futures]


def plan(configs: list[list[str]], params_file: str,
         max_concurrency: int) -> tuple[list[Config], list[str]]:
    """Each configuration resolved and checked, with its name, before any work: raises UserError
    (one line) on too few, unknown or invalid settings, settings that must be shared but differ,
    or two configurations that are the same."""
    if len(configs) < 2:
        raise UserError(f"the A/B flow needs at least two configurations; got {len(configs)}: "
                        "pass configs as a list of override lists, e.g. "
                        '[[], ["train.lr=0.01"]] ([] is params.yaml as it is)')
    if max_concurrency < 1:
        raise UserError(f"max_concurrency must be a positive integer, got {max_concurrency}")
    names = [f"{i}: {' '.join(o) if o else params_file}" for i, o in enumerate(configs, 1)]
    cfgs, problems = [], []
    for name, overrides in zip(names, configs, strict=True):
        try:
            cfgs.append(load_config(params_file, overrides))
        except ConfigError as e:
            problems += [f"configuration {name!r}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    check_shared(cfgs, names)
    for cfg, name in zip(cfgs, names, strict=True):
        if cfg.train.resume:
            raise UserError(f"configuration {name!r}: train.resume={cfg.train.resume!r}; the A/B "
                            "flow trains every configuration from scratch: leave it unset")
        try:
            stages.preflight(cfg)
        except UserError as e:
            raise UserError(f"configuration {name!r}: {e}") from None
    return cfgs, names


def shared(cfg: Config) -> dict[str, object]:
    """The settings one A/B test shares: SHARED_SECTIONS, the experiment, the tokenizer resolved."""
    found = {k: v for k, v in cfg.flat().items() if k.split(".")[0] in SHARED_SECTIONS}
    found["tracking.experiment"] = cfg.tracking.experiment
    found["tokenizer.kind (resolved)"] = cfg.tokenizer_kind()
    if cfg.model.type == "gpt2":  # its tokenizer is the pretrained model's own
        found["model.pretrained (the tokenizer)"] = cfg.model.pretrained
    return found


def check_shared(cfgs: list[Config], names: list[str]) -> None:
    first = shared(cfgs[0])
    for i, (cfg, name) in enumerate(zip(cfgs, names, strict=True)):
        differ = [f"{k}={v!r} (not {first.get(k)!r})" for k, v in shared(cfg).items()
                  if first.get(k) != v]
        if differ:
            raise UserError(f"configuration {name!r} changes {joined(differ)} from configuration "
                            f"{names[0]!r}; every configuration of an A/B test shares the data, "
                            "the tokenizer, the experiment and the evaluate and generate settings: "
                            "vary model.*, train.* or checkpoint.* settings only")
        same = [n for c, n in zip(cfgs[:i], names, strict=False) if c == cfg]
        if same:
            raise UserError(f"configurations {same[0]!r} and {name!r} are the same settings; "
                            "drop one or change it")


def child(cfg: Config, i: int, name: str, parent_run_id: str) -> dict:
    """A configuration as a child run of the parent: its name, and its own checkpoint directory
    (<checkpoint.dir>/ab/<parent run id>/<i>-<overrides>), so that no two runs share one."""
    slug = re.sub(r"[^\w.=-]+", "_", name.split(": ", 1)[1])[:60]
    where = Path(cfg.checkpoint.dir) / "ab" / parent_run_id / f"{i}-{slug}"
    return replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(where)),
                   tracking=replace(cfg.tracking, parent_run_id=parent_run_id,
                                    run_name=name)).to_dict()


def summary(config: dict, parent_run_id: str, runs: list[dict], table: str) -> str:
    """The Prefect artifact: which run is which, then the comparison table."""
    lines = [f"# A/B test: {len(runs)} configurations", "",
             f"MLflow parent run `{parent_run_id}` in experiment "
             f"`{config['tracking']['experiment']}`; one child run per configuration.", "",
             "| configuration | MLflow run | final checkpoint |", "|---|---|---|"]
    lines += [f"| {r['name']} | `{r['run_id']}` | `{r['checkpoint']}` |" for r in runs]
    return "\n".join(lines + ["", "```text", table.rstrip("\n"), "```", ""])
