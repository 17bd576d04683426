"""Compiled graph mode (`mode="compile"`, graphs/piecewise.py on the CPU) gives eager's tokens, and
compiles each captured size exactly once: later lengths, batches and requests reuse it. The
compiled graphs still read the lengths refreshed before each replay (host lists through `update()`,
or the device `seq_lens` on cuda): leaving them stale is caught.

Compiled code may round differently from eager, so a near-tie (`tie`) is accepted, never a mismatch.
"""
import pytest

from harness.checkpoints import ensure_checkpoint
from harness.scenarios import Scenario
from harness.workloads import make_requests
from reference_runner.engine import Engine
from reference_runner.graphs import compiled, piecewise
from suites.test_faults import DEVICE_LENS_FAULTS, FAULTS, HOST_LIST_FAULTS, skip_unless_applicable

MODELS = ["llama", "qwen2_moe"]


def compilations(device: str) -> int:
    """Compiles so far in this process: piecewise pieces on the CPU, whole forwards on cuda and npu."""
    return piecewise.compilations if device == "cpu" else compiled.compilations


@pytest.mark.parametrize("workload", ["mixed", "join_leave"])
@pytest.mark.parametrize("model", MODELS)
def test_compile_matches_eager(check, model, workload):
    result = check(Scenario(model=model, mode="compile", reference="eager", workload=workload, max_new_tokens=32))
    assert result.failures == []
    assert {v.status for v in result.verdicts} <= {"match", "tie"}
    assert result.run.graph_steps > 0


def test_each_captured_size_compiles_once_and_never_again(device):
    before = compilations(device)
    # The Scenario defaults, so the check scenarios above and this engine share inductor's cache.
    engine = Engine(ensure_checkpoint("llama"), device=device, mode="compile", max_bs=8, block_size=16, max_context=256)
    runner = engine.model_runner.graph_runner
    # One compile per captured size (on the CPU: the attention op's host lengths lifted into a tensor input).
    assert compilations(device) - before == len(runner.capture_bs) == 4
    for workload in ["mixed", "join_leave", "batch3", "batch8"]:
        engine.generate(make_requests(workload, engine.model_runner.vocab_size, max_new_tokens=24))
    assert set(runner.bucket_hits) == {1, 2, 4, 8}
    assert compilations(device) - before == 4


@pytest.mark.parametrize("fault", sorted(HOST_LIST_FAULTS | DEVICE_LENS_FAULTS))
def test_compiled_graphs_still_read_the_refreshed_lengths(check, monkeypatch, device, fault):
    skip_unless_applicable(fault, device)
    cls, method, broken = FAULTS[fault]
    monkeypatch.setattr(cls, method, broken)
    result = check(Scenario(model="llama", mode="compile", reference="eager", workload="mixed", max_new_tokens=32))
    assert "mismatch" in {v.status for v in result.verdicts}
