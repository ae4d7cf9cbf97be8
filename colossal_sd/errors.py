"""Errors the user can fix, reported as one line with no traceback."""

import os
import sys


class UserError(Exception):
    """Bad input: the message says what to fix."""


def exit_on_user_error(main, *args, **kwargs):
    """Run ``main``; a UserError becomes a one-line message on stderr and exit status 2.

    The checks behind a UserError run identically on every rank, so only global rank 0 prints: a
    2-process run shows the message once, not twice.
    """
    try:
        return main(*args, **kwargs)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def first_line(e: BaseException) -> str:
    """The gist of a library's exception, for a one-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
