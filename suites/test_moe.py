"""MoE models (Qwen2-MoE with its shared expert, Mixtral): eager matches transformers and graph mode
matches eager, on the dense suites' request mixes with 64 new tokens (fp32: `match` everywhere)."""
import pytest

from harness.scenarios import Scenario
from reference_runner.graph_runner import GraphRunner
from reference_runner.models.moe import SparseMoeBlock, select_experts

MOE = ["qwen2_moe", "mixtral"]


@pytest.mark.parametrize("model", MOE)
def test_eager_matches_transformers_oracle(check, model):
    result = check(Scenario(model=model, mode="eager", reference="oracle", workload="mixed", max_new_tokens=64))
    assert result.failures == []
    assert {v.status for v in result.verdicts} == {"match"}


@pytest.mark.parametrize("workload", ["batch1", "batch3", "batch5", "batch7", "batch8", "join_leave", "mixed"])
@pytest.mark.parametrize("model", MOE)
def test_graph_matches_eager(check, model, workload):
    result = check(Scenario(model=model, mode="graph", reference="eager", workload=workload, max_new_tokens=64))
    assert result.failures == []
    assert {v.status for v in result.verdicts} == {"match"}
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("model", MOE)
def test_batch_above_max_bs_falls_back_to_eager_counted_and_correct(check, model):
    result = check(Scenario(model=model, mode="graph", reference="eager", workload="batch13", max_new_tokens=64))
    assert result.failures == []
    assert {v.status for v in result.verdicts} == {"match"}
    # 13 rows for tokens 2-32, 9 rows for 33-48 (eager), then 5 rows for 49-64 (graph).
    assert result.run.fallback_reasons == {"batch size 13 above max_bs 8": 31, "batch size 9 above max_bs 8": 16}
    assert (result.run.eager_steps, result.run.graph_steps) == (47, 16)


# --- fault injection: routing frozen when the graph is built -------------------------------------

_capture = GraphRunner.capture


def capture_with_routing_frozen(self):
    """The bug: each MoE block routes the warmup batch once and the captured graph reads that routing
    from a static buffer instead of running the router's top-k again: every replay reuses it."""
    frozen = {}

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
