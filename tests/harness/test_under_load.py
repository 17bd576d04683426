"""The tests that wait on processes and time hold under load: the signal, timeout and rank-failure tests pass 20
times in a row while busy loops keep every core busy (where an idle machine hides timing races). Nightly only
(`--nightly`): about 70 minutes on 2 cores."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROCESS_TESTS = ["tests/harness/test_signals.py", "tests/harness/test_launch.py", "tests/harness/test_worker.py",
                 "tests/runner/test_replay_watchdog.py",
                 "suites/test_parallel.py::test_fault_on_one_rank_fails_the_scenario_in_bounded_time"]
ROUNDS = 20


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process tests find processes through /proc")
def test_the_process_tests_pass_20_times_in_a_row_under_a_cpu_hog():
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    failed = []
    try:
        for round_ in range(1, ROUNDS + 1):
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PROCESS_TESTS],
                                  cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                failed.append(f"round {round_}:\n" + "\n".join(done.stdout.splitlines()[-15:]))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert failed == [], f"{len(failed)} of {ROUNDS} rounds failed"
