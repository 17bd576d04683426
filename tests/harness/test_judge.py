"""The judge past near-ties: a target that forces in its loop is run once more, every request of the scenario in one run
with those that stopped forced from there; one that is continued has both sides submitted again, with the baseline's
tokens before each stop appended to the prompt, round after round to the last step. Every target is held to the same
minimum coverage, reported with every verdict. The records come from a scripted target, written by hand like
test_compare's."""
import pytest

from harness.inputs.scenarios import Scenario
from harness.judge import Judge
from harness.targets.base import MIN_COVERAGE, Target, TargetRun
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

TIE = [(5, -0.7), (6, -0.7)]  # an exact tie for first place: a near-tie at every tolerance but the exact one
TIED = [(6, -0.7), (5, -0.7)]
PARTS_EVERY = 10  # the compiled run of a parting request chooses 6 at every 10th position of its sequence
COMPILED = Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="compile"))
GENERATED = 217  # tokens of the `mixed` workload at max_new_tokens 32
ALL = {f"r{i}" for i in range(8)}


class ScriptedTarget(Target):
    """Its eager run always chooses token 5. Its compiled run chooses 6 at every PARTS_EVERY-th position of a sequence
    in the requests of `parts` (a near-tie: the two are tied for first place), and feeds its choice on; a forced run
    feeds the tokens it is given and still reports its own top-k."""

    name = "scripted"
    device = "cpu"

    def __init__(self, forcing: str, parts: set[str], short: str | None = None) -> None:
        self.forcing = forcing
        self.parts = parts
        self.short = short  # a request answered with one token too few
        self.runs: list[tuple[str, list[Request]]] = []

    def run(self, scenario: Scenario, checkpoint, requests: list[Request]) -> TargetRun:
        self.runs.append((scenario.mode, requests))
        return TargetRun([self.generation(scenario.mode, r) for r in requests], graph_steps=int(scenario.mode != "eager"))

    def generation(self, mode: str, request: Request) -> Generation:
        generation = Generation(request.rid, forced_from=request.forced_from)
        for step in range(request.max_new_tokens - (request.rid == self.short)):
            position = len(request.prompt_ids) + step
            parts = mode == "compile" and request.rid in self.parts and position % PARTS_EVERY == 0
            own_choice = 6 if parts else 5
            forced = request.forced_from is not None and step >= request.forced_from
            token = request.forced_ids[step - request.forced_from] if forced else own_choice
            generation.append(token, TIED if own_choice == 6 else TIE, in_graph=mode != "eager")
        return generation


def test_a_target_that_forces_in_its_loop_is_run_once_more_with_the_stopped_requests_forced_past_their_tie():
    target = ScriptedTarget("in_loop", parts={"r0", "r2", "r5"})
    result = Judge(target).run(COMPILED)
    assert [mode for mode, _ in target.runs] == ["eager", "compile", "compile"]
    (_, first), (_, again) = target.runs[1:]
    assert [r.rid for r in again] == [r.rid for r in first]  # every request: the schedule of the first run
    stopped = {r.rid: r.forced_from for r in again if r.forced_from is not None}
    assert set(stopped) == {"r0", "r2", "r5"}
    assert all(r.forced_ids == [5] * (r.max_new_tokens - r.forced_from) for r in again if r.rid in stopped)
    assert result.failures == []
    assert [(v.rid, v.status, v.compared == v.generated, v.continued_by) for v in result.verdicts] == [
        (f"r{i}", "tie", True, ["in_loop"]) if i in (0, 2, 5) else (f"r{i}", "match", True, []) for i in range(8)]
    assert (result.coverage, result.forced_requests) == (1.0, 3)


