"""Compiled mode costs a bounded multiple of graph mode on a real 30-layer model: `check --model smollm2
--modes compile` against `check --modes graph`, each a fresh process, measured in one run.

Identical decoder layers compile once (`reference_runner/sim/piecewise.py`), so compile cost follows the
distinct pieces of the step (three per captured size), not its depth. The compile check runs with an empty
inductor cache, as a user's first run does; the graph check runs in pedantic's untimed setup, right before
it, under the same load.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.real_models import missing_packages

ROOT = Path(__file__).resolve().parents[2]
MAX_COMPILE_VS_GRAPH = 5  # the goal of issue #14; it was 20x when the whole step compiled as one piece


def test_compile_costs_at_most_five_times_graph_mode_on_smollm2(benchmark, device, tmp_path):
    if problem := missing_packages("smollm2"):
        pytest.skip(problem)
    ensure_checkpoint("smollm2")  # converted before any timing
    seconds = {}

    def check(mode: str) -> None:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{mode}-{len(seconds)}")}
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "harness", "check", "--model", "smollm2", "--modes", mode,
                              "--device", device], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds[mode] = time.perf_counter() - start
        assert run.returncode == 0, f"check --modes {mode} exited {run.returncode}:\n{run.stdout}{run.stderr[-3000:]}"

    benchmark.group = "smollm2 check: compile vs graph"
    benchmark.pedantic(check, args=("compile",), setup=lambda: check("graph"), rounds=1, iterations=1)
    ratio = seconds["compile"] / seconds["graph"]
    benchmark.extra_info.update(model="smollm2", graph_s=round(seconds["graph"], 1),
                                compile_s=round(seconds["compile"], 1), compile_vs_graph=round(ratio, 2))
    assert ratio <= MAX_COMPILE_VS_GRAPH
