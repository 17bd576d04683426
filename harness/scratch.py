"""Scratch directories a stopped run must not leave behind: launch directories (rank jobs, results, logs)
and checkpoint staging directories.

Each is named after the process that made it (`{prefix}{pid}-{random}`). That process removes it on
every exit it lives through, with SIGINT and SIGTERM held back meanwhile, so that a second Ctrl-C cannot
cut the removal short; the next process to make one under the same parent removes those whose process
has died (SIGKILL, a crash).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory `parent/{prefix}{pid}-*`, removed on the way out however the block ends."""
    path = make_scratch(parent, prefix)
    try:
        yield path
    finally:
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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are only noted; on leaving, the first one noted is raised again, to the handlers
    in place before. For cleanup that must finish. Off the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        if noted:
            signal.raise_signal(noted[0])
