"""MoE fault injection: routing frozen when the graph is built is caught (graph == eager and eager ==
transformers for the MoE models are in test_graph_vs_eager.py, beside the dense ones)."""
import pytest

from harness.inputs.scenarios import Scenario
from reference_runner.engine.args import EngineArgs
from suites.faults import ROUTING_FROZEN

MOE = ["qwen2_moe", "mixtral", "qwen3_moe"]


def fault_scenario(model: str) -> Scenario:
    return Scenario(model=model, baseline="eager", engine=EngineArgs(mode="graph"), workload="mixed", max_new_tokens=32)


@pytest.mark.parametrize("model", MOE)
def test_correct_moe_passes_the_fault_scenario(check, model):
    result = check(fault_scenario(model))
    assert result.failures == []
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("model", MOE)
def test_routing_frozen_at_capture_is_caught(check, monkeypatch, model):
    ROUTING_FROZEN.inject(monkeypatch)
    result = check(fault_scenario(model))
    assert result.run.graph_steps > 0
    assert "mismatch" in {v.status for v in result.verdicts}
