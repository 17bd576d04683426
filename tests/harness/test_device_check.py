"""`scripts/device_check_cuda.sh`: one line and exit 2 without a CUDA device; with one, it stops at the first failing
step and ends with every step's outcome. The steps' `python` is a stand-in that says where it fails."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device_check_cuda.sh"
STAND_IN = """#!/bin/sh
case "$*" in
  *is_available*) echo "torch 2.x FakeGPU transformers 5";;
  *{fail}*) echo "this step failed"; exit 3;;
esac
"""


def run_script(out: Path, python_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{python_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def stand_in_python(folder: Path, fail: str) -> Path:
    """A `python` that reports a CUDA device, and fails (exit 3) when its arguments contain `fail`."""
    folder.mkdir()
    (folder / "python").write_text(STAND_IN.replace("{fail}", fail))
    (folder / "python").chmod(0o755)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_cuda_device_it_refuses_in_one_line_and_exits_2(tmp_path):
    done = run_script(tmp_path / "out", Path(sys.executable).parent)
    assert (done.returncode, done.stdout) == (2, "")
    (line,) = done.stderr.splitlines()
    assert line.startswith("device_check_cuda.sh: no CUDA device to check (") and line.endswith("): nothing run")
    assert not (tmp_path / "out").exists()


def test_it_stops_at_the_first_failing_step_with_a_summary(tmp_path):
    done = run_script(tmp_path / "out", stand_in_python(tmp_path / "bin", fail="--prefill-graphs"))
    assert done.returncode == 1
    assert "== suites: python" not in done.stdout  # never started
    assert done.stdout.splitlines()[-7:] == [
        "== check: passed", "== check-prefill: FAILED (exit 3)", "== suites: not run", "== bench: not run",
        "== check-twin: not run", "== report: not run",
        f"== device check: FAILED at check-prefill (see {tmp_path / 'out' / 'device.log'})"]
    assert (tmp_path / "out" / "device.log").read_text() == done.stdout


def test_it_passes_when_every_step_passes(tmp_path):
    done = run_script(tmp_path / "out", stand_in_python(tmp_path / "bin", fail="--no-step-has-this"))
    assert done.returncode == 0
    assert done.stdout.splitlines()[-7:] == [
        "== check: passed", "== check-prefill: passed", "== suites: passed", "== bench: passed", "== check-twin: passed",
        "== report: passed", "== device check: PASSED"]
