"""The command line's exit statuses, the error that maps to exit 2, and SIGTERM as an exception.

SIGINT raises `KeyboardInterrupt` and, inside `sigterm_raises`, SIGTERM raises `Terminated`: both unwind
the run, so every `finally` on the way out (rank process groups killed, scratch directories removed)
runs before the command exits 130 or 143 with one line.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# 128 + the signal number: what a shell reports for a process killed by that signal.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class UsageError(Exception):
    """Bad options or an unusable setup: reported in one line, exit status 2, before any work starts."""


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no `except Exception` may swallow it)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated` in the main thread. Off the main thread (where Python cannot set a
    handler) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
