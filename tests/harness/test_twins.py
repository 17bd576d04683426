"""Same-kernel twins: a graph mode named with its twin (`--modes compile,compile_nograph`) is judged against the twin
as tightly as graph against eager, after the twin is judged against eager across kernels; the twin's run is made once
and serves as that baseline. Without the twin named, or against another target, nothing changes."""
import pytest

from harness.inputs.scenarios import Scenario, default_matrix
from harness.judge import Judge, kernel_pair
from harness.targets.base import Target, TargetRun, TargetUnavailable
from harness.targets.reference import ReferenceTarget
from reference_runner.engine.args import EngineArgs
from reference_runner.records import Generation, Request

TWINS = {"compile": "compile_nograph"}


def pairs(scenarios: list[Scenario]) -> list[tuple[str, str]]:
    return [(s.mode, s.baseline) for s in scenarios]


def test_a_mode_named_with_its_twin_is_judged_against_it_after_the_twin_against_eager():
    scenarios = default_matrix(["llama"], ["eager", "compile", "compile_nograph"], EngineArgs(), twins=TWINS)
    assert pairs(scenarios) == [("eager", "oracle"), ("compile_nograph", "eager"), ("compile", "compile_nograph")]


def test_a_mode_whose_twin_is_not_named_is_judged_against_eager():
    scenarios = default_matrix(["llama"], ["eager", "compile"], EngineArgs(), twins=TWINS)
    assert pairs(scenarios) == [("eager", "oracle"), ("compile", "eager")]


def test_against_another_target_every_mode_is_judged_against_its_eager_run():
    scenarios = default_matrix(["llama"], ["compile", "compile_nograph"], EngineArgs(), ["vllm"], twins=TWINS)
    assert pairs(scenarios) == [("compile", "vllm"), ("compile_nograph", "vllm")]


@pytest.mark.parametrize(("mode", "baseline", "tp_size", "pair"), [
    ("graph", "eager", 1, "same_kernels"),
    ("compile", "compile_nograph", 1, "same_kernels"),
    ("compile", "eager", 1, "across_kernels"),
    ("compile_nograph", "eager", 1, "across_kernels"),
    ("tree", "eager", 1, "across_kernels"),
    ("compile", "compile_nograph", 2, "across_kernels"),  # two ranks' reduction order against one
    ("compile", "vllm", 1, "across_kernels"),
])
def test_the_kernel_pair_of_each_mode_and_baseline(mode, baseline, tp_size, pair):
    assert kernel_pair(Scenario("llama", baseline, EngineArgs(mode=mode, tp_size=tp_size))) == pair


def test_the_twin_baseline_runs_the_twin_mode_on_one_rank():
    scenario = Scenario("llama", "compile_nograph", EngineArgs(mode="compile", tp_size=2, dtype="bfloat16"))
    assert scenario.baseline_engine() == EngineArgs(mode="compile_nograph", dtype="bfloat16")


class CountingTarget(Target):
    """Every mode generates token 5 with the same distribution; records which modes ran."""

    name = "counting"
    device = "cpu"
    forcing = "in_loop"

    def __init__(self) -> None:
        self.modes: list[str] = []

    def twins(self, engine: EngineArgs) -> dict[str, str]:
        return TWINS

    def run(self, scenario: Scenario, checkpoint, requests: list[Request]) -> TargetRun:
        self.modes.append(scenario.mode)
        generations = []
        for request in requests:
            generation = Generation(request.rid)
            for _ in range(request.max_new_tokens):
                generation.append(5, [(5, -0.1), (6, -2.5)], in_graph=scenario.mode in ("graph", "compile"))
            generations.append(generation)
        return TargetRun(generations, graph_steps=int(scenario.mode == "compile"))


def test_the_twins_run_is_made_once_and_is_the_baseline_of_the_mode_judged_against_it():
    target = CountingTarget()
    judge = Judge(target)
    twin, compile_ = [judge.run(s) for s in default_matrix(["llama"], ["compile", "compile_nograph"], EngineArgs(),
                                                            twins=TWINS)]
    assert target.modes == ["eager", "compile_nograph", "compile"]
    assert (twin.passed, compile_.passed) == (True, True)
    assert compile_.phases.reused == ["baseline"]
    assert compile_.coverage == 1.0


def test_a_mode_judged_against_a_twin_its_target_does_not_run_is_refused_as_a_setup_problem():
    scenario = Scenario("llama", "compile_nograph", EngineArgs(mode="compile", prefill_graphs=True))
    with pytest.raises(TargetUnavailable, match="runs no compile_nograph twin of mode compile with these options"):
        Judge(ReferenceTarget("cpu")).run(scenario)


@pytest.mark.parametrize(("engine", "twins"), [
    (EngineArgs(), {"compile": "compile_nograph"}),
    # Compile mode would compile prefill graphs too; the twin compiles decode steps only.
    (EngineArgs(prefill_graphs=True), {}),
])
def test_the_reference_target_on_the_cpu_runs_compiles_twin_but_not_with_prefill_graphs(engine, twins):
    assert ReferenceTarget("cpu").twins(engine) == twins
