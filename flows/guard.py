"""What every lmpipe flow does first and last, as the `lmpipe` command line does for its commands:
offline defaults on; bad input (a UserError) ends a deployment run with lmpipe's one-line
message."""
from __future__ import annotations

import functools

from lmpipe.common.env import apply_offline_defaults
from lmpipe.common.errors import UserError


def guarded(fn):
    """Wrap a flow's function (under @flow). A worker starts flows without the `lmpipe` command, so
    the offline defaults are applied here; a UserError in a deployment run is logged as one line and
    returned as the run's Failed state (no traceback). Outside a deployment (`lmpipe run`) it
    propagates, and the command line prints it."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from prefect.runtime import deployment

        apply_offline_defaults()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if deployment.id is None:
                raise
            return _failed(e)

    return run


def _failed(e: UserError):
    from prefect import get_run_logger
    from prefect.states import Failed

    message = f"lmpipe: {e.prefix}" + "; ".join(str(e).splitlines())
    get_run_logger().error(message)
    return Failed(message=message)
