"""Ctrl-C (SIGINT) and SIGTERM stop a running multi-rank check within seconds: every rank's process group is
killed, the launch directory removed, and the exit is 130 or 143 with one line and no traceback. A check killed
outright (SIGKILL) takes its ranks with it, and the next launch removes the directory it left."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.scratch import remove_stale

STOP_WITHIN_S = 15  # SIGTERM to the ranks, then SIGKILL after 5 s at worst
START_WITHIN_S = 120  # imports, the checkpoint, the oracle, then two ranks

pytestmark = [pytest.mark.multirank,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")]


def tagged_processes(tag: str) -> list[int]:
    """Pids of the processes whose environment holds NPUGRAPH_TEST_TAG=`tag` (a check and the ranks it launched)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"NPUGRAPH_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def check_with_two_ranks_running(tmp_path: Path, tag: str) -> subprocess.Popen:
    """`npugraph-harness check --tp 2` (scratch directories under `tmp_path`), once both its ranks have started."""
    check = subprocess.Popen(
        [sys.executable, "-m", "harness", "check", "--model", "llama", "--modes", "eager", "--tp", "2",
         "--workload", "batch1", "--max-new-tokens", "2"],
        env={**os.environ, "TMPDIR": str(tmp_path), "NPUGRAPH_TEST_TAG": tag},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_WITHIN_S
    while len(tagged_processes(tag)) < 3 and check.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(tagged_processes(tag)) < 3:
        check.kill()
        pytest.fail(f"the ranks never started: {check.communicate()[1]}")
    return check


@pytest.mark.parametrize(("sig", "status", "line"), [
    (signal.SIGINT, 130, "npugraph-harness: stopped by SIGINT (Ctrl-C)"),
    (signal.SIGTERM, 143, "npugraph-harness: stopped by SIGTERM"),
], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_multi_rank_check_and_leaves_nothing_behind(tmp_path, sig, status, line):
    tag = f"{os.getpid()}-{sig.name}"
    check = check_with_two_ranks_running(tmp_path, tag)
    try:
        check.send_signal(sig)
        _, err = check.communicate(timeout=STOP_WITHIN_S)
    finally:
        check.kill()
    assert (check.returncode, err.splitlines()[-1]) == (status, line), err
    assert "Traceback" not in err
    assert tagged_processes(tag) == []
    assert list(tmp_path.glob("npugraph-launch-*")) == []


def test_a_check_killed_outright_takes_its_ranks_with_it(tmp_path):
    tag = f"{os.getpid()}-SIGKILL"
    check = check_with_two_ranks_running(tmp_path, tag)
    check.kill()
    check.communicate(timeout=STOP_WITHIN_S)
    deadline = time.monotonic() + STOP_WITHIN_S
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tagged_processes(tag) == []
    (left,) = tmp_path.glob("npugraph-launch-*")  # nothing could remove it: the next launch does
    assert remove_stale(tmp_path, "npugraph-launch-") == [left]
