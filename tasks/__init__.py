"""Prefect tasks: one module per pipeline stage, each @task a thin wrapper over lmpipe.stages.

Tasks take the config as a plain dict (Config.to_dict()) and return small dicts of paths, ids
and metrics, never tensors.
"""
