"""Tensor and data parallel: graph mode on several launched ranks gives the tokens of one eager rank,
and each layout fault that breaks it is caught (a mismatch or a clear error) in bounded time.

Faults are injected into one rank only, by a `RankJob.setup` function of `suites/faults.py` that every
rank calls before building its engine.
"""
import dataclasses

import pytest

from harness.inputs.scenarios import Scenario
from harness.judge import Judge
from harness.targets.launch import available_ranks
from harness.targets.reference import ReferenceTarget
from reference_runner.engine.args import EngineArgs
from suites.faults import RANK_FAULTS

pytestmark = pytest.mark.multirank

DIST_TIMEOUT_S = 10  # every collective of a faulty run gives up after this
EXIT_WITHIN_S = 60  # a failing run, every rank included, is over within this


def tp_scenario(model: str, tp: int = 2, dp: int = 1) -> Scenario:
    return Scenario(model=model, baseline="eager", engine=EngineArgs(mode="graph", tp_size=tp, dp_size=dp),
                    workload="mixed", max_new_tokens=16)


# Rank 1 of two decodes one late, short request (idle for 6 steps before it and 6 after); rank 0, five.
SKEWED_DP2 = Scenario(model="qwen2_moe", baseline="eager", engine=EngineArgs(mode="graph", dp_size=2),
                      workload="skewed", dp_ranks=(0, 0, 0, 0, 0, 1), max_new_tokens=16)
DP_MODELS = ["qwen2_moe", "qwen3_moe"]  # MoE: DP attention


def require_ranks(device: str, scenario: Scenario) -> Scenario:
    """`scenario`, or a skip where this host cannot hold its ranks (one per GPU or NPU)."""
    ranks, available = scenario.engine.world_size, available_ranks(device)
    if ranks > available:
        pytest.skip(f"needs {ranks} {device} devices, this host has {available}")
    return scenario


def assert_all_match(result) -> None:
    """Every request matches (in float32; TP's other reduction order may flip near-ties in less)."""
    assert result.failures == []
    exact = result.scenario.engine.dtype == "float32"
    assert {v.status for v in result.verdicts} <= ({"match"} if exact else {"match", "tie"})
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama_kv1", "qwen2_moe", "qwen3", "qwen3_moe"])
def test_tp2_graph_matches_tp1_eager(check, device, model):
    assert_all_match(check(require_ranks(device, tp_scenario(model))))


@pytest.mark.parametrize("model", DP_MODELS)
def test_dp2_graph_matches_dp1_eager_with_an_idle_rank(check, device, model):
    result = check(require_ranks(device, dataclasses.replace(SKEWED_DP2, model=model)))
    assert_all_match(result)
    # 15 decode steps on rank 0 and 3 on rank 1, which replays 12 idle, padded ones meanwhile.
    assert result.run.graph_steps == 18


@pytest.mark.slow
@pytest.mark.parametrize(("model", "tp", "dp"), [
    ("llama", 4, 1), ("llama_kv1", 4, 1), ("qwen2_moe", 4, 1), ("mixtral", 4, 1),
    ("qwen2_moe", 2, 2), ("mixtral", 2, 2), ("qwen2_moe", 1, 4), ("llama", 2, 2),
    ("qwen3", 4, 1), ("qwen3_moe", 4, 1), ("qwen3_moe", 2, 2),
])
def test_four_ranks_graph_matches_one_rank_eager(check, device, model, tp, dp):
    assert_all_match(check(require_ranks(device, tp_scenario(model, tp, dp))))


FAULT_SCENARIOS = {
    "all_reduce_missing_in_graph": tp_scenario("llama"),
    "pads_to_its_own_bucket": SKEWED_DP2,
    "raises_mid_run": tp_scenario("llama"),
}


@pytest.mark.parametrize("fault", FAULT_SCENARIOS)
def test_fault_on_one_rank_fails_the_scenario_in_bounded_time(device, fault):
    scenario = require_ranks(device, FAULT_SCENARIOS[fault])
    judge = Judge(ReferenceTarget(device, rank_setup=RANK_FAULTS[fault], dist_timeout_s=DIST_TIMEOUT_S))
    result = judge.run(scenario)
    print(result.failures[:1])  # the report names the failing rank and its error
    assert not result.passed
    assert result.seconds < EXIT_WITHIN_S
    if fault == "raises_mid_run":  # the cause, not its peer's "connection closed"
        assert result.failures[0].startswith(
            "the engine under test (reference) raised RankFailed: rank 1: RuntimeError: injected failure")
