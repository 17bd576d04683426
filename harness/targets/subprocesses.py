"""Engine processes (launched ranks, target workers): each in its own process group with its output in a log,
so that ending it ends everything it started, and a failure can quote what it last printed."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
LOG_TAIL_LINES = 10
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None  # looked up here, called in the child


def python_env(**variables: str) -> dict[str, str]:
    """This process's environment for a Python child, plus `variables`: the child imports what this one does."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **variables}  # as multiprocessing's spawn


def start(module: str, args: list[str], env: dict[str, str], log: Path, die_with_parent: bool) -> subprocess.Popen:
    """`python -m module args` in a new process group (and session), stdout and stderr into `log`; with
    `die_with_parent`, the kernel kills it when this process dies (a child that starts processes of its own
    must instead watch for that itself and end its whole group)."""
    with open(log, "wb") as out:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent if die_with_parent and _PRCTL else None)


def _die_with_parent() -> None:
    # In the child, before exec: the kernel sends it SIGKILL when the launching process dies, however it dies.
    _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def kill(procs: list[subprocess.Popen]) -> None:
    """End the process group of each of `procs`, grandchildren included: SIGTERM, then SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if _group_alive(p)]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
                os.killpg(p.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline and any(_group_alive(p) for p in alive):
            time.sleep(0.05)


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` non-blank lines of `log`, indented, or a note that it is empty."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in tail) if tail else "    (nothing)"


def signal_name(number: int) -> str:
    """`SIGKILL` for 9; a number without a name as `signal N`."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, whose zombie would keep its group alive
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # only a foreign process can hold a recycled group id
        return False
    return True
