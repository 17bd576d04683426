"""The benchmark gates end to end, on a small real run of `suites/bench` (llama, one decode step at bs=1):
`--benchmark-compare` and the ratio gate pass on an unchanged tree and fail on a slowed graph replay.

Thresholds are generous (a 4x median, a 60% speed-up drop) so that the unchanged run passes on a
loaded machine; the slowed replay sleeps 20 ms per step, some 30x eager's whole step (a loaded machine stretches both). Runs are
subprocesses: torch and transformers do not survive pytester's in-process runs.
"""
import os
import subprocess
import sys

import pytest

from harness.bench.results import BENCH_DIR, ROOT, load_ratios

STEPS = [f"{BENCH_DIR / 'test_decode_throughput.py'}::test_decode_step[llama-1-{mode}]" for mode in ("eager", "graph")]
GATES = ["--benchmark-compare", "--benchmark-compare-fail=median:300%", "--ratio-tolerance=0.6"]
SLOWED_REPLAY = """
import time
from reference_runner.graphs.runner import GraphRunner

replay = GraphRunner.replay

def slowed(self, forward_batch):
    time.sleep(0.02)
    return replay(self, forward_batch)

GraphRunner.replay = slowed
"""


def run_steps(storage, *args, plugin_dir=None) -> tuple[int, pytest.LineMatcher]:
    """Exit status and output of `pytest STEPS` against the baselines in `storage`."""
    env = {**os.environ, "PYTHONPATH": str(plugin_dir or "")}
    argv = [sys.executable, "-m", "pytest", *STEPS, f"--benchmark-storage=file://{storage}", "-p", "no:cacheprovider", *args]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, pytest.LineMatcher((done.stdout + done.stderr).splitlines())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A baseline of the unchanged tree: stored absolute times and stored speed-ups."""
    folder = tmp_path_factory.mktemp("recorded")
    ratios = folder / "ratios-cpu.json"
    status, output = run_steps(folder / "baselines", "--benchmark-save=cpu", f"--ratio-save={ratios}")
    assert status == pytest.ExitCode.OK, output.str()
    assert list(load_ratios(ratios)) == ["llama/step/bs1/graph"]
    return folder / "baselines", [*GATES, f"--ratio-baseline={ratios}"]


def test_unchanged_tree_passes_both_gates(recorded):
    storage, gates = recorded
    status, output = run_steps(storage, *gates)
    assert status == pytest.ExitCode.OK, output.str()
    output.fnmatch_lines(["Comparing against benchmarks from: Linux-*/0001_cpu.json"])
    output.fnmatch_lines(["*ratio gate*", "llama/step/bs1/graph: *x (stored *x) ok"])


def test_slowed_graph_replay_fails_both_gates(recorded, tmp_path):
    storage, gates = recorded
    (tmp_path / "slowed_replay.py").write_text(SLOWED_REPLAY)
    status, output = run_steps(storage, "-p", "slowed_replay", *gates, plugin_dir=tmp_path)
    assert status != pytest.ExitCode.OK
    output.fnmatch_lines(["*Performance has regressed*", "*test_decode_step?llama-1-graph?*median*"])
    output.fnmatch_lines(["llama/step/bs1/graph: *x (stored *x) FAIL: below *x",
                          "1 of 1 speed-ups dropped by more than the tolerance"])


def test_compare_without_a_stored_baseline_says_how_to_record(tmp_path):
    status, output = run_steps(tmp_path / "empty", "--benchmark-compare")
    assert status == pytest.ExitCode.USAGE_ERROR
    output.fnmatch_lines(["*--benchmark-compare: no stored baseline for this machine class*"
                          "`npugraph-harness bench --record`*"])
    output.no_fnmatch_line("*passed*")  # it stops before any benchmark runs
