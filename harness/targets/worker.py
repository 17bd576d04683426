"""Target workers: an engine under test in a process of its own, started once, serving one run after another, each
under a timeout.

A `WorkerSession` writes a `WorkerJob` (the engine to start) as JSON and starts `python -m harness.targets.worker` on
it in a process group of its own (`subprocesses.py`). The worker calls the job's `setup` hook (fault injection), then
its `runner` (`module:function`, `WorkerJob -> (requests -> TargetRun)`), which starts the engine and returns what
runs requests on it. Each run the session asks for is a line on the worker's stdin (`N`, the requests in
`requests-N.json`), answered with `result-N.json`; on any failure the worker writes `error-N` and exits 1, and at the
end of its stdin it exits 0. So a scenario's run and its forced re-runs share one engine start (vLLM takes half a
minute to a minute to start here). A worker that raises, dies or outlives a run's timeout fails that run with
`WorkerFailed`, quoting the last lines of its log; its whole process group is killed when the session closes, however
it closes: nothing it started outlives it. A worker whose judge dies kills its own group.
"""
from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.scratch import scratch
from harness.stops import raise_if_stopped, signals_deferred
from harness.targets.base import TargetRun
from harness.targets.subprocesses import kill, log_tail, python_env, signal_name, start
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Request

WORKER_TIMEOUT_S = 900.0  # one run, the engine's start included: vLLM's compile mode alone takes minutes on two loaded cores
PARENT_CHECK_S = 1.0
WAIT_POLL_S = 0.05

RunRequests = Callable[[list[Request]], TargetRun]  # what a runner returns: the started engine's runs


class WorkerFailed(RuntimeError):
    """The worker raised, died or did not finish in time; the message says which and quotes its log."""


@dataclass(frozen=True)
class WorkerJob:
    """An engine under test for a worker to start: what the worker's `runner` gets."""

    runner: str  # "module:function" that starts the engine in the worker: WorkerJob -> RunRequests
    checkpoint: str
    engine: EngineArgs
    device: str = "cpu"
    seed: int = 0
    setup: str | None = None  # "module:function" called with the job in the worker before its runner

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerJob:
        """The inverse of `dataclasses.asdict` (after a JSON round trip)."""
        return cls(**{**d, "engine": EngineArgs.from_dict(d["engine"])})


