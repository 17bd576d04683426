"""Target workers: one run of an engine under test in its own process, under a timeout.

`run_in_worker` writes a `WorkerJob` as JSON and starts `python -m harness.targets.worker` on it in a process
group of its own (`subprocesses.py`). The worker calls the job's `setup` hook (fault injection), then its
`runner` (`module:function`, `WorkerJob -> TargetRun`), and writes `result.json`; on any failure it writes
`error` and exits 1. A worker that raises, dies or outlives its timeout fails the run with `WorkerFailed`,
quoting the last lines of its log, and its whole process group is killed either way: nothing it started
outlives the run. A worker whose judge dies kills its own group.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.scratch import scratch
from harness.stops import raise_if_stopped, signals_deferred
from harness.targets.base import TargetRun
from harness.targets.subprocesses import kill, log_tail, python_env, signal_name, start
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Request

WORKER_TIMEOUT_S = 900.0  # one engine start and run: vLLM's compile mode alone takes minutes on two loaded cores
PARENT_CHECK_S = 1.0
WAIT_POLL_S = 0.05


class WorkerFailed(RuntimeError):
    """The worker raised, died or did not finish in time; the message says which and quotes its log."""


@dataclass
class WorkerJob:
    """One run of an engine under test: what the worker's `runner` gets."""

    runner: str  # "module:function" that runs the job in the worker: WorkerJob -> TargetRun
    checkpoint: str
    requests: list[Request]
    engine: EngineArgs
    device: str = "cpu"
    seed: int = 0
    setup: str | None = None  # "module:function" called with the job in the worker before its runner

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerJob:
        """The inverse of `dataclasses.asdict` (after a JSON round trip)."""
        return cls(**{**d, "requests": [Request(**r) for r in d["requests"]], "engine": EngineArgs.from_dict(d["engine"])})


def run_in_worker(job: WorkerJob, env: dict[str, str] | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> TargetRun:
    """Run `job` in a worker process with `env` added to this one's; raises WorkerFailed if it fails."""
    with scratch(Path(tempfile.gettempdir()), "npugraph-worker-") as out:
        (out / "job.json").write_text(json.dumps(dataclasses.asdict(job)))
        log = out / "worker.log"
        procs: list[subprocess.Popen] = []
        try:
            # The worker watches for our death itself and ends its whole group: its engine may start processes.
            start(__name__, ["--job", str(out / "job.json"), "--out", str(out)], python_env(**(env or {})), log,
                  die_with_parent=False, started=procs)
            code = _wait(procs[0], timeout_s, log)
        finally:
            with signals_deferred():  # a second Ctrl-C must not leave the worker behind
                kill(procs)
        if code != 0:
            raise WorkerFailed(f"{_failure(out, code)}; its log ends:\n{log_tail(log)}")
        return TargetRun.from_dict(json.loads((out / "result.json").read_text()))


def _wait(proc: subprocess.Popen, timeout_s: float, log: Path) -> int:
    """The worker's exit status; WorkerFailed once it outlives `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (code := proc.poll()) is None:
        raise_if_stopped()
        if time.monotonic() > deadline:
            raise WorkerFailed(f"the worker did not finish within {timeout_s:g} s and was killed; its log ends:\n"
                               f"{log_tail(log)}")
        time.sleep(WAIT_POLL_S)
    return code


def _failure(out: Path, code: int) -> str:
    error = out / "error"
    if error.is_file():
        return f"the worker raised {error.read_text()}"
    if code < 0:
        return f"the worker died of {signal_name(-code)} without reporting an error"
    return f"the worker exited with status {code} without reporting an error"


def _resolve(name: str) -> Any:
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def _exit_with_parent() -> None:
    """Kill this worker's process group once its judge is gone (it cannot end the group any more)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.targets.worker", description="one run of an engine under test")
    parser.add_argument("--job", type=Path, required=True, help="a WorkerJob as JSON (what `run_in_worker` writes)")
    parser.add_argument("--out", type=Path, required=True, help="directory for result.json / error")
    args = parser.parse_args(argv)
    _exit_with_parent()
    try:
        job = WorkerJob.from_dict(json.loads(args.job.read_text()))
        if job.setup:
            _resolve(job.setup)(job)
        run = _resolve(job.runner)(job)
        (args.out / "result.json").write_text(json.dumps(dataclasses.asdict(run)))
    except BaseException as e:  # any failure is the run's failure
        traceback.print_exc()
        (args.out / "error").write_text(f"{type(e).__name__}: {e}")
        code = 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # without waiting for engine threads that may outlive the run (its result is written)


if __name__ == "__main__":
    main()
