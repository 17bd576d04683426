"""Fault injection: each known graph-replay bug (`suites/faults.py`), injected into the real runner, is
caught, and the unpatched runner passes the very same scenario (compiled mode's twin in bfloat16:
suites/test_precision.py).

A fault late in a sequence strikes requests that met a near-tie earlier: in bfloat16 most of them do, so
it is caught only because the comparison continues past near-ties, in a re-run forced with the
baseline's tokens, compiled mode (other kernels, so near-ties) included.

Stale lengths have two forms: a host list that `update()` did not refresh where attention reads host
lists (npu, cpu), and a device `seq_lens` that was not refreshed where it reads those (cuda).
"""
import dataclasses

import pytest

from harness.inputs.scenarios import Scenario
from harness.inputs.workloads import make_requests
from reference_runner.engine.args import EngineArgs
from suites.faults import FAULTS, LATE_FAULTS, LATE_FROM_POSITION

SCENARIO = Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="graph"), workload="mixed", max_new_tokens=32)

# float32 becomes the device's default dtype; bfloat16 is where float noise between kernels is widest.
DTYPES = ["float32", "bfloat16"]


def in_dtype(dtype: str) -> Scenario:
    return dataclasses.replace(SCENARIO, engine=dataclasses.replace(SCENARIO.engine, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_runner_passes_the_fault_scenario(check, dtype):
    result = check(in_dtype(dtype))
    assert result.failures == []
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fault", FAULTS)
def test_injected_fault_is_caught(check, monkeypatch, device, fault, dtype):
    if reason := FAULTS[fault].skip_reason(device):
        pytest.skip(reason)
    FAULTS[fault].inject(monkeypatch)
    result = check(in_dtype(dtype))
    assert not result.passed
    if fault == "graph_never_replayed":
        assert result.failures == ["no decode step replayed a graph in mode 'graph' (silent eager fallback)"]
    else:
        assert "mismatch" in {v.status for v in result.verdicts}


@pytest.mark.parametrize("mode", ["graph", "compile"])
@pytest.mark.parametrize("fault", LATE_FAULTS)
def test_a_fault_late_in_the_sequence_is_caught_in_bfloat16(check, monkeypatch, fault, mode):
    LATE_FAULTS[fault].inject(monkeypatch)
    scenario = dataclasses.replace(SCENARIO, engine=EngineArgs(mode=mode, dtype="bfloat16"))
    result = check(scenario)
    mismatches = [v for v in result.verdicts if v.status == "mismatch"]
    assert mismatches
    prompt_lens = {r.rid: len(r.prompt_ids) for r in make_requests("mixed", 512, SCENARIO.max_new_tokens)}
    # Caught where it strikes: at a step whose forward fed a position of the fourth block.
    assert all(prompt_lens[v.rid] + v.step - 1 >= LATE_FROM_POSITION for v in mismatches)
