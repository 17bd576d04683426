"""Engine processes (launched ranks, target workers): each in its own process group with its output in a log,
so that ending it ends everything it started, and a failure can quote what it last printed.

A process is started and registered with SIGINT and SIGTERM held back, so that a stop cannot land between
the fork and the registration (where it would leave a process nobody kills). As a last resort,
`descendants_ended` makes a command the subreaper of everything it starts, however deep, and ends and reaps
whatever is left when it returns: no process of a run outlives the command.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.stops import signals_deferred

KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
LOG_TAIL_LINES = 10
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 1, 36, 37  # linux/prctl.h
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None  # looked up here, called in the child


def python_env(**variables: str) -> dict[str, str]:
    """This process's environment for a Python child, plus `variables`: the child imports what this one does."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **variables}  # as multiprocessing's spawn


def start(module: str, args: list[str], env: dict[str, str], log: Path, die_with_parent: bool,
          started: list[subprocess.Popen], stdin: int = subprocess.DEVNULL) -> subprocess.Popen:
    """`python -m module args` in a new process group (and session), stdout and stderr into `log`, appended to
    `started` before a stop can interrupt; with `die_with_parent`, the kernel kills it when this process dies (a
    child that starts processes of its own must instead watch for that itself and end its whole group). `stdin`:
    subprocess.PIPE to talk to it, else nothing."""
    with open(log, "wb") as out, signals_deferred():  # the child keeps its own handle of `out`
        started.append(subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent if die_with_parent and _PRCTL else None))
    return started[-1]


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


@contextlib.contextmanager
def descendants_ended(timeout_s: float = 2 * KILL_GRACE_S) -> Iterator[None]:
    """Within: this process is the subreaper of the processes it starts (an orphan among them becomes its child,
    not init's). On leaving, every descendant started within that is still alive is killed and reaped, waiting
    at most `timeout_s`; one that outlives even that is named on stderr. Off Linux nothing changes."""
    if _PRCTL is None:
        yield
        return
    before = set(descendants())
    was_subreaper = ctypes.c_int(0)
    _PRCTL(PR_GET_CHILD_SUBREAPER, ctypes.byref(was_subreaper))
    _PRCTL(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        with signals_deferred():
            left = _end(lambda: [d for d in descendants() if d not in before], timeout_s)
            _PRCTL(PR_SET_CHILD_SUBREAPER, was_subreaper.value)
            if left:
                print(f"npugraph-harness: warning: process(es) {', '.join(str(pid) for pid, _ in left)} survived "
                      f"SIGKILL for {timeout_s:g} s", file=sys.stderr)


def descendants() -> list[tuple[int, int]]:
    """This process's live descendants, however deep, as (pid, start time) so that a recycled pid is another
    process; zombies (dead, not yet reaped) included."""
    parents, started = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid], started[pid] = int(fields[1]), int(fields[19])
    found, frontier = [], [os.getpid()]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return [(pid, started[pid]) for pid in found]


def _end(find: Callable[[], list[tuple[int, int]]], timeout_s: float) -> list[tuple[int, int]]:
    """Kill what `find` lists until it lists nothing, reaping this process's own children; what is left at
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (left := find()) and time.monotonic() < deadline:
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # not our child (yet): its parent, or we once orphaned, reap it
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    return left
