"""The benchmark gates end to end, on a small real run of `suites/bench` (llama, one decode step at bs=1): the ratio
gate passes on an unchanged tree and fails on a planted 2x slowdown of graph replay (`--plant-replay-slowdown 2`);
a regression of absolute times fails the run in one line, not a traceback.

The default ratio tolerance holds: the speed-up is measured against eager rounds interleaved with the mode's own
(see `suites/bench/conftest.py`), and a 2x slower replay halves it, far beyond the spread of unchanged runs
(`harness/bench/results.py`). Absolute times are compared on a tiny benchmark of the test's own, against a stored
run of it made a thousand times faster: never a second run of this machine. Runs are subprocesses: torch and
transformers do not survive pytester's in-process runs.
"""
import json
import os
import subprocess
import sys

import pytest

from harness.bench.record import record, save_ratios
from harness.bench.results import BENCH_DIR, ROOT, load_ratios, processor_name

STEPS = [f"{BENCH_DIR / 'test_decode_throughput.py'}::test_decode_step[llama-1-{mode}]" for mode in ("eager", "graph")]


def run_steps(storage, *args) -> tuple[int, pytest.LineMatcher]:
    """Exit status and output of `pytest STEPS` against the baselines in `storage`."""
    argv = [sys.executable, "-m", "pytest", *STEPS, f"--benchmark-storage=file://{storage}", "-p", "no:cacheprovider",
            *args]
    done = subprocess.run(argv, cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=300)
    return done.returncode, pytest.LineMatcher((done.stdout + done.stderr).splitlines())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A record of the unchanged tree (`bench --record`'s storing): the baseline folder and the stored speed-ups."""
    from pytest_benchmark.utils import get_machine_id

    folder = tmp_path_factory.mktemp("recorded")
    status, output = run_steps(folder / "baselines", f"--benchmark-json={folder / 'run.json'}")
    assert status == pytest.ExitCode.OK, output.str()
    ratios = folder / "ratios-cpu.json"
    record(json.loads((folder / "run.json").read_text()), folder / "baselines" / get_machine_id(), "cpu", ratios)
    assert list(load_ratios(ratios, processor_name("cpu"))) == ["llama/step/bs1/graph"]
    return folder / "baselines", ratios


def test_unchanged_tree_passes_the_ratio_gate(recorded):
    storage, ratios = recorded
    status, output = run_steps(storage, "--benchmark-compare", f"--ratio-baseline={ratios}")
    assert status == pytest.ExitCode.OK, output.str()
    output.fnmatch_lines(["Comparing against benchmarks from: Linux-*/0001_cpu.json"])
    output.fnmatch_lines(["*ratio gate*", "llama/step/bs1/graph: *x (stored *x) ok"])


def test_a_planted_2x_replay_slowdown_fails_the_ratio_gate(recorded):
    storage, ratios = recorded
    status, output = run_steps(storage, "--plant-replay-slowdown=2", f"--ratio-baseline={ratios}")
    assert status == pytest.ExitCode.TESTS_FAILED, output.str()
    output.fnmatch_lines(["llama/step/bs1/graph: *x (stored *x) FAIL: below *x",
                          "1 of 1 speed-ups dropped by more than the tolerance"])


def test_absolute_times_beyond_compare_fail_fail_the_run_in_one_line(tmp_path):
    # A tiny benchmark of its own, against a stored run of it made a thousand times faster.
    (tmp_path / "test_tiny.py").write_text("def test_tiny(benchmark):\n    benchmark(sum, range(1000))\n")

    def run_tiny(*args):
        done = subprocess.run([sys.executable, "-m", "pytest", "test_tiny.py", "-p", "harness.bench.plugin",
                               "-p", "no:cacheprovider", "--benchmark-storage=file://storage", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        return done.returncode, pytest.LineMatcher((done.stdout + done.stderr).splitlines())

    assert run_tiny("--benchmark-save=tiny")[0] == pytest.ExitCode.OK
    (stored,) = (tmp_path / "storage").glob("*/0001_tiny.json")
    faster = json.loads(stored.read_text())
    faster["benchmarks"][0]["stats"] = {k: v / 1000 if isinstance(v, float) else v
                                        for k, v in faster["benchmarks"][0]["stats"].items()}
    stored.write_text(json.dumps(faster))
    status, output = run_tiny("--benchmark-compare", "--benchmark-compare-fail=min:30%")
    assert status == pytest.ExitCode.TESTS_FAILED, output.str()
    output.fnmatch_lines(["Performance has regressed:", "*test_tiny (0001_tiny) - Field 'min' has failed*"])
    output.fnmatch_lines(["absolute times regressed beyond --benchmark-compare-fail (listed above)"])
    output.no_fnmatch_line("*Traceback*")
    output.no_fnmatch_line("*INTERNALERROR*")


def test_compare_without_a_stored_baseline_says_how_to_record(tmp_path):
    status, output = run_steps(tmp_path / "empty", "--benchmark-compare")
    assert status == pytest.ExitCode.USAGE_ERROR
    output.fnmatch_lines(["*--benchmark-compare: no stored baseline for this machine class*"
                          "`npugraph-harness bench --record`*"])
    output.no_fnmatch_line("*passed*")  # it stops before any benchmark runs


def test_speed_ups_stored_for_another_processor_stop_the_run_before_it_starts(tmp_path):
    ratios = tmp_path / "ratios-cpu.json"
    save_ratios(ratios, {"llama/step/bs1/graph": 1.2}, {"device": "cpu", "device_name": "Another CPU"})
    status, output = run_steps(tmp_path / "baselines", f"--ratio-baseline={ratios}")
    assert status == pytest.ExitCode.USAGE_ERROR, output.str()
    output.fnmatch_lines([f"*--ratio-baseline {ratios}: no speed-ups stored for {processor_name('cpu')} (it holds "
                          "Another CPU); record them with `npugraph-harness bench --record` (on cpu)"])
    output.no_fnmatch_line("*test_decode_step*PASSED*")
