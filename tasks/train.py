import uuid

from prefect import task

from lmpipe.train import attempts

# A killed or crashed training process (out of memory, a lost node, a flaky tracking server) is
# retried; each retry resumes the same MLflow run from its newest verified checkpoint, so a retry
# costs at most one checkpoint interval. Change with train_model.with_options(retries=N).
TRAIN_RETRIES = 2
RETRY_DELAY_S = 2


def _crashed(task, task_run, state) -> bool:
    """Retry a training process that died; not one stopped on a signal (Ctrl-C, a cancellation) or
    given bad input, which would only stop or fail again."""
    try:
        state.result()
    except attempts.TrainingCrashed:
        return True
    except BaseException:
        return False
    return False


@task(name="train_model", retries=TRAIN_RETRIES, retry_delay_seconds=RETRY_DELAY_S,
      retry_condition_fn=_crashed)
def train_model(config: dict) -> dict:
    """Train in a child process (lmpipe.train.attempts); returns the MLflow run id and checkpoint
    paths. A retry resumes the same run from its newest verified checkpoint."""
    from prefect.runtime import task_run

    # one directory per task run, which its retries share
    return attempts.train(config, attempts.ATTEMPTS / str(task_run.id or uuid.uuid4()))
