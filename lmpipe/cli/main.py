"""The `lmpipe` command line. Heavy libraries (torch, MLflow, Prefect) are imported inside the
commands that need them, so `lmpipe --help` answers at once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGES = ("prepare", "tokenizer", "train", "evaluate", "generate", "register")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a params.yaml value (same syntax as 'dvc exp run -S'); "
                        "repeatable")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmpipe",
        description="Train small GPT-style language models on your own text, with checkpoints you "
                    "can trust.",
        epilog="Settings come from params.yaml; environment variables (ENABLE_CHECKPOINTS, "
               "CHECKPOINT_INTERVAL, CHECKPOINT_DIR, MODEL_TYPE, TRAINING_STEPS, "
               "TRAINING_DATA_SOURCE, DEVICE) and -S override it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run",
                       help="run the whole pipeline as a Prefect flow (ephemeral local server)")
    _add_config_args(p)

    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml's stages call)")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--attempt", default=None, metavar="DIR",
                   help="train only: one attempt of the Prefect training task, which writes "
                        "DIR/request.json (the resolved configuration) and reads what the "
                        "attempt reports there (lmpipe/train/attempts.py)")
    _add_config_args(p)

    p = sub.add_parser("resume", help="resume training from a checkpoint",
                       description="Without --steps, training continues to the run's planned "
                                   "total, bit-exact with an uninterrupted run. --steps N trains "
                                   "N more steps, the cosine decay continuing from the "
                                   "checkpoint's LR down to train.min_lr at the new end; --lr X "
                                   "restarts that decay from peak X. Without --source, training "
                                   "continues on the checkpoint's own data (found by its recorded "
                                   "source and checked against its fingerprint). A checkpoint "
                                   "without a training state (imported with 'lmpipe ckpt import') "
                                   "resumes with --no-optimizer.")
    p.add_argument("--checkpoint", default="latest",
                   help="PATH, a glob, 'latest' (default: the newest checkpoint in "
                        "checkpoint.dir that verifies), or an MLflow URI: models:/NAME/VERSION, "
                        "models:/NAME@ALIAS, runs:/RUN_ID/PATH (downloaded once, with the "
                        "optimizer state)")
    p.add_argument("--step", type=int, default=None,
                   help="with 'latest': that step, or the nearest earlier one")
    p.add_argument("--steps", type=int, default=None, help="train N more steps past the checkpoint")
    p.add_argument("--lr", type=float, default=None,
                   help="restart the schedule from this peak learning rate")
    p.add_argument("--source", default=None,
                   help="continue on new data (a .md/.txt file or directory)")
    p.add_argument("--no-optimizer", action="store_true",
                   help="start a fresh optimizer (skip saved optimizer state) with an LR re-warmup")
    p.add_argument("--warmup", type=int, default=None,
                   help="re-warmup steps (default with --no-optimizer: 100)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (steps, learning rate, data, optimizer) and the command "
                        "that starts it; train nothing")
    _add_config_args(p)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", default="latest",
                   help="PATH, a glob, 'latest' (default) in checkpoint.dir, or an MLflow "
                        "URI: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH")
    _add_sampling_args(p)
    _add_config_args(p)

    _add_compare_parser(sub)

    _add_serve_parser(sub)
    _add_runs_parser(sub)

    p = sub.add_parser("config", help="print the resolved configuration (params.yaml + env + -S)")
    _add_config_args(p)

    p = sub.add_parser("tracking", help="MLflow writes buffered on disk while the tracking "
                                        "server was down")
    p.add_argument("action", choices=("flush",),
                   help="flush: send them now (exit 1 if a server still does not answer)")
    from lmpipe.cli import ckpt as cli_ckpt

    cli_ckpt.add_parser(sub, _add_config_args)
    return parser


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """generate's and compare's sampling flags; unset ones come from the generate section."""
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda", "mps"))


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="A/B: score, sample and time two or more checkpoints side "
                                       "by side",
                       description="Each checkpoint is verified and loaded, scored on the same "
                                   "text (bits per byte compare across tokenizers; loss and "
                                   "perplexity are in each model's own tokens), sampled with the "
                                   "same prompt and seed, and timed. Prints a table and the "
                                   "samples.")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="PATH, a glob (its newest match), 'latest' in checkpoint.dir, or an "
                        "MLflow URI (models:/NAME/VERSION, models:/NAME@ALIAS, "
                        "runs:/RUN_ID/PATH); two or more")
    p.add_argument("--text", default=None,
                   help="the text to score (default: data/prepared/val.txt)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="score at most N batches of each model's windows (default: "
                        "evaluate.max_batches; 0: the whole text)")
    _add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--log", action="store_true",
                   help="also record the comparison as an MLflow run (tracking.experiment), "
                        "with compare.md and compare.json as artifacts")
    _add_config_args(p)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a registered model version over HTTP (mlflow models "
                                     "serve)",
                       description="Checks that the URI resolves and that the version's "
                                   "checkpoint artifact is in the store, then runs 'mlflow models "
                                   "serve --env-manager local' on it: POST /invocations with "
                                   "dataframe_split, dataframe_records or inputs payloads, and "
                                   "params max_new_tokens, temperature, top_k, seed.")
    p.add_argument("uri", nargs="?", default=None, metavar="URI",
                   help="models:/<name>/<version>, models:/<name>@<alias> or runs:/<id>/model "
                        "(default: models:/<the model 'lmpipe run' registers>@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    _add_config_args(p)


def _add_runs_parser(sub) -> None:
    p = sub.add_parser("runs", help="a table of an experiment's MLflow runs: the params that "
                                    "differ, final metrics, model versions and aliases")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN_ID",
                   help="only these runs (ids, or their first 8+ characters), in this order")
    _add_config_args(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    return guarded(lambda: COMMANDS[args.command](args))


def guarded(fn) -> int:
    """Run a command: offline defaults on; a UserError becomes its one-line message and exit
    code."""
    from lmpipe.common.env import apply_offline_defaults
    from lmpipe.common.errors import UserError

    apply_offline_defaults()
    try:
        return fn()
    except UserError as e:
        for line in str(e).splitlines():
            print(f"lmpipe: {e.prefix}{line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmpipe: interrupted", file=sys.stderr)
        return 130


def _config(args):
    """The resolved configuration; a warning line for each setting given that does nothing."""
    from lmpipe.common.errors import warn
    from lmpipe.config import inert_settings, load_config

    cfg = load_config(args.params, args.overrides)
    for line in inert_settings(cfg, args.overrides):
        warn(line)
    return cfg


def cmd_config(args) -> int:
    import yaml

    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_stage(args) -> int:
    import os

    from lmpipe import stages
    from lmpipe.common.errors import warn
    from lmpipe.config import ENV_VARS

    if args.attempt:
        return _train_attempt(args)
    cfg = _config(args)
    for var, keys in ENV_VARS.items():  # stages are what dvc.yaml runs: DVC tracks params.yaml only
        if os.environ.get(var):
            warn(f"{var}={os.environ[var]} overrides {', '.join(keys)} from params.yaml, but DVC "
                 f"does not track environment variables; prefer 'dvc exp run -S {keys[0]}=...'")
    fn = {"prepare": stages.prepare, "tokenizer": stages.build_tokenizer, "train": stages.train,
          "evaluate": stages.evaluate, "generate": stages.generate,
          "register": stages.register}[args.name]
    result = fn(cfg, entry="dvc") if args.name == "train" else fn(cfg)
    if not result:  # a rank > 0 of a torchrun job: rank 0 reports
        return 0
    print(f"{args.name}: " + ", ".join(f"{k}={v}" for k,
                                       v in result.items() if k not in ("text", "checkpoints")))
    return 0


def _train_attempt(args) -> int:
    """`lmpipe stage train --attempt DIR`: train the configuration DIR/request.json holds, reporting
    in DIR (the run id as soon as the run starts, the result, a UserError) for the parent."""
    from lmpipe import stages
    from lmpipe.common.errors import UserError
    from lmpipe.config import config_from_dict
    from lmpipe.train import attempts

    if args.name != "train" or args.overrides or args.params != "params.yaml":
        raise UserError("--attempt DIR: only 'lmpipe stage train' takes it, and its configuration "
                        "comes from DIR/request.json; leave out -S and --params")
    directory = Path(args.attempt)
    config, entry, resume = attempts.read_request(directory)
    try:
        info = stages.train(config_from_dict(config), entry=entry, resume=resume, out=directory)
    except UserError as e:  # the parent reports it (attempts.failure), once
        attempts.record_error(directory, e)
        return e.exit_code
    if info:  # not a rank > 0 of a torchrun job
        print(f"train: run_id={info['run_id']}, step={info['step']}, "
              f"checkpoint={info['checkpoint']}")
    return 0


def cmd_resume(args) -> int:
    from lmpipe import stages
    from lmpipe.tracking.uris import is_uri
    from lmpipe.train import resume as resuming

    cfg = _config(args)
    _check_resume_flags(args)
    plan = stages.plan_resume(cfg, args.checkpoint, step=args.step, steps=args.steps, lr=args.lr,
                              source=args.source, no_optimizer=args.no_optimizer,
                              warmup=args.warmup, overrides=args.overrides)
    _warn_ignored_on_resume(args)
    if args.dry_run:
        print(resuming.describe(plan.ckpt, plan.path, plan.resume, plan.choice))
        print(f"start it with: {resume_command(plan.path, args)}")
        return 0
    info = stages.resume(cfg, plan)
    origin = f"{args.checkpoint} ({plan.path})" if is_uri(args.checkpoint) else plan.path
    print(f"resumed from {origin}; trained to step {info['step']}; final checkpoint "
          f"{info['checkpoint']}; MLflow run {info['run_id']}")
    return 0


def _check_resume_flags(args) -> None:
    from lmpipe.common.errors import UserError

    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup)):
        if value is not None and value < (1 if flag == "--steps" else 0):
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be a positive number, got {args.lr}")


def _explicit(args) -> dict[str, str]:
    from lmpipe.config import explicit_settings

    return explicit_settings(args.overrides)


def _warn_ignored_on_resume(args) -> None:
    """A resume trains with the checkpoint's own training, tokenizer and data settings: say so for
    each one the user set, with the flag that does what they meant."""
    from lmpipe.common.errors import warn

    instead = {"train": "--steps N / --lr X",
               "tokenizer": "nothing (the checkpoint's tokenizer is kept)",
               "data": "--source PATH"}
    for key, where in _explicit(args).items():
        section = key.split(".", 1)[0]
        # where and in how many processes it trains: the current settings, not the checkpoint's
        if section in instead and key not in ("train.device", "train.nproc") \
                and not (section == "data" and args.source):
            warn(f"{key} (from {where}) has no effect on a resume, which keeps the checkpoint's "
                 f"{section} settings; use {instead[section]}")


def resume_command(path: Path, args) -> str:
    """The `lmpipe resume` command line that starts what --dry-run described."""
    import shlex

    from lmpipe.tracking.uris import is_uri

    spec = args.checkpoint if is_uri(args.checkpoint) else str(path)  # a URI stays a URI
    parts = ["lmpipe", "resume", "--checkpoint", spec]
    for flag, value in (("--steps", args.steps), ("--lr", args.lr), ("--source", args.source),
                        ("--warmup", args.warmup)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--no-optimizer"] if args.no_optimizer else []
    parts += [a for o in args.overrides for a in ("-S", o)]
    return shlex.join(parts)


def cmd_run(args) -> int:
    from importlib.metadata import entry_points

    from lmpipe import stages
    from lmpipe.common.errors import UserError

    cfg = _config(args)
    stages.preflight(cfg)
    found = entry_points(group="lmpipe.flows", name="pipeline")
    if not found:
        raise UserError("the pipeline flow is not installed (entry point lmpipe.flows:pipeline); "
                        "reinstall with 'make setup'")
    result = next(iter(found)).load()(cfg, overrides=args.overrides, params_file=args.params)
    print(summary(result))
    return 0


def summary(r: dict) -> str:
    from lmpipe import tracking

    t, reg = r["train"], r["registered"]
    lines = ["", "=" * 72, "lmpipe run finished",
             f"  checkpoints:      {t['checkpoint_dir']}/ ({len(t['checkpoints'])} saved; final: "
             f"{Path(t['checkpoint']).name})",
             f"  MLflow run:       {t['run_id']} (experiment {t['experiment_id']}, store "
             f"{tracking.tracking_uri()})",
             f"  open the UI:      {tracking.ui_hint(t['experiment_id'])}",
             *_registered_lines(reg),
             # The evaluate stage's numbers (MLflow eval_*), not training's val_loss_est.
             f"  evaluation:       {int(r['metrics']['tokens'])} val tokens, final checkpoint: "
             + ", ".join(f"{k} {r['metrics'][k]:.4f}" for k in ("val_loss", "perplexity",
                                                                 "bits_per_byte")),
             "  sample:", "", r["sample"]["text"], "=" * 72]
    return "\n".join(lines)


def _registered_lines(reg: dict) -> list[str]:
    """The registered version, its aliases, and why it was (not) promoted to champion."""
    if not reg.get("uri"):
        return ["  registered model: (registration off)"]
    aliases = reg.get("aliases", [])
    lines = [f"  registered model: {reg['uri']}"]
    if aliases:
        lines[0] += f", alias {' + '.join(aliases)} (models:/{reg['name']}@{aliases[-1]})"
    if reg.get("decision"):
        lines.append(f"  promotion:        {reg['decision']}")
    return lines


def cmd_generate(args) -> int:
    from lmpipe import stages

    out = stages.sample(_config(args), args.checkpoint, prompt=args.prompt,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed, device=args.device)
    print(f"[{Path(out['checkpoint']).name}, step {out['step']}, {out['device']}]", file=sys.stderr)
    print(out["text"])
    return 0


def cmd_compare(args) -> int:
    from lmpipe import compare

    cfg = _config(args)
    s = compare.settings(cfg, args.text, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                         device=args.device, max_batches=args.max_batches)
    paths = compare.resolve(args.checkpoints, cfg.checkpoint.dir)
    rows = compare.compare(paths, s)
    print(compare.to_json(rows, s) if args.json else compare.render_table(rows, s), end="",
          flush=True)
    if args.log:
        run_id = compare.log(rows, s, cfg.tracking.experiment)
        print(f"MLflow run {run_id} (experiment {cfg.tracking.experiment}): compare.md, "
              "compare.json", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    import os

    from lmpipe import data, stages
    from lmpipe.common.errors import UserError
    from lmpipe.tracking import serve

    cfg = _config(args)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    uri = args.uri or "models:/{}@champion".format(
        stages.registered_name(cfg, data.resolve_source(cfg.data.source).name))
    where = serve.require_checkpoint(uri)
    argv, env = serve.serve_command(uri, args.host, args.port)
    print(f"lmpipe: serving {uri} ({where}) at http://{args.host}:{args.port}/invocations",
          file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)  # the server takes this process: Ctrl-C and signals reach it


def cmd_runs(args) -> int:
    from lmpipe.tracking import report

    cfg = _config(args)
    runs = report.select(args.experiment or cfg.tracking.experiment, args.compare)
    print(report.render(report.table(runs)), end="", flush=True)
    if args.compare:
        print(f"compare them in the MLflow UI: {report.compare_url(runs)}", file=sys.stderr)
    return 0


def cmd_tracking(args) -> int:
    from lmpipe.tracking import buffer, runs

    print(buffer.flush_all(runs.senders()))
    return 0


def cmd_ckpt(args) -> int:
    from lmpipe.cli import ckpt as cli_ckpt

    return cli_ckpt.run(args, _config)


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "resume": cmd_resume, "generate": cmd_generate,
            "compare": cmd_compare, "config": cmd_config, "ckpt": cmd_ckpt, "serve": cmd_serve,
            "runs": cmd_runs, "tracking": cmd_tracking}

if __name__ == "__main__":
    sys.exit(main())
