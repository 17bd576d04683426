"""MoE fault injection: routing frozen when the graph is built is caught (graph == eager and eager ==
transformers for the MoE models are in test_graph_vs_eager.py, beside the dense ones)."""
import pytest

from harness.scenarios import Scenario
from reference_runner.graph_runner import GraphRunner
from reference_runner.models.moe import SparseMoeBlock, select_experts

MOE = ["qwen2_moe", "mixtral"]


_capture = GraphRunner.capture


def capture_with_routing_frozen(self):
    """The bug: each MoE block routes the warmup batch once and the captured graph reads that routing
    from a static buffer instead of running the router's top-k again: every replay reuses it."""
    frozen = self.frozen_routing = {}  # a static buffer of the runner: alive as long as its graphs

    def routed_once(block, router_logits):
        key = (id(block), router_logits.shape[0])
        if key not in frozen:
            frozen[key] = select_experts(router_logits, block.top_k, block.renormalize)
        return frozen[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SparseMoeBlock, "select_experts", routed_once)
        _capture(self)


FAULT_SCENARIO = dict(mode="graph", reference="eager", workload="mixed", max_new_tokens=32)


@pytest.mark.parametrize("model", MOE)
def test_correct_moe_passes_the_fault_scenario(check, model):
    result = check(Scenario(model=model, **FAULT_SCENARIO))
    assert result.failures == []
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("model", MOE)
def test_routing_frozen_at_capture_is_caught(check, monkeypatch, model):
    monkeypatch.setattr(GraphRunner, "capture", capture_with_routing_frozen)
    result = check(Scenario(model=model, **FAULT_SCENARIO))
    assert result.run.graph_steps > 0
    assert "mismatch" in {v.status for v in result.verdicts}
