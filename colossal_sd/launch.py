"""`torchrun`, with the same arguments, minus the launcher's own traceback when a worker exits with an error.

The worker has already printed the one line that says what to fix; torchrun would bury it under a
ChildFailedError traceback. This exits with the worker's status instead.

On SIGTERM/SIGINT torchrun forwards the signal to the workers, waits for them, and raises SignalException;
if the workers stopped cleanly with a checkpoint (rank 0 says so through a file), this exits 0.
"""

import os
import sys
import tempfile

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from colossal_sd.preemption import STOPPED_FILE_ENV


def main(argv=None):
    with tempfile.TemporaryDirectory() as tmp:
        stopped_file = os.environ[STOPPED_FILE_ENV] = os.path.join(tmp, "stopped")
        try:
            run(parse_args(argv if argv is not None else sys.argv[1:]))
        except ChildFailedError as e:
            _, first = e.get_first_failure()
            sys.exit(first.exitcode if first.exitcode and first.exitcode > 0 else 1)
        except SignalException as e:
            sys.exit(0 if os.path.exists(stopped_file) else 128 + e.sigval)


if __name__ == "__main__":
    main()
