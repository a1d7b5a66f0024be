"""Every command-line entry point exits quietly when its output pipe closes (``mach-archs --json | head``)."""

from __future__ import annotations

import functools
import os
import sys

EXIT_CLOSED_PIPE = 141  # what a shell reports for a tool ended by SIGPIPE (128 + 13)


def quiet_on_closed_pipe(main):
    """Wraps a ``main(argv) -> int``: a BrokenPipeError (the reader went away) ends the process without a
    traceback; stdout is pointed at /dev/null so the interpreter's final flush cannot raise again."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            return EXIT_CLOSED_PIPE

    return wrapper
