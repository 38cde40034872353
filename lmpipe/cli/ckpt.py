"""`lmpipe ckpt`: list, inspect, verify, diff, doctor, import and export checkpoints, lmpipe's own
and nanoGPT, nanochat, Hugging Face and Lightning ones. Printing only; the work is in lmpipe/ckpt/
(inspection.py, verify.py, doctor.py and convert.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRUST = ("load files that need arbitrary unpickling (can run code stored in the file: "
         "trusted files only)")


def add_parser(sub, add_config_args) -> None:
    ck = sub.add_parser("ckpt",
                        help="list, inspect, verify, diff, doctor, import and export checkpoints",
                        description="Works on lmpipe checkpoints and on nanoGPT ckpt.pt, nanochat "
                                    "directories (model_/meta_/optim_XXXXXX), Hugging Face model "
                                    "directories and Lightning .ckpt files. Files are loaded with "
                                    "weights_only=True and memory-mapped.")
    cs = ck.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    config, as_json, trust = _shared_flags(add_config_args)

    def action(name: str, help: str, *shared, **kw) -> argparse.ArgumentParser:
        """A subcommand with the configuration flags and the shared flags given."""
        return cs.add_parser(name, help=help, parents=[config, *shared], **kw)

    p = action("list", "a table of checkpoints, newest last (reads names and the manifest, no "
                       "tensors)", as_json)
    p.add_argument("dir", nargs="?", default=None,
                   help="directory (default: checkpoint.dir); subdirectories too")
    p.add_argument("--model")
    p.add_argument("--source", help="substring of the data source name")
    p.add_argument("--step", type=int)

    p = action("inspect", "keys, hyperparameters, tensors, optimizer, tokenizer, versions",
               as_json, trust)
    p.add_argument("path", help="a checkpoint file or directory, a glob, 'latest', or an MLflow "
                                "URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH)")

    p = action("verify", "integrity, weights_only loading, NaN/Inf, optimizer consistency; exit 0 "
                         "only if all pass", as_json, trust)
    p.add_argument("path", help="a checkpoint, or a directory: every checkpoint in it")

    p = action("diff", "hyperparameter differences, tensors added/removed/reshaped, weight-change "
                       "norms", as_json, trust)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--top", type=int, default=15,
                   help="tensors to show, largest relative change first")

    p = action("doctor", "diagnose checkpoint trouble and print the command that fixes it",
               as_json, trust,
               epilog="exit status: 0 healthy, 3 fixable (a fix is printed), 4 broken, 2 bad usage")
    p.add_argument("path", help="a checkpoint, a glob, or a directory")

    p = action("import", "convert a nanoGPT ckpt.pt or a nanochat model_XXXXXX.pt into an lmpipe "
                         "checkpoint that 'lmpipe generate' runs and "
                         "'lmpipe resume --no-optimizer' trains", trust)
    p.add_argument("path")
    p.add_argument("--out", help="output directory (default: checkpoint.dir)")
    p.add_argument("--meta",
                   help="nanoGPT's meta.pkl (default: beside the checkpoint, or data/<dataset>/)")
    p.add_argument("--tokenizer", help="an lmpipe tokenizer.json to use instead")
    p.add_argument("--gpt2-tokenizer",
                   help="local GPT-2 tokenizer directory (default: tokenizer.gpt2_path)")

    p = action("export",
               "write weights as safetensors (+ config and tokenizer JSON), or a Hugging Face "
               "directory")
    p.add_argument("path")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors")
    p.add_argument("--out", help="output directory (default: beside the checkpoint)")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA checkpoint: write the base with the adapters merged in (gpt: an "
                        "lmpipe checkpoint file; gpt2: a Hugging Face directory)")


def _shared_flags(add_config_args) -> tuple[argparse.ArgumentParser, ...]:
    """The flags several actions take, each declared once, as argparse parent parsers: the
    configuration (-S, --params; every action), --json and --trust-pickle."""
    config, as_json, trust = (argparse.ArgumentParser(add_help=False) for _ in range(3))
    add_config_args(config)
    as_json.add_argument("--json", action="store_true")
    trust.add_argument("--trust-pickle", action="store_true", help=TRUST)
    return config, as_json, trust


def run(args, cfg_loader) -> int:
    cfg = cfg_loader(args)
    return ACTIONS[args.ckpt_command](args, cfg)


def _resolve(spec: str, cfg) -> Path:
    """'latest', a glob, a path, or an MLflow URI (models:/NAME@ALIAS, ...: downloaded once); a
    manifest passed instead of a checkpoint is refused here."""
    from lmpipe.tracking.uris import resolve

    return resolve(spec, cfg.checkpoint.dir)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()

    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def val_loss_text(val_loss: float | None, val_step: int | None, step: int | None) -> str:
    """A checkpoint's validation loss as list and inspect show it. One saved between evaluations
    (on a signal) says when the last one was, instead of passing that loss off as current."""
    if val_step is not None and val_step != step:
        return f"— (last eval at step {val_step})"
    return "" if val_loss is None else f"{val_loss:.4f}"


def cmd_list(args, cfg) -> int:
    from lmpipe.ckpt.inspection import filter_rows, scan

    directory = args.dir or cfg.checkpoint.dir
    rows = filter_rows(scan(directory), args.model, args.source, args.step)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
        return 0
    if not rows:
        print(f"no checkpoints in {directory}/ match" if any((args.model, args.source, args.step))
              else f"no checkpoints in {directory}/", file=sys.stderr)
        return 0
    mixed = any(r.format != "lmpipe" for r in rows)
    header = (["FORMAT"] if mixed else []) + ["MODEL", "SOURCE", "STEP", "TIME", "SIZE", "VAL LOSS",
                                              "VERIFIED",
                                              "RUN ID", "FILE"]
    body = [([r.format] if mixed else []) + [
        r.model, r.source, "" if r.step is None else str(r.step),
        f"{r.time:%Y-%m-%d %H:%M:%S}" if r.time else "",
        _size(r.size), val_loss_text(r.val_loss, r.val_step, r.step), r.verified, r.run_id[:12],
        str(Path(r.path).relative_to(directory)) if Path(r.path).is_relative_to(directory)
        else r.path] for r in rows]
    print(_table(header, body))
    print(f"{len(rows)} checkpoint(s); VERIFIED ok = size matches the manifest; "
          "'lmpipe ckpt verify' checks sha256, loading, NaN/Inf and optimizer state",
          file=sys.stderr)
    return 0


def cmd_inspect(args, cfg) -> int:
    from lmpipe.ckpt.inspection import describe, flatten
    from lmpipe.ckpt.views import open_view

    d = describe(open_view(_resolve(args.path, cfg), args.trust_pickle))
    if args.json:
        print(json.dumps(d, indent=1, default=str))
        return 0
    out = [f"{d['path']}  ({d['format']}"
           + (f", format version {d['format_version']}" if d["format_version"] else "") + ")"]
    out += [f"  file {f['path']}  {_size(f['size'])}" for f in d["files"]]
    out += ["", "=== Keys ===", "  " + ", ".join(map(str, d["keys"]))]
    out += ["", "=== Training state ===", f"  step: {d['step']}"]
    out += _info_lines(d["info"], d["step"])
    out += ["", "=== Architecture ==="] + [f"  {k}: {v}" for k, v in d["architecture"].items()]
    out += ["", "=== Hyperparameters ==="] + [f"  {k}: {v}" for k,
                                              v in flatten(d["hyperparameters"]).items()]
    out += ["", "=== Model ==="] + [f"  {t['name']}: {tuple(t['shape'])} {t['dtype']} "
                                    f"({t['params']:,} params)"
                                    for t in d["tensors"]]
    tied = d["total_params"] - d["unique_params"]
    out.append(f"\nTotal parameters: {d['total_params']:,}" + (f" ({d['unique_params']:,} unique; "
                                                               f"{tied:,} in tied "
                                                                 "weights counted once)" if tied
                                                               else ""))
    out += ["", "=== Optimizer ==="] + ([f"  {json.dumps(o)}" for o in d["optimizer"]]
                                        if d["optimizer"]
                                        else ["  none (inference only)"])
    t = d["tokenizer"]
    out += ["", "=== Tokenizer ===",
            f"  {t['kind']}, vocab size {t['vocab_size']} ({t['where']})" if t else "  none found"]
    if d.get("lora"):
        out += ["", "=== LoRA (adapter tensors only) ==="] + [f"  {k}: {v}"
                                                            for k, v in d["lora"].items()]
    out += ["",
            "=== Versions ==="] + ([f"  {k}: {v}" for k,
                                    v in d["versions"].items()] or ["  not recorded"])
    print("\n".join(out))
    return 0


def _info_lines(info: dict, step: int | None) -> list[str]:
    shown = {k: v for k, v in info.items() if k != "val_step"}
    if info.get("val_step") not in (None, step):  # an earlier evaluation's: say which
        shown["val_loss"] = val_loss_text(None, info["val_step"], step)
    return [f"  {k}: {v}" for k, v in shown.items()]


def _targets(path: str, cfg) -> list[Path]:
    from lmpipe.ckpt.inspection import scan
    from lmpipe.ckpt.views import hf_weight_files

    p = _resolve(path, cfg)
    if p.is_dir() and not ((p / "config.json").exists() and hf_weight_files(p)):
        return [Path(r.path) for r in scan(p)]
    return [p]


def cmd_verify(args, cfg) -> int:
    from lmpipe.ckpt.verify import check
    from lmpipe.common.errors import UserError

    targets = _targets(args.path, cfg)
    if not targets:
        raise UserError(f"{args.path}: no checkpoints found; nothing to verify")
    reports = [check(t, args.trust_pickle) for t in targets]
    if args.json:
        print(json.dumps([{"path": str(r.path), "ok": r.ok,
                           "problems": [vars(p) for p in r.problems],
                           "notes": r.notes} for r in reports], indent=1))
    else:
        for r in reports:
            what = f" ({r.view.format}, step {r.view.step})" if r.view else ""
            print(f"ok    {r.path}{what}" if r.ok
                  else "\n".join(f"FAIL  {r.path}: {p.kind}: {p.text}" for p in r.problems))
            for n in r.notes:
                print(f"note  {r.path}: {n}")
        bad = sum(not r.ok for r in reports)
        print(f"{len(reports)} checked, {bad} with problems", file=sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


def cmd_diff(args, cfg) -> int:
    from lmpipe.ckpt.inspection import diff
    from lmpipe.ckpt.views import open_view

    d = diff(open_view(_resolve(args.a, cfg), args.trust_pickle),
             open_view(_resolve(args.b, cfg), args.trust_pickle))
    if args.json:
        print(json.dumps(d, indent=1, default=str))
        return 0
    out = [f"A: {d['a']}", f"B: {d['b']}", "", "=== Hyperparameters ==="]
    out += [f"  {h['key']}: {h['a']!r} -> {h['b']!r}" for h
            in d["hyperparameters"]] or ["  identical"]
    out += ["", "=== Tensors ==="]
    out += [f"  added:    {n}" for n in d["added"]] + [f"  removed:  {n}" for n in d["removed"]]
    out += [f"  reshaped: {r['name']}: {tuple(r['a'])} -> {tuple(r['b'])}" for r in d["reshaped"]]
    if not (d["added"] or d["removed"] or d["reshaped"]):
        out.append("  same names and shapes")
    out += ["", f"=== Weight change: relative {d['relative_change']:.4g} overall; "
                f"{d['identical']} of {len(d['changes'])} tensors identical ===",
            f"  {'tensor':<40} {'|B-A|':>12} {'|B-A|/|A|':>12} {'max |B-A|':>12}"]
    out += [f"  {c['name']:<40} {c['norm']:>12.4g} {c['relative']:>12.4g} {c['max_abs']:>12.4g}"
            for c in d["changes"][:args.top]]
    print("\n".join(out))
    return 0


def cmd_doctor(args, cfg) -> int:
    import os
    from dataclasses import asdict

    from lmpipe.ckpt.doctor import EXIT, diagnose

    forced = any(o.strip().startswith("model.") for o
                 in args.overrides) or bool(os.environ.get("MODEL_TYPE"))
    results = diagnose(args.path, asdict(cfg.model), forced, args.trust_pickle)
    worst = max((r.status for r in results), key=list(EXIT).index)
    if args.json:
        print(json.dumps({"status": worst, "checkpoints": [r.to_json() for r in results]}, indent=1,
                         default=str))
        return EXIT[worst]
    for r in results:
        if not r.findings:
            print(f"healthy  {r.path} ({r.summary})")
            continue
        print(f"{r.status:<8} {r.path} ({r.summary})")
        for f in r.findings:
            print(f"  [{f.severity}] {f.title}")
            print("\n".join(f"      {line}" for line in f.detail))
            if f.fix:
                print(f"      fix: {f.fix}")
    print(f"doctor: {worst}", file=sys.stderr)
    return EXIT[worst]


def cmd_import(args, cfg) -> int:
    from lmpipe.ckpt.convert import import_checkpoint

    out = import_checkpoint(_resolve(args.path, cfg), args.out or cfg.checkpoint.dir, args.meta,
                            args.tokenizer,
                            args.gpt2_tokenizer or cfg.tokenizer.gpt2_path, args.trust_pickle)
    print(f"imported {args.path} -> {out}\ngenerate with: lmpipe generate --checkpoint {out}")
    return 0


def cmd_export(args, cfg) -> int:
    from lmpipe.ckpt.convert import export, export_merged

    if args.merge:
        out = export_merged(_resolve(args.path, cfg), args.out)
        print(f"merged {args.path} -> {out}")
        return 0
    out = export(_resolve(args.path, cfg), args.format, args.out)
    print(f"exported {args.path} -> {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


ACTIONS = {"list": cmd_list, "inspect": cmd_inspect, "verify": cmd_verify, "diff": cmd_diff,
           "doctor": cmd_doctor,
           "import": cmd_import, "export": cmd_export}
