"""The command line's exit statuses, and the error that maps to exit 2."""
from __future__ import annotations

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad options or an unusable setup: reported in one line, exit status 2, before any work starts."""
