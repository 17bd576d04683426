"""The judge past near-ties: a target that can force tokens is run once more, every request of the scenario in
one run with those that stopped at a near-tie forced from there; coverage is reported, and a scenario that
compared too little fails. The records come from a scripted target, written by hand like test_compare's."""
import pytest

from harness.inputs.scenarios import Scenario
from harness.judge import Judge
from harness.targets.base import Target, TargetRun, default_min_coverage
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

TIE = [(5, -0.7), (6, -0.7)]  # an exact tie for first place: a near-tie at every tolerance but the exact one
TIED = [(6, -0.7), (5, -0.7)]
PARTS_AT = 2
COMPILED = Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="compile"))
GENERATED = 217  # tokens of the `mixed` workload at max_new_tokens 32
ALL = {f"r{i}" for i in range(8)}


class ScriptedTarget(Target):
    """Its eager run always chooses token 5. Its compiled run chooses 6 at step PARTS_AT in the requests of
    `parts` (a near-tie: the two are tied for first place), and feeds its choice on; a forced run feeds the
    tokens it is given and still reports its own top-k."""

    name = "scripted"
    device = "cpu"

    def __init__(self, can_force_tokens: bool, parts: set[str], short: str | None = None) -> None:
        self.can_force_tokens = can_force_tokens
        self.parts = parts
        self.short = short  # a request answered with one token too few
        self.runs: list[tuple[str, list[Request]]] = []

    def run(self, scenario: Scenario, checkpoint, requests: list[Request]) -> TargetRun:
        self.runs.append((scenario.mode, requests))
        return TargetRun([self.generation(scenario.mode, r) for r in requests], graph_steps=int(scenario.mode != "eager"))

    def generation(self, mode: str, request: Request) -> Generation:
        generation = Generation(request.rid, forced_from=request.forced_from)
        for step in range(request.max_new_tokens - (request.rid == self.short)):
            own_choice = 6 if mode == "compile" and request.rid in self.parts and step >= PARTS_AT else 5
            forced = request.forced_from is not None and step >= request.forced_from
            token = request.forced_ids[step - request.forced_from] if forced else own_choice
            generation.append(token, TIED if own_choice == 6 else TIE, in_graph=mode != "eager")
        return generation


def test_a_target_that_can_force_tokens_is_run_again_with_the_tied_requests_forced_past_their_tie():
    target = ScriptedTarget(can_force_tokens=True, parts={"r0", "r2", "r5"})
    result = Judge(target).run(COMPILED)
    assert [mode for mode, _ in target.runs] == ["eager", "compile", "compile"]
    (_, first), (_, again) = target.runs[1:]
    assert [r.rid for r in again] == [r.rid for r in first]  # every request: the schedule of the first run
    assert {r.rid: (r.forced_from, r.forced_ids) for r in again if r.forced_from is not None} == {
        r.rid: (PARTS_AT, [5] * (r.max_new_tokens - PARTS_AT)) for r in first if r.rid in {"r0", "r2", "r5"}}
    assert result.failures == []
    assert [(v.rid, v.status, v.compared == v.generated) for v in result.verdicts] == [
        (f"r{i}", "tie" if i in (0, 2, 5) else "match", True) for i in range(8)]
    assert (result.coverage, result.forced_requests) == (1.0, 3)


def test_a_target_that_cannot_force_tokens_stops_at_the_tie_and_fails_below_its_minimum_coverage():
    target = ScriptedTarget(can_force_tokens=False, parts=ALL)
    result = Judge(target).run(COMPILED)
    assert [mode for mode, _ in target.runs] == ["eager", "compile"]
    compared = 8 * (PARTS_AT + 1)
    assert result.coverage == compared / GENERATED
    assert result.failures == [f"too little compared: {compared} of {GENERATED} generated tokens (11%), below the "
                               "minimum coverage 30% (--min-coverage)"]
    assert {v.status for v in result.verdicts} == {"tie"}


def test_a_lower_minimum_coverage_lets_the_same_scenario_pass():
    result = Judge(ScriptedTarget(can_force_tokens=False, parts=ALL), min_coverage=0.1).run(COMPILED)
    assert result.passed


@pytest.mark.parametrize(("can_force_tokens", "minimum"), [(True, 0.9), (False, 0.3)])
def test_the_default_minimum_coverage_follows_whether_the_target_can_force_tokens(can_force_tokens, minimum):
    target = ScriptedTarget(can_force_tokens, parts=set())
    assert default_min_coverage(target) == Judge(target).min_coverage == minimum


def test_the_report_says_how_much_was_compared_and_counts_every_near_tie():
    result = Judge(ScriptedTarget(can_force_tokens=True, parts={"r1"})).run(COMPILED)
    report = result.as_dict()
    # r1 (25 tokens) prefers 6 from step 2 on, also where it is fed 5: 23 near-ties, none stopped at.
    assert {k: report[k] for k in ("coverage", "tokens_compared", "tokens_generated", "near_ties", "router_near_ties",
                                   "forced_requests")} == {
        "coverage": 1.0, "tokens_compared": GENERATED, "tokens_generated": GENERATED, "near_ties": 23,
        "router_near_ties": 0, "forced_requests": 1}


def test_against_the_oracle_a_generation_shorter_than_asked_for_is_a_mismatch():
    # The oracle scores the target's own tokens, so it cannot see a missing one: the request's count does.
    target = ScriptedTarget(can_force_tokens=True, parts=set(), short="r3")
    result = Judge(target).run(Scenario(model="llama", baseline="oracle", engine=EngineArgs(mode="eager")))
    r3 = next(v for v in result.verdicts if v.rid == "r3")
    assert (r3.status, r3.reason) == ("mismatch", "test produced 18 tokens, the request asks for 19")


def test_the_eager_run_is_made_once_and_serves_the_eager_scenario_and_every_baseline():
    target = ScriptedTarget(can_force_tokens=True, parts=set())
    judge = Judge(target)
    eager = judge.run(Scenario(model="llama", baseline="oracle", engine=EngineArgs(mode="eager")))
    graph, compiled = (judge.run(Scenario(model="llama", baseline="eager", engine=EngineArgs(mode=mode)))
                       for mode in ("graph", "compile"))
    assert [mode for mode, _ in target.runs] == ["eager", "graph", "compile"]
    assert (eager.phases.reused, graph.phases.reused, compiled.phases.reused) == ([], ["baseline"], ["baseline"])
    assert {"run", "oracle", "compare"} <= set(eager.phases.seconds) and "baseline" not in eager.phases.seconds


def test_an_eager_run_is_not_reused_for_another_workload():
    target = ScriptedTarget(can_force_tokens=True, parts=set())
    judge = Judge(target)
    for workload in ("mixed", "batch8"):
        judge.run(Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="graph"), workload=workload))
    assert [(mode, len(requests)) for mode, requests in target.runs] == [("eager", 8), ("graph", 8)] * 2
