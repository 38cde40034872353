"""torchrun as lmpipe starts it (`python -m lmpipe.train.launch ARGS` = `torchrun ARGS`): the same
launcher (torch.distributed.run.main), less the Python traceback it ends with when it is stopped by
a signal or a rank fails; its own log lines and its table of failed ranks stay. Exits 128 + N when
stopped by signal N, 1 when a rank failed, 0 when every rank succeeded."""
from __future__ import annotations

import sys


def run(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except SignalException as e:  # the ranks got the signal too: rank 0 has said what it did
        return 128 + int(e.sigval)
    except ChildFailedError:  # torchrun has printed which rank failed and how
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
