"""SGLang as the engine under test, for real, on this host's device (SGLang's own CPU engine on CPU hosts). Collected on
every machine, skipped where SGLang is not installed; CI installs its CPU engine, and its `.ci/run` also checks
`--target sglang --model llama_hd32 --modes eager` unperturbed: the passing twin of the perturbed run below.

Each run starts SGLang's scheduler and detokenizer processes under its worker: none of them outlives the run, however it
ends (normal end, engine crash, timeout, SIGTERM, SIGINT).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import harness.targets
from harness.cli import main
from harness.exits import EXIT_FAIL, EXIT_PASS
from harness.targets.reference import ReferenceTarget
from harness.targets.sglang import SGLangTarget
from suites.faults import PERTURBED_REQUEST, PERTURBED_STEP, WORKER_FAULTS
from suites.processes import TAG, tagged_processes, watching

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                       reason="needs SGLang installed (docs/engines.md; CI installs its CPU engine)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds SGLang's processes through /proc"),
]
SGLANG_PROCESSES = {"sglang::scheduler", "sglang::detokenizer"}  # as SGLang names them (setproctitle)
STOP_WITHIN_S = 20  # SIGTERM to the worker's process group, then SIGKILL after 5 s at worst
START_WITHIN_S = 600  # importing SGLang, then its engine's start-up, on two loaded cores
CHECK = ["check", "--target", "sglang", "--model", "llama_hd32", "--modes", "eager"]


def check_with(monkeypatch, tmp_path, device, target: SGLangTarget, tag: str) -> tuple[int, dict, set[str]]:
    """`npugraph-harness check` of llama_hd32 eager on `target`, in this process, every process it starts tagged `tag`:
    its exit status, its JSON scenario and the command lines of the processes seen while it ran."""
    monkeypatch.setattr(harness.targets, "get_target", lambda name, device: target)
    monkeypatch.setenv(TAG, tag)
    report = tmp_path / "check.json"
    with watching(tag) as seen:
        status = main([*CHECK, "--device", device, "--json", str(report)])
    return status, json.loads(report.read_text())["scenarios"][0], seen


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, device):
    """The check, SGLang's logits at step 4 of r1 perturbed: its status, scenario and the processes it ran."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        target = SGLangTarget(device, setup=WORKER_FAULTS["sglang_logits_perturbed"])
        tag = f"{os.getpid()}-perturbed"
        yield (*check_with(monkeypatch, tmp_path_factory.mktemp("perturbed"), device, target, tag), tag)


def test_check_fails_naming_the_request_and_step_whose_logits_were_perturbed(perturbed):
    status, scenario, _, _ = perturbed
    assert status == EXIT_FAIL
    # Only the perturbed step diverges: the other requests, decoded in the same batches, match transformers.
    assert scenario["verdicts"] == {"match": 7, "tie": 0, "mismatch": 1}
    assert scenario["engine_version"] == "sglang 0.5.23"
    divergence = scenario["first_divergence"]
    assert (divergence["rid"], divergence["step"], divergence["status"]) == (PERTURBED_REQUEST, PERTURBED_STEP, "mismatch")


def test_a_run_that_ends_normally_leaves_no_sglang_process(perturbed):
    _, _, seen, tag = perturbed
    assert SGLANG_PROCESSES.issubset(seen)  # they ran
    assert tagged_processes(tag) == {}


AGAINST_REFERENCE = ["check", "--target", "sglang", "--against", "reference", "--model", "llama_hd32", "--modes", "eager",
                     "--dtype", "bfloat16"]


@pytest.mark.parametrize(("fault", "status"), [
    ("sglang_runner_up_lifted_after_first_near_tie", EXIT_FAIL),
    pytest.param(None, EXIT_PASS, marks=pytest.mark.slow),  # its twin in CI: the cross-engine check of .ci/run
], ids=["lifted after the first near-tie", "unperturbed"])
def test_a_fault_after_each_requests_first_near_tie_is_caught_through_continuation(monkeypatch, tmp_path, device, fault,
                                                                                   status):
    # Against the reference runner, both free-running: every near-tie stops the comparison, and only continuing both
    # sides past it reaches the steps the fault changes.
    target = SGLangTarget(device, setup=WORKER_FAULTS[fault] if fault else None)
    monkeypatch.setattr(harness.targets, "get_target",
                        lambda name, device: target if name == "sglang" else ReferenceTarget(device))
    report = tmp_path / "check.json"
    assert main([*AGAINST_REFERENCE, "--device", device, "--json", str(report)]) == status
    scenario = json.loads(report.read_text())["scenarios"][0]
    assert scenario["forced_requests"] > 0
    continued = [r for r in scenario["requests"] if "continuation" in r["continued_by"]]
    if fault:
        assert any(r["status"] == "mismatch" for r in continued), scenario["failures"]
    else:
        assert scenario["coverage"] >= 0.9


@pytest.mark.slow  # a third SGLang start-up: nightly, to keep CI within its time
def test_an_engine_crash_fails_the_scenario_and_leaves_no_sglang_process(monkeypatch, tmp_path, device):
    tag = f"{os.getpid()}-crash"
    target = SGLangTarget(device, setup=WORKER_FAULTS["sglang_scheduler_crashes"])
    status, scenario, seen = check_with(monkeypatch, tmp_path, device, target, tag)
    assert status == EXIT_FAIL
    assert scenario["failures"][0].startswith("the engine under test (sglang) raised WorkerFailed: ")
    assert "injected scheduler crash" in scenario["failures"][0]  # quoted from the worker's log
    assert SGLANG_PROCESSES.issubset(seen)
    assert tagged_processes(tag) == {}


@pytest.mark.slow  # waits out a timeout longer than SGLang's start-up
def test_a_run_past_its_timeout_is_killed_with_every_sglang_process(monkeypatch, tmp_path, device):
    tag = f"{os.getpid()}-timeout"
    target = SGLangTarget(device, setup=WORKER_FAULTS["sglang_scheduler_hangs"], timeout_s=240)
    status, scenario, seen = check_with(monkeypatch, tmp_path, device, target, tag)
    assert status == EXIT_FAIL
    assert "the worker did not finish within 240 s and was killed" in scenario["failures"][0]
    assert SGLANG_PROCESSES.issubset(seen)
    assert tagged_processes(tag) == {}


@pytest.mark.parametrize(("sig", "status", "line"), [
    (signal.SIGTERM, 143, "npugraph-harness: stopped by SIGTERM"),
    pytest.param(signal.SIGINT, 130, "npugraph-harness: stopped by SIGINT (Ctrl-C)", marks=pytest.mark.slow),
], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_an_sglang_run_stops_the_check_and_leaves_no_process(tmp_path, device, sig, status, line):
    tag = f"{os.getpid()}-{sig.name}"
    check = subprocess.Popen([sys.executable, "-m", "harness", *CHECK, "--device", device],
                             env={**os.environ, TAG: tag, "TMPDIR": str(tmp_path)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with watching(tag) as seen:
            deadline = time.monotonic() + START_WITHIN_S
            while not SGLANG_PROCESSES.issubset(seen):
                if check.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"SGLang's processes never started: {check.communicate()[1][-3000:]}")
                time.sleep(0.1)
        check.send_signal(sig)
        _, err = check.communicate(timeout=STOP_WITHIN_S)
    finally:
        check.kill()
    assert (check.returncode, err.splitlines()[-1]) == (status, line), err[-3000:]
    assert "Traceback" not in err
    assert tagged_processes(tag) == {}
    assert list(tmp_path.glob("npugraph-worker-*")) == []
