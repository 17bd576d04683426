"""Compiled graph mode (`mode="compile"`, sim/piecewise.py on the CPU) gives eager's tokens, and
compiles each captured size exactly once: later lengths, batches and requests reuse it. The
compiled graphs still read the lengths refreshed before each replay (host lists through `update()`,
or the device `seq_lens` on cuda): leaving them stale is caught.

Compiled code may round differently from eager, so a near-tie (`tie`) is accepted, never a mismatch.
"""
import dataclasses

import pytest

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.scenarios import Scenario
from harness.inputs.workloads import make_requests
from reference_runner.attention import default_dtype
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.graphs import compiled
from reference_runner.sim import piecewise
from suites.faults import FAULTS, STALE_LENGTHS

MODELS = ["llama", "qwen2_moe"]
COMPILE = EngineArgs(mode="compile")  # the Scenario defaults: these engines share inductor's cache


def compilations(device: str) -> int:
    """Compiles so far in this process: piecewise pieces on the CPU, whole forwards on cuda and npu."""
    return piecewise.compilations if device == "cpu" else compiled.compilations


@pytest.mark.parametrize("workload", ["mixed", "join_leave"])
@pytest.mark.parametrize("model", MODELS)
def test_compile_matches_eager(check, model, workload):
    result = check(Scenario(model=model, baseline="eager", engine=COMPILE, workload=workload, max_new_tokens=32))
    assert result.failures == []
    assert {v.status for v in result.verdicts} <= {"match", "tie"}
    assert result.run.graph_steps > 0


def test_each_captured_size_compiles_once_and_never_again(device):
    before = compilations(device)
    engine = Engine(ensure_checkpoint("llama"), dataclasses.replace(COMPILE, dtype=default_dtype(device)), device=device)
    runner = engine.model_runner.graph_runner
    # One compile per captured size (on the CPU: the attention op's host lengths lifted into a tensor input).
    assert compilations(device) - before == len(runner.capture_bs) == 4
    for workload in ["mixed", "join_leave", "batch3", "batch8"]:
        engine.generate(make_requests(workload, engine.model_runner.vocab_size, max_new_tokens=24))
    assert set(runner.bucket_hits) == {1, 2, 4, 8}
    assert compilations(device) - before == 4


@pytest.mark.parametrize("fault", STALE_LENGTHS)
def test_compiled_graphs_still_read_the_refreshed_lengths(check, monkeypatch, device, fault):
    if reason := FAULTS[fault].skip_reason(device):
        pytest.skip(reason)
    FAULTS[fault].inject(monkeypatch)
    FAULTS[fault].assert_caught(check(Scenario(model="llama", baseline="eager", engine=COMPILE, workload="mixed",
                                               max_new_tokens=32)))
