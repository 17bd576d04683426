"""The command line's exit statuses, the error that maps to exit 2, and SIGTERM's exception (`stops.py` raises it)."""
from __future__ import annotations

import signal

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# 128 + the signal number: what a shell reports for a process killed by that signal.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class UsageError(Exception):
    """Bad options or an unusable setup: reported in one line, exit status 2, before any work starts."""


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no `except Exception` may swallow it)."""


def stop_reason(error: BaseException) -> str:
    """Why a command ended early, as its last line says it: `stopped by SIGTERM`, `error: ...` (a bad input or an
    unusable setup), `internal error: TypeError: ...`."""
    if isinstance(error, KeyboardInterrupt):
        return "stopped by SIGINT (Ctrl-C)"
    if isinstance(error, Terminated):
        return "stopped by SIGTERM"
    if isinstance(error, UsageError):
        return f"error: {error}"
    return f"internal error: {type(error).__name__}: {error}"