def test_a_continued_target_has_both_sides_submitted_again_from_the_baseline_tokens_to_the_last_step():
    target = ScriptedTarget("continuation", parts=ALL)
    result = Judge(target).run(COMPILED)
    assert (result.failures, result.coverage, result.forced_requests) == ([], 1.0, 8)
    assert {v.status for v in result.verdicts} == {"tie"}
    (_, first), *rounds = target.runs[1:]
    # Each round continues both sides (compiled first, then eager), with the same requests.
    assert [mode for mode, _ in rounds] == ["compile", "eager"] * (len(rounds) // 2)
    prompts = {r.rid: r.prompt_ids for r in first}
    for (_, tests), (_, baselines) in zip(rounds[::2], rounds[1::2]):
        assert tests == baselines
        for r in tests:  # the prompt, then the baseline's own tokens (5) up to the stop, then the rest to decode
            start = len(r.prompt_ids) - len(prompts[r.rid])
            assert r.prompt_ids == prompts[r.rid] + [5] * start
            assert r.max_new_tokens == next(q.max_new_tokens for q in first if q.rid == r.rid) - start
    assert {tuple(v.continued_by) for v in result.verdicts} <= {("continuation",) * n for n in range(1, 5)}


@pytest.mark.parametrize("forcing", ["in_loop", "continuation"])
def test_every_target_is_held_to_the_same_minimum_coverage(forcing):
    assert Judge(ScriptedTarget(forcing, parts=set())).min_coverage == MIN_COVERAGE == 0.9


def test_the_report_says_how_much_was_compared_and_counts_every_near_tie():
    result = Judge(ScriptedTarget("in_loop", parts={"r1"})).run(COMPILED)
    report = result.as_dict()
    # r1 prefers 6 at every 10th position also where it is fed 5: each is a near-tie, none stopped at but the first.
    ties = sum(v.ties for v in result.verdicts)
    assert ties >= 2
    assert {k: report[k] for k in ("coverage", "tokens_compared", "tokens_generated", "near_ties", "router_near_ties",
                                   "forced_requests")} == {
        "coverage": 1.0, "tokens_compared": GENERATED, "tokens_generated": GENERATED, "near_ties": ties,
        "router_near_ties": 0, "forced_requests": 1}
    assert [r["continued_by"] for r in report["requests"] if r["rid"] == "r1"] == [["in_loop"]]


def test_against_the_oracle_a_generation_shorter_than_asked_for_is_a_mismatch():
    # The oracle scores the target's own tokens, so it cannot see a missing one: the request's count does.
    target = ScriptedTarget("in_loop", parts=set(), short="r3")
    result = Judge(target).run(Scenario(model="llama", baseline="oracle", engine=EngineArgs(mode="eager")))
    r3 = next(v for v in result.verdicts if v.rid == "r3")
    assert (r3.status, r3.reason) == ("mismatch", "test produced 18 tokens, the request asks for 19")


def test_the_eager_run_is_made_once_and_serves_the_eager_scenario_and_every_baseline():
    target = ScriptedTarget("in_loop", parts=set())
    judge = Judge(target)
    eager = judge.run(Scenario(model="llama", baseline="oracle", engine=EngineArgs(mode="eager")))
    graph, compiled = (judge.run(Scenario(model="llama", baseline="eager", engine=EngineArgs(mode=mode)))
                       for mode in ("graph", "compile"))
    assert [mode for mode, _ in target.runs] == ["eager", "graph", "compile"]
    assert (eager.phases.reused, graph.phases.reused, compiled.phases.reused) == ([], ["baseline"], ["baseline"])
    assert {"run", "oracle", "compare"} <= set(eager.phases.seconds) and "baseline" not in eager.phases.seconds


def test_an_eager_run_is_not_reused_for_another_workload():
    target = ScriptedTarget("in_loop", parts=set())
    judge = Judge(target)
    for workload in ("mixed", "batch8"):
        judge.run(Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="graph"), workload=workload))
    assert [(mode, len(requests)) for mode, requests in target.runs] == [("eager", 8), ("graph", 8)] * 2


def test_an_engine_that_raises_in_a_continuation_fails_the_scenario_naming_it():
    class Crashes(ScriptedTarget):
        def run(self, scenario, checkpoint, requests):
            if len(self.runs) == 2:
                raise RuntimeError("injected")
            return super().run(scenario, checkpoint, requests)

    result = Judge(Crashes("continuation", parts=ALL)).run(COMPILED)
    assert result.failures == ["the engine under test (scripted) raised RuntimeError: injected"]


def test_router_near_ties_are_searched_once_along_each_baseline_however_many_rounds_continue(monkeypatch):
    # A MoE test that does not report its routing: the judge searches the baseline's tokens for router near-ties, each
    # search a transformers forward; a round of continuations replaces the baselines of the requests it continues only.
    searched: list[list[int]] = []

    def router_gaps(checkpoint, sequences):
        searched.extend(sequences)
        return [[10.0] * len(s) for s in sequences]  # no router near the tie

    monkeypatch.setattr("harness.judge.routing.router_gaps", router_gaps)
    target = ScriptedTarget("continuation", parts={"r0", "r2", "r5"})
    result = Judge(target).run(Scenario(model="qwen2_moe", baseline="eager", engine=EngineArgs(mode="compile")))
    continued = sum(len(requests) for mode, requests in target.runs[2:] if mode == "compile")
    assert continued > 3  # more than one round
    assert len(searched) == len(ALL) + continued
    assert result.coverage == 1.0
