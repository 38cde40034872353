"""The pipeline flow: prepare_data → build_tokenizer → train_model → evaluate_model → generate_text
→ register_model. With no server configured it runs on Prefect's ephemeral local server."""
from __future__ import annotations

from prefect import flow

from flows.guard import guarded
from lmpipe.config import Config, load_config
from tasks.evaluate import evaluate_model
from tasks.generate import generate_text
from tasks.prepare import prepare_data_cached
from tasks.register import register_model
from tasks.report import publish_report
from tasks.tokenize import build_tokenizer_cached
from tasks.train import train_model


@flow(name="lmpipe-pipeline")
@guarded
def pipeline(overrides: list[str] | None = None, params_file: str = "params.yaml",
             config: dict | None = None) -> dict:
    """Run every stage with params.yaml (+ environment, + `-S` overrides), resolved once, here; or
    with `config`, the configuration already resolved from them (Config.to_dict(), as `run` passes
    it), and then params_file and overrides only record where it came from.

    Args:
        overrides: params.yaml settings as section.key=value, as `lmpipe run -S` takes them
        params_file: the parameters file, relative to the project directory
        config: leave empty: the configuration `lmpipe run` has already resolved
    """
    if config is None:
        config = load_config(params_file, overrides or []).to_dict()
    prepared = prepare_data_cached(config)
    # build_tokenizer reads the prepared splits from disk, and train_model the tokenizer: they
    # wait for them (Prefect's wait_for) instead of taking them as arguments they do not use.
    tokenizer = build_tokenizer_cached(config, wait_for=[prepared])
    trained = train_model(config, wait_for=[tokenizer])
    metrics = evaluate_model(config, trained)
    sample = generate_text(config, trained)
    registered = register_model(config, trained, metrics)
    result = {"prepared": prepared, "tokenizer": tokenizer, "train": trained, "metrics": metrics,
              "sample": sample, "registered": registered}
    publish_report(result)  # the summary and per-checkpoint table as Prefect artifacts
    return result


def run(cfg: Config, overrides: list[str] | None = None, params_file: str = "params.yaml") -> dict:
    """Run the flow on cfg under the run name '<model>-<source>' (e.g. gpt-dear_agnes)."""
    from lmpipe.data import resolve_source

    name = f"{cfg.model.type}-{resolve_source(cfg.data.source).name}"
    return pipeline.with_options(flow_run_name=name)(overrides=overrides, params_file=params_file,
                                                     config=cfg.to_dict())
