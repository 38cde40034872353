"""The `lmpipe` command line. Heavy libraries (torch, MLflow, Prefect) are imported inside the
commands that need them, so `lmpipe --help` answers at once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGES = ("prepare", "tokenizer", "train", "evaluate", "generate", "register")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a params.yaml value (same syntax as 'dvc exp run -S'); repeatable")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmpipe",
        description="Train small GPT-style language models on your own text, with checkpoints you can trust.",
        epilog="Settings come from params.yaml; environment variables (ENABLE_CHECKPOINTS, CHECKPOINT_INTERVAL, "
               "CHECKPOINT_DIR, MODEL_TYPE, TRAINING_STEPS, TRAINING_DATA_SOURCE, DEVICE) and -S override it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline as a Prefect flow (ephemeral local server)")
    _add_config_args(p)

    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml's stages call)")
    p.add_argument("name", choices=STAGES)
    _add_config_args(p)

    p = sub.add_parser("resume", help="resume training from a checkpoint",
                       description="Without --steps, training continues to the run's planned total, bit-exact "
                                   "with an uninterrupted run. --steps N trains N more steps, the cosine decay "
                                   "continuing from the checkpoint's LR down to train.min_lr at the new end; "
                                   "--lr X restarts that decay from peak X.")
    p.add_argument("--checkpoint", default="latest", help="PATH, a glob, or 'latest' (default): the newest "
                                                          "checkpoint in checkpoint.dir that verifies")
    p.add_argument("--step", type=int, default=None, help="with 'latest': that step, or the nearest earlier one")
    p.add_argument("--steps", type=int, default=None, help="train N more steps past the checkpoint")
    p.add_argument("--lr", type=float, default=None, help="restart the schedule from this peak learning rate")
    p.add_argument("--source", default=None, help="continue on new data (a .md/.txt file or directory)")
    p.add_argument("--no-optimizer", action="store_true",
                   help="start a fresh optimizer (skip saved optimizer state) with an LR re-warmup")
    p.add_argument("--warmup", type=int, default=None, help="re-warmup steps (default with --no-optimizer: 100)")
    _add_config_args(p)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", default="latest", help="PATH, a glob, or 'latest' (default) in checkpoint.dir")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda", "mps"))
    _add_config_args(p)

    p = sub.add_parser("config", help="print the resolved configuration (params.yaml + env + -S)")
    _add_config_args(p)
    from lmpipe import cli_ckpt

    cli_ckpt.add_parser(sub, _add_config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    return guarded(lambda: COMMANDS[args.command](args))


def guarded(fn) -> int:
    """Run a command: offline defaults on; a UserError becomes its one-line message and exit code."""
    from lmpipe.env import apply_offline_defaults
    from lmpipe.errors import UserError

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
    from lmpipe.config import load_config

    return load_config(args.params, args.overrides)


def cmd_config(args) -> int:
    import yaml

    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_stage(args) -> int:
    import os

    from lmpipe import stages
    from lmpipe.checkpoint import warn
    from lmpipe.config import ENV_VARS

    cfg = _config(args)
    for var, keys in ENV_VARS.items():  # stages are what dvc.yaml runs: DVC tracks params.yaml only
        if os.environ.get(var):
            warn(f"{var}={os.environ[var]} overrides {', '.join(keys)} from params.yaml, but DVC does not "
                 f"track environment variables; prefer 'dvc exp run -S {keys[0]}=...'")
    fn = {"prepare": stages.prepare, "tokenizer": stages.build_tokenizer, "train": stages.train,
          "evaluate": stages.evaluate, "generate": stages.generate, "register": stages.register}[args.name]
    result = fn(cfg, entry="dvc") if args.name == "train" else fn(cfg)
    print(f"{args.name}: " + ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("text", "checkpoints")))
    return 0


def cmd_resume(args) -> int:
    from dataclasses import replace

    from lmpipe import stages
    from lmpipe.checkpoint import resolve_checkpoint
    from lmpipe.errors import UserError
    from lmpipe.training_run import Resume, preflight_resume

    cfg = _config(args)
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup)):
        if value is not None and value < (1 if flag == "--steps" else 0):
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    path = resolve_checkpoint(args.checkpoint, cfg.checkpoint.dir, step=args.step)
    warmup = args.warmup if args.warmup is not None else (100 if args.no_optimizer else 0)
    resume = Resume(path, args.steps, args.lr, args.no_optimizer, warmup)
    preflight_resume(resume, args.source, cfg.data.val_fraction, cfg.data.seed)  # before anything is written
    if any(o.strip().startswith("model.") for o in args.overrides):  # an architecture asked for explicitly
        from lmpipe.checkpoint import load_checkpoint
        from lmpipe.training_run import check_architecture

        check_architecture(load_checkpoint(path, mmap=True), cfg.model, path, "lmpipe resume")
    if args.source:
        cfg = replace(cfg, data=replace(cfg.data, source=args.source))
        stages.prepare(cfg)
    info = stages.train(cfg, entry="cli", resume=resume)
    print(f"resumed from {path}; trained to step {info['step']}; final checkpoint {info['checkpoint']}; "
          f"MLflow run {info['run_id']}")
    return 0


def cmd_run(args) -> int:
    from importlib.metadata import entry_points

    from lmpipe import stages
    from lmpipe.errors import UserError

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
             f"  checkpoints:      {t['checkpoint_dir']}/ ({len(t['checkpoints'])} saved; final: {Path(t['checkpoint']).name})",
             f"  MLflow run:       {t['run_id']} (experiment {t['experiment_id']}, store {tracking.tracking_uri()})",
             f"  open the UI:      {tracking.ui_hint()}",
             f"  registered model: {reg['uri']}" if reg.get("uri") else "  registered model: (registration off)",
             "  metrics:          " + ", ".join(f"{k} {r['metrics'][k]:.4f}" for k in ("val_loss", "perplexity", "bits_per_byte")),
             "  sample:", "", r["sample"]["text"], "=" * 72]
    return "\n".join(lines)


def cmd_generate(args) -> int:
    from lmpipe.checkpoint import load_for_inference, resolve_checkpoint
    from lmpipe.device import pick_device
    from lmpipe.sampling import generate_text

    cfg = _config(args)
    g = cfg.generate
    path = resolve_checkpoint(args.checkpoint, cfg.checkpoint.dir)
    device = pick_device(args.device or g.device)
    ckpt, model, tok = load_for_inference(path, device)
    pick = lambda a, d: d if a is None else a  # noqa: E731
    text = generate_text(model, tok, pick(args.prompt, g.prompt), pick(args.max_new_tokens, g.max_new_tokens),
                         pick(args.temperature, g.temperature), pick(args.top_k, g.top_k),
                         pick(args.seed, g.seed), device)
    print(f"[{path.name}, step {ckpt['step']}, {device}]", file=sys.stderr)
    print(text)
    return 0


def cmd_ckpt(args) -> int:
    from lmpipe import cli_ckpt

    return cli_ckpt.run(args, _config)


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "resume": cmd_resume, "generate": cmd_generate,
            "config": cmd_config, "ckpt": cmd_ckpt}

if __name__ == "__main__":
    sys.exit(main())
