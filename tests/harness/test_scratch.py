"""Scratch directories: removed however their block ends, those of dead processes removed by the next one, and
cleanup not cut short by a signal (it is raised once the cleanup is done)."""
import contextlib
import os
import signal
import subprocess
import sys

import pytest

from harness.exits import Terminated
from harness.scratch import remove_stale, scratch
from harness.stops import signals_deferred, stop_signals


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.parametrize("stop", [None, RuntimeError, KeyboardInterrupt])
def test_a_scratch_directory_is_removed_however_its_block_ends(tmp_path, stop):
    with pytest.raises(stop) if stop else contextlib.nullcontext(), scratch(tmp_path, "npugraph-test-") as path:
        assert path.is_dir() and path.name.startswith(f"npugraph-test-{os.getpid()}-")
        (path / "file").write_text("x")
        if stop:
            raise stop
    assert list(tmp_path.iterdir()) == []


def test_only_the_scratch_directories_of_dead_processes_are_stale(tmp_path):
    names = [f"npugraph-test-{dead_pid()}-a", f"npugraph-test-{os.getpid()}-b", "npugraph-test-x-c", "other-1-d"]
    for name in names:
        (tmp_path / name).mkdir()
    assert [p.name for p in remove_stale(tmp_path, "npugraph-test-")] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


@pytest.mark.parametrize(("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_during_deferred_cleanup_is_raised_once_the_cleanup_is_done(sig, raised):
    done = []
    with stop_signals(), pytest.raises(raised), signals_deferred():
        signal.raise_signal(sig)
        done.append("cleanup")
    assert done == ["cleanup"]
