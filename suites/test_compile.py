"""Compiled graph mode (`mode="compile"`, graphs/piecewise.py on the CPU) gives eager's tokens, and
compiles each captured size exactly once: later lengths, batches and requests reuse it. The
compiled graphs still read the host lengths that `update()` refreshes: skipping it is caught.

Compiled code may round differently from eager, so a near-tie (`tie`) is accepted, never a mismatch.
"""
import pytest

from harness.checkpoints import ensure_checkpoint
from harness.scenarios import Scenario
from harness.workloads import make_requests
from reference_runner.engine import Engine
from reference_runner.graphs import piecewise
from suites.test_faults import FAULTS

MODELS = ["llama", "qwen2_moe"]


@pytest.fixture(autouse=True)
def _compile_mode_exists(device):
    if device == "npu":
        pytest.skip("mode 'compile' on npu (torchair) is not implemented yet")


@pytest.mark.parametrize("workload", ["mixed", "join_leave"])
@pytest.mark.parametrize("model", MODELS)
def test_compile_matches_eager(check, model, workload):
    result = check(Scenario(model=model, mode="compile", reference="eager", workload=workload, max_new_tokens=32))
    assert result.failures == []
    assert {v.status for v in result.verdicts} <= {"match", "tie"}
    assert result.run.graph_steps > 0


def test_each_captured_size_compiles_once_and_never_again(device):
    before = piecewise.compilations
    # The Scenario defaults, so the check scenarios above and this engine share inductor's cache.
    engine = Engine(ensure_checkpoint("llama"), device=device, mode="compile", max_bs=8, block_size=16, max_context=256)
    runner = engine.model_runner.graph_runner
    # The attention op's host lengths are lifted into a tensor input: one piece per captured size.
    assert piecewise.compilations - before == len(runner.capture_bs) == 4
    for workload in ["mixed", "join_leave", "batch3", "batch8"]:
        engine.generate(make_requests(workload, engine.model_runner.vocab_size, max_new_tokens=24))
    assert set(runner.bucket_hits) == {1, 2, 4, 8}
    assert piecewise.compilations - before == 4


@pytest.mark.parametrize("fault", ["host_list_update_skipped", "update_fed_previous_step_lengths"])
def test_compiled_graphs_still_read_the_updated_host_lengths(check, monkeypatch, fault):
    cls, method, broken = FAULTS[fault]
    monkeypatch.setattr(cls, method, broken)
    result = check(Scenario(model="llama", mode="compile", reference="eager", workload="mixed", max_new_tokens=32))
    assert "mismatch" in {v.status for v in result.verdicts}
