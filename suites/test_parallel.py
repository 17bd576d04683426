"""Tensor and data parallel: graph mode on several launched ranks gives the tokens of one eager rank,
and each layout fault that breaks it is caught (a mismatch or a clear error) in bounded time.

Faults are injected into one rank only, by a `RankJob.setup` function of this module that the rank
calls before building its engine.
"""
import itertools

import pytest
import torch.nn.functional as F

from harness.judge import Judge
from harness.launch import available_ranks
from harness.scenarios import Scenario
from harness.targets.reference import ReferenceTarget
from reference_runner import graph_runner
from reference_runner.graph_runner import GraphRunner
from reference_runner.model_runner import ModelRunner
from reference_runner.models.layers import RowParallelLinear

pytestmark = pytest.mark.multirank

DIST_TIMEOUT_S = 10  # every collective of a faulty run gives up after this
EXIT_WITHIN_S = 60  # a failing run, every rank included, is over within this


def tp_scenario(model: str, tp: int = 2, dp: int = 1) -> Scenario:
    return Scenario(model=model, mode="graph", reference="eager", workload="mixed", tp=tp, dp=dp, max_new_tokens=16)


# Rank 1 of two decodes one late, short request (idle for 6 steps before it and 6 after); rank 0, five.
SKEWED_DP2 = Scenario(model="qwen2_moe", mode="graph", reference="eager", workload="skewed", dp=2,
                      dp_ranks=(0, 0, 0, 0, 0, 1), max_new_tokens=16)


def require_ranks(device: str, scenario: Scenario) -> Scenario:
    """`scenario`, or a skip where this host cannot hold its ranks (one per GPU or NPU)."""
    ranks, available = scenario.tp * scenario.dp, available_ranks(device)
    if ranks > available:
        pytest.skip(f"needs {ranks} {device} devices, this host has {available}")
    return scenario


def assert_all_match(result) -> None:
    """Every request matches (in float32; TP's other reduction order may flip near-ties in less)."""
    assert result.failures == []
    exact = result.scenario.dtype == "float32"
    assert {v.status for v in result.verdicts} <= ({"match"} if exact else {"match", "tie"})
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama_kv1", "qwen2_moe"])
def test_tp2_graph_matches_tp1_eager(check, device, model):
    assert_all_match(check(require_ranks(device, tp_scenario(model))))


def test_dp2_graph_matches_dp1_eager_with_an_idle_rank(check, device):
    result = check(require_ranks(device, SKEWED_DP2))
    assert_all_match(result)
    # 15 decode steps on rank 0 and 3 on rank 1, which replays 12 idle, padded ones meanwhile.
    assert result.run.graph_steps == 18


@pytest.mark.slow
@pytest.mark.parametrize(("model", "tp", "dp"), [
    ("llama", 4, 1), ("llama_kv1", 4, 1), ("qwen2_moe", 4, 1), ("mixtral", 4, 1),
    ("qwen2_moe", 2, 2), ("mixtral", 2, 2), ("qwen2_moe", 1, 4), ("llama", 2, 2),
])
def test_four_ranks_graph_matches_one_rank_eager(check, device, model, tp, dp):
    assert_all_match(check(require_ranks(device, tp_scenario(model, tp, dp))))


# --- faults: each run on rank 1 only -------------------------------------------------------------

def all_reduce_missing_in_graph(parallel) -> None:
    """Rank 1 captures its row-parallel layers without their all-reduce: its partial sums stay partial."""
    if parallel.rank != 1:
        return
    capture = GraphRunner.capture

    def capture_without_all_reduce(self):
        forward = RowParallelLinear.forward
        RowParallelLinear.forward = lambda layer, x: F.linear(x, layer.weight, layer.bias)
        try:
            capture(self)
        finally:
            RowParallelLinear.forward = forward

    GraphRunner.capture = capture_without_all_reduce


def pads_to_its_own_bucket(parallel) -> None:
    """Rank 1 pads each decode batch to the bucket of its own batch size, not of the largest DP rank's."""
    if parallel.rank == 1:
        graph_runner.dp_buffer_len = lambda forward_batch: forward_batch.batch_size


def raises_mid_run(parallel) -> None:
    """Rank 1 raises at its 6th forward."""
    if parallel.rank != 1:
        return
    forward, calls = ModelRunner.forward, itertools.count(1)

    def failing_forward(self, forward_batch):
        if next(calls) == 6:
            raise RuntimeError("injected failure at forward 6")
        return forward(self, forward_batch)

    ModelRunner.forward = failing_forward


FAULTS = {
    "all_reduce_missing_in_graph": (all_reduce_missing_in_graph, tp_scenario("llama")),
    "dp_ranks_pad_to_different_buckets": (pads_to_its_own_bucket, SKEWED_DP2),
    "rank_raises_mid_run": (raises_mid_run, tp_scenario("llama")),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_on_one_rank_fails_the_scenario_in_bounded_time(device, fault):
    setup, scenario = FAULTS[fault]
    require_ranks(device, scenario)
    judge = Judge(ReferenceTarget(device, rank_setup=f"{__name__}:{setup.__name__}", dist_timeout_s=DIST_TIMEOUT_S))
    result = judge.run(scenario)
    print(result.failures[:1])  # the report names the failing rank and its error
    assert not result.passed
    assert result.seconds < EXIT_WITHIN_S
    if fault == "rank_raises_mid_run":  # the cause, not its peer's "connection closed"
        assert result.failures[0].startswith("reference raised RankFailed: rank 1: RuntimeError: injected failure")