class WorkerSession:
    """`job`'s engine in a worker with `env` added to this process's environment, started at the first run; each run
    raises WorkerFailed if it fails. Close it (or use it as a context manager) to end the worker."""

    def __init__(self, job: WorkerJob, env: dict[str, str] | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> None:
        self.job, self.env, self.timeout_s = job, env or {}, timeout_s
        self._procs: list[subprocess.Popen] = []
        self._stack = contextlib.ExitStack()
        self._out: Path | None = None
        self._runs = 0

    def run(self, requests: list[Request]) -> TargetRun:
        """`requests` run on the worker's engine. A failed run ends the worker: the next run starts another."""
        self._runs += 1
        try:
            out = self._out or self._start()
            proc, n, log = self._procs[0], self._runs, out / "worker.log"
            (out / f"requests-{n}.json").write_text(json.dumps([dataclasses.asdict(r) for r in requests]))
            with contextlib.suppress(BrokenPipeError):  # it died meanwhile: said below
                proc.stdin.write(f"{n}\n".encode())
                proc.stdin.flush()
            result, deadline = out / f"result-{n}.json", time.monotonic() + self.timeout_s
            while not result.is_file():
                raise_if_stopped()
                if (code := proc.poll()) is not None and not result.is_file():
                    raise WorkerFailed(f"{_failure(out, n, code)}; its log ends:\n{log_tail(log)}")
                if time.monotonic() > deadline:
                    raise WorkerFailed(f"the worker did not finish within {self.timeout_s:g} s and was killed; its "
                                       f"log ends:\n{log_tail(log)}")
                time.sleep(WAIT_POLL_S)
            return TargetRun.from_dict(json.loads(result.read_text()))
        except BaseException:
            self.close()
            raise

    def _start(self) -> Path:
        out = self._out = self._stack.enter_context(scratch(Path(tempfile.gettempdir()), "npugraph-worker-"))
        (out / "job.json").write_text(json.dumps(dataclasses.asdict(self.job)))
        # The worker watches for our death itself and ends its whole group: its engine may start processes.
        start(__name__, ["--job", str(out / "job.json"), "--out", str(out)], python_env(**self.env), out / "worker.log",
              die_with_parent=False, started=self._procs, stdin=subprocess.PIPE)
        return out

    def close(self) -> None:
        """End the worker and everything it started, and remove its directory."""
        with signals_deferred():  # a second Ctrl-C must not leave the worker behind
            kill(self._procs)
            for proc in self._procs:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            self._procs.clear()
            self._stack.close()
            self._out = None

    def __enter__(self) -> WorkerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerSessions:
    """A target's live workers, by the engine they run: a run on an engine already started reuses its worker. At most
    `capacity` live at once, the least recently used ended first."""

    def __init__(self, env: dict[str, str], timeout_s: float, capacity: int) -> None:
        self.env, self.timeout_s, self.capacity = env, timeout_s, capacity
        self._sessions: dict[WorkerJob, WorkerSession] = {}

    def run(self, job: WorkerJob, requests: list[Request]) -> TargetRun:
        session = self._sessions.pop(job, None) or WorkerSession(job, self.env, self.timeout_s)
        self._sessions[job] = session  # the most recently used last
        while len(self._sessions) > self.capacity:
            self._sessions.pop(next(iter(self._sessions))).close()
        return session.run(requests)

    def close(self) -> None:
        """End every worker."""
        while self._sessions:
            self._sessions.popitem()[1].close()


def sessions_capacity(device: str) -> int:
    """How many engines of one target may live at once on `device`: on the CPU two, so that a scenario's eager baseline
    and its mode under test both serve its continuations; on an accelerator one, whose memory one engine may fill."""
    return 2 if device == "cpu" else 1


def run_in_worker(job: WorkerJob, requests: list[Request], env: dict[str, str] | None = None,
                  timeout_s: float = WORKER_TIMEOUT_S) -> TargetRun:
    """One run of `requests` on `job`'s engine in a worker of its own; raises WorkerFailed if it fails."""
    with WorkerSession(job, env, timeout_s) as session:
        return session.run(requests)


def _failure(out: Path, n: int, code: int) -> str:
    error = out / f"error-{n}"
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
    parser = argparse.ArgumentParser(prog="python -m harness.targets.worker",
                                     description="an engine under test, serving the runs asked for on stdin")
    parser.add_argument("--job", type=Path, required=True, help="a WorkerJob as JSON (what WorkerSession writes)")
    parser.add_argument("--out", type=Path, required=True, help="directory of requests-N.json, result-N.json, error-N")
    args = parser.parse_args(argv)
    _exit_with_parent()
    n, code = 0, 0
    try:
        job = WorkerJob.from_dict(json.loads(args.job.read_text()))
        if job.setup:
            _resolve(job.setup)(job)
        run_requests: RunRequests = _resolve(job.runner)(job)  # the engine starts while the first run is on its way
        for line in sys.stdin:  # until the session closes our stdin
            n = int(line)
            requests = [Request(**r) for r in json.loads((args.out / f"requests-{n}.json").read_text())]
            run = run_requests(requests)
            written = args.out / f"result-{n}.json.tmp"
            written.write_text(json.dumps(dataclasses.asdict(run)))
            written.rename(args.out / f"result-{n}.json")  # whole, or not there
    except BaseException as e:  # any failure is the run's failure
        traceback.print_exc()
        # Failing before any run (the setup, the engine's start) fails the first.
        (args.out / f"error-{max(n, 1)}").write_text(f"{type(e).__name__}: {e}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # without waiting for engine threads that may outlive the runs (their results are written)


if __name__ == "__main__":
    main()
