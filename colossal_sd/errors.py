"""Errors the user can fix, reported as one line with no traceback."""

import os
import sys


class UserError(Exception):
    """Bad input: the message says what to fix."""


class CleanStop(Exception):
    """The run stopped on purpose (e.g. a signal while caching) and kept what it had: the message says how to
    continue. Exit status 0."""


def exit_on_user_error(main, *args, **kwargs):
    """Run ``main``; a UserError becomes a one-line message on stderr and exit status 2, a CleanStop its line on
    stdout and exit status 0.

    The checks behind a UserError run identically on every rank, so only global rank 0 prints: a
    2-process run shows the message once, not twice.
    """
    try:
        return main(*args, **kwargs)
    except CleanStop as e:
        if os.environ.get("RANK", "0") == "0":
            print(str(e), flush=True)
            from colossal_sd.preemption import report_clean_stop
            report_clean_stop(str(e))
        sys.exit(0)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            from tqdm import tqdm
            tqdm.write(f"error: {e}", file=sys.stderr)  # on a line of its own, also under a progress bar
        sys.exit(2)


def first_line(e: BaseException) -> str:
    """The gist of a library's exception, for a one-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
