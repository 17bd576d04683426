"""Engines judged against each other (`check --against TARGETS`): another target's eager run, made once, is the
baseline of every mode, on the same checkpoint and token ids, with the tolerance for different kernels. The records
of the judge's tests come from scripted targets written by hand; the command line's from the reference runner."""
import json

import pytest

import harness.targets
from harness.cli import main
from harness.exits import EXIT_PASS, EXIT_USAGE
from harness.inputs.scenarios import Scenario, default_matrix
from harness.judge import Judge
from harness.targets.base import Target, TargetRun
from harness.targets.reference import ENGINE_VERSION, ReferenceTarget
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

TOP = [(5, -0.1), (6, -3.0)]  # token 5, by a margin far above any tie margin


class ScriptedEngine(Target):
    """Always chooses token 5 with logprobs TOP, except where `chooses` says (rid, step) -> top-k."""

    device = "cpu"
    forcing = "continuation"

    def __init__(self, name: str, chooses: dict[tuple[str, int], list[tuple[int, float]]] | None = None) -> None:
        self.name = name
        self.chooses = chooses or {}
        self.runs: list[tuple[str, int]] = []  # mode, ranks

    def run(self, scenario: Scenario, checkpoint, requests: list[Request]) -> TargetRun:
        self.runs.append((scenario.mode, scenario.engine.world_size))
        return TargetRun([self.generation(r) for r in requests], counts_graph_steps=False,
                         engine_version=f"{self.name} 1.0")

    def generation(self, request: Request) -> Generation:
        generation = Generation(request.rid)
        for step in range(request.max_new_tokens):
            top = self.chooses.get((request.rid, step), TOP)
            generation.append(top[0][0], top, in_graph=False)
        return generation


def judged(*against: ScriptedEngine, modes: tuple[str, ...] = ("eager",)) -> tuple[ScriptedEngine, list]:
    test = ScriptedEngine("test")
    judge = Judge(test, against=against)
    return test, [judge.run(s) for s in default_matrix(["llama"], list(modes), EngineArgs(), [t.name for t in against])]


def test_every_mode_is_judged_against_each_target_and_named_after_it():
    scenarios = default_matrix(["llama"], ["eager", "graph"], EngineArgs(tp_size=2), ["vllm", "reference"])
    assert [(s.baseline, s.name) for s in scenarios] == [
        ("vllm", "llama-eager-tp2-vs-vllm-mixed"), ("vllm", "llama-graph-tp2-vs-vllm-mixed"),
        ("reference", "llama-eager-tp2-vs-reference-mixed"), ("reference", "llama-graph-tp2-vs-reference-mixed")]


def test_the_other_targets_eager_run_on_one_rank_is_made_once_and_is_every_modes_baseline():
    other = ScriptedEngine("other")
    test, results = judged(other, modes=("eager", "compile"))
    assert other.runs == [("eager", 1)]
    assert test.runs == [("eager", 1), ("compile", 1)]
    assert [r.phases.reused for r in results] == [[], ["baseline"]]
    assert [(r.passed, r.coverage) for r in results] == [(True, 1.0), (True, 1.0)]
    assert {k: results[0].as_dict()[k] for k in ("baseline", "engine_version", "baseline_engine_version")} == {
        "baseline": "other", "engine_version": "test 1.0", "baseline_engine_version": "other 1.0"}


def test_a_token_one_other_target_chooses_differently_fails_its_scenario_naming_request_and_step():
    test, (agreeing, differing) = judged(ScriptedEngine("same"), ScriptedEngine("other", {("r1", 3): [(7, -0.1), (5, -3.0)]}))
    assert test.runs == [("eager", 1)]  # the target's own run, once for both
    assert (agreeing.passed, differing.passed) == (True, False)
    divergence = differing.first_divergence
    assert (divergence.rid, divergence.step, divergence.status) == ("r1", 3, "mismatch")


@pytest.mark.parametrize(("drift", "passed"), [(5e-4, True), (5e-3, False)])
def test_logprobs_may_drift_as_far_as_different_kernels_do(drift, passed):
    # float32 on the CPU: 1e-4 between the same kernels, 1e-3 between different ones (verdicts/tolerances.py).
    drifted = [(5, -0.1 + drift), (6, -3.0)]
    _, (result,) = judged(ScriptedEngine("other", {("r0", 2): drifted}))
    assert result.passed is passed


@pytest.mark.parametrize(("argv", "message"), [
    (["--against", "reference"], "error: --against reference: the target under test itself; name other targets to "
                                 "judge it against (without --against, its modes are judged against its own eager run)"),
    (["--against", "vllm,nope"], "error: --against nope: unknown target 'nope'; choose one of reference, sglang, vllm (or "
                                 "register one under the entry-point group npugraph_harness.targets)"),
    (["--target", "sglang", "--against", "vllm,vllm"], "error: --against lists 'vllm' twice"),
])
def test_a_bad_against_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["check", "--model", "llama", *argv]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [f"npugraph-harness: {message}"]


class Twin(ReferenceTarget):
    """The reference runner under another name: an engine that computes exactly what the reference does."""

    name = "twin"


def test_check_against_another_target_passes_and_reports_it(monkeypatch, tmp_path, capsys, device):
    monkeypatch.setitem(harness.targets.TARGETS, "twin", f"{__name__}:Twin")
    report = tmp_path / "check.json"
    argv = ["check", "--model", "llama", "--modes", "eager,graph", "--against", "twin", "--device", device,
            "--max-new-tokens", "8", "--json", str(report)]
    assert main(argv) == EXIT_PASS
    scenarios = json.loads(report.read_text())["scenarios"]
    assert [(s["name"], s["baseline_engine_version"], s["passed"]) for s in scenarios] == [
        ("llama-eager-vs-twin-mixed", ENGINE_VERSION, True), ("llama-graph-vs-twin-mixed", ENGINE_VERSION, True)]
    assert "llama-graph-vs-twin-mixed" in capsys.readouterr().out
