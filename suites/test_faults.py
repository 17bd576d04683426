"""Fault injection: each known graph-replay bug (`suites/faults.py`), injected into the real runner, is
caught, and the unpatched runner passes the very same scenario.

Stale lengths have two forms: a host list that `update()` did not refresh where attention reads host
lists (npu, cpu), and a device `seq_lens` that was not refreshed where it reads those (cuda).
"""
import dataclasses

import pytest

from harness.inputs.scenarios import Scenario
from reference_runner.engine.args import EngineArgs
from suites.faults import FAULTS

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
