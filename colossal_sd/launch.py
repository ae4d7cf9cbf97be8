"""`torchrun`, with the same arguments, minus the launcher's own traceback when a worker exits with an error.

The worker has already printed the one line that says what to fix; torchrun would bury it under a
ChildFailedError traceback. This exits with the worker's status instead.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv=None):
    try:
        run(parse_args(argv if argv is not None else sys.argv[1:]))
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        sys.exit(first.exitcode if first.exitcode and first.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
