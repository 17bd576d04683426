"""The processes a check started, found by an environment variable that every process it starts inherits (its target's
worker, and the processes an engine spawns under it), and watched while the check runs."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

TAG = "NPUGRAPH_TEST_TAG"
WATCH_EVERY_S = 0.1


def tagged_processes(tag: str) -> dict[int, str]:
    """The processes whose environment holds NPUGRAPH_TEST_TAG=`tag`: their pids and command lines (as `ps` shows them:
    SGLang's renamed ones as `sglang::scheduler`...)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"{TAG}={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = _command_line(proc)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _command_line(proc: Path) -> str:
    return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


class Seen(set):
    """The command lines of the processes seen, and their pids (`pids`)."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: set[int] = set()


@contextlib.contextmanager
def watching(tag: str) -> Iterator[Seen]:
    """Within: the command lines of every process tagged `tag` seen alive, gathered as they come and go. A process once
    seen tagged is followed by its pid: setproctitle (SGLang's `sglang::scheduler`...) may overwrite the memory that
    held its environment, and with it the tag."""
    seen = Seen()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_EVERY_S):
            tagged = tagged_processes(tag)
            seen.pids.update(tagged)
            seen.update(tagged.values())
            for pid in seen.pids - set(tagged):
                with contextlib.suppress(OSError):  # ended
                    seen.add(_command_line(Path(f"/proc/{pid}")))

    thread = threading.Thread(target=watch, daemon=True, name="process-watch")
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
