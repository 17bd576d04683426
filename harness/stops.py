"""How a command stops on SIGINT (Ctrl-C) and SIGTERM: the signal raised as an exception, and recorded.

Inside `stop_signals`, SIGINT raises `KeyboardInterrupt` and SIGTERM raises `Terminated`, so that every
`finally` on the way out (ranks killed, scratch directories removed, reports written) runs. Python drops an
exception raised where it cannot propagate: in an at-fork hook (logging's, which runs inside every
`subprocess.Popen` with a `preexec_fn`), in a `__del__`, in a weakref callback. So each handler also records
its signal, and `raise_if_stopped`, called wherever a run waits or moves on (launched ranks, workers, the next
scenario, the command's return), raises a recorded stop again: a signal is never lost, wherever it lands.

`signals_deferred` holds both signals back over a section that must finish (spawning and registering a
process, removing a directory, writing a report): they are raised at its end.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from harness.exits import Terminated

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_EXCEPTIONS: dict[int, type[BaseException]] = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
_received: list[int] = []  # the signals the handlers of `stop_signals` received, first first


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, each recorded for
    `raise_if_stopped`. Off the main thread (where Python cannot set a handler) nothing changes."""
    if not _on_main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        _received.append(signum)
        raise _EXCEPTIONS[signum]

    _received.clear()
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        _received.clear()


def stop_received() -> int | None:
    """The first signal a handler of `stop_signals` received, if any."""
    return _received[0] if _received else None


def raise_if_stopped() -> None:
    """Raise the exception of a stop signal received earlier, in case something swallowed it on its way up."""
    if _received:
        raise _EXCEPTIONS[_received[0]]


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are only noted; on leaving, the first one noted is raised again, to the handlers
    in place before. For sections that must finish. Off the main thread nothing changes."""
    if not _on_main_thread():
        yield
        return
    noted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if noted:
            signal.raise_signal(noted[0])
