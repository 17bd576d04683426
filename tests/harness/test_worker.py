"""Target workers: an engine run in its own process returns the same records as in process, and serves one run after
another from one start; one that raises, is killed or hangs fails the run in bounded time, quoting its log; nothing it
started outlives the run."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.scenarios import Scenario
from harness.inputs.workloads import make_requests
from harness.targets.base import TargetRun
from harness.targets.reference import ReferenceTarget
from harness.targets.worker import (
    WORKER_TIMEOUT_S,
    WorkerFailed,
    WorkerJob,
    WorkerSession,
    WorkerSessions,
    run_in_worker,
)
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation
from suites.faults import WORKER_FAULTS

EXIT_WITHIN_S = 60
# A judge process that runs one job (argv[1]) in a worker.
JUDGE = ("import json, sys; from harness.inputs.workloads import make_requests; "
         "from harness.targets.worker import WorkerJob, run_in_worker; "
         "run_in_worker(WorkerJob.from_dict(json.loads(sys.argv[1])), make_requests('mixed', 512, 4))")
REQUESTS = make_requests("mixed", 512, 4)


def make_job(setup: str | None = None, mode: str = "graph") -> WorkerJob:
    return WorkerJob("harness.targets.reference:start_engine", str(ensure_checkpoint("llama")), EngineArgs(mode=mode),
                     setup=setup)


def live_children() -> list[int]:
    """Pids of this process's children that are alive (not zombies)."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if _parent(stat) == os.getpid() and alive(int(stat.parent.name))]


def _parent(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_returns_the_records_of_the_same_run_in_process():
    job = make_job()
    in_process = ReferenceTarget("cpu").run(Scenario("llama", "eager", job.engine), Path(job.checkpoint), REQUESTS)
    assert run_in_worker(job, REQUESTS) == in_process
    assert in_process.engine_version == "reference 0.1.0"


def test_a_session_serves_one_run_after_another_from_one_worker():
    job, shorter = make_job(), make_requests("batch3", 512, 2)
    with WorkerSession(job) as session:
        first = session.run(REQUESTS)
        (worker,) = live_children()
        second = session.run(shorter)
        assert live_children() == [worker]
    assert live_children() == []
    assert [len(g.output_ids) for g in second.generations] == [r.max_new_tokens for r in shorter]
    assert first == run_in_worker(job, REQUESTS)


def test_a_target_keeps_at_most_its_capacity_of_workers_the_least_recently_used_ended_first():
    workers = WorkerSessions({}, WORKER_TIMEOUT_S, capacity=1)
    try:
        workers.run(make_job(mode="eager"), REQUESTS[:1])
        (eager,) = live_children()
        workers.run(make_job(mode="graph"), REQUESTS[:1])
        (graph,) = live_children()
        assert graph != eager
    finally:
        workers.close()
    assert live_children() == []


def test_target_run_survives_its_json_round_trip():
    run = TargetRun([Generation("r0", [7, 3], [[(7, -0.25), (2, -1.5)], [(3, -0.5), (7, -1.0)]], [False, True])],
                    graph_steps=1, eager_steps=1, fallback_reasons={"above max_bs": 1}, counts_graph_steps=False,
                    engine_version="vllm 0.32.0")
    assert TargetRun.from_dict(json.loads(json.dumps(dataclasses.asdict(run)))) == run


def test_worker_that_raises_fails_the_run_with_its_error_and_log():
    with pytest.raises(WorkerFailed, match=r"^the worker raised RuntimeError: injected; its log ends:\n(.*\n)*    RuntimeError: "
                                           r"injected$"):
        run_in_worker(make_job(WORKER_FAULTS["worker_raises"]), REQUESTS)


def test_worker_killed_by_a_signal_fails_the_run_quoting_its_last_log_line():
    with pytest.raises(WorkerFailed, match=r"^the worker died of SIGKILL without reporting an error; its log ends:\n"
                                           r"    about to be killed$"):
        run_in_worker(make_job(WORKER_FAULTS["worker_is_killed"]), REQUESTS)


def test_hung_worker_and_the_process_it_started_are_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"^the worker did not finish within 30 s and was killed; its log ends:\n"
                                           r"    worker \d+ started process \d+$") as failure:
        run_in_worker(make_job(WORKER_FAULTS["worker_hangs"]), REQUESTS, timeout_s=30)
    assert time.monotonic() - start < EXIT_WITHIN_S
    worker, child = map(int, re.findall(r"\d+", str(failure.value).splitlines()[-1]))
    assert not alive(worker)
    assert not alive(child)


def test_worker_whose_judge_dies_kills_itself_and_the_process_it_started(tmp_path):
    # Killed outright, the judge runs no cleanup: its worker must notice alone.
    job = json.dumps(dataclasses.asdict(make_job(WORKER_FAULTS["worker_hangs"])))
    judge = subprocess.Popen([sys.executable, "-c", JUDGE, job],
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(tmp_path)})
    log = _wait_for_worker_log(tmp_path)
    worker, child = map(int, re.findall(r"\d+", log.read_text()))
    judge.send_signal(signal.SIGKILL)
    judge.wait()
    deadline = time.monotonic() + EXIT_WITHIN_S
    while time.monotonic() < deadline and (alive(worker) or alive(child)):
        time.sleep(0.1)
    assert not alive(worker)
    assert not alive(child)


def _wait_for_worker_log(tmp: Path) -> Path:
    deadline = time.monotonic() + EXIT_WITHIN_S
    while time.monotonic() < deadline:
        for log in tmp.glob("npugraph-worker-*/worker.log"):
            if "started process" in log.read_text():
                return log
        time.sleep(0.1)
    raise AssertionError("the worker never started its process")
