"""Scratch directories a stopped run must not leave behind: launch directories (rank jobs, results, logs)
and checkpoint staging directories.

Each is named after the process that made it (`{prefix}{pid}-{random}`). That process removes it on
every exit it lives through: SIGINT and SIGTERM are held back while it is made and while it is removed, so
that neither can land between its creation and the block that removes it, nor cut the removal short. The
next process to make one under the same parent removes those whose process has died (SIGKILL, a crash).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.stops import signals_deferred


@contextlib.contextmanager
def scratch(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory `parent/{prefix}{pid}-*`, removed on the way out however the block ends."""
    path = None
    try:
        with signals_deferred():  # a stop raised at its end finds `path` set
            path = make_scratch(parent, prefix)
        yield path
    finally:
        if path is not None:
            with signals_deferred():
                shutil.rmtree(path, ignore_errors=True)


def make_scratch(parent: Path, prefix: str) -> Path:
    """Create `parent/{prefix}{pid}-*`, after removing those of dead processes; the caller removes it."""
    remove_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the `{prefix}{pid}-*` directories under `parent` whose process is gone; the ones removed."""
    stale = []
    for path in Path(parent).glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

