"""Run scenarios on a target and judge each one: token verdicts, how much they compared, and the graph-mode
sanity rules.

Past a near-tie the free-running test no longer sees the baseline's inputs: the steps from there are recomputed
from the baseline's inputs, forced in the target's loop or continued on both sides (`forcing.py`), and the
comparison goes on to every request's last step (`verdicts/compare.py`).

The target's eager run on one rank is made once per model, workload, length, seed and engine options, and
serves both as the `eager` scenario's run and as the baseline of every other mode. With another target to judge
against (`--against`), that target's eager run, made once likewise, is the baseline of the scenarios named after it.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from harness.forcing import Sides, next_segments
from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.scenarios import TWINS, Scenario
from harness.inputs.workloads import make_requests
from harness.targets.base import MIN_COVERAGE, Target, TargetRun, TargetUnavailable
from harness.verdicts import routing
from harness.verdicts.compare import Segment, Verdict, compare_generations, coverage, length_problems, summarize
from harness.verdicts.drift import NOTHING_COMPARED, DriftStats
from harness.verdicts.drift_baseline import DriftBaseline, this_machine
from harness.verdicts.noise import judge_drift, noise_profile, profile_key
from harness.verdicts.routing import RoutingTie, first_routing_tie
from harness.verdicts.tolerances import KernelPair, Tolerance
from reference_runner.device import DeviceUnavailable
from reference_runner.engine.args import GRAPH_MODES, EngineArgs
from reference_runner.errors import (
    CheckpointError,
    LayoutError,
    ModeUnsupported,
    TaskGroupMismatch,
    UnsupportedModel,
)
from reference_runner.models.loader import read_config
from reference_runner.records import Generation, Request

# Problems of the setup, not of the engine under test: the check stops with exit status 2.
SETUP_ERRORS = (CheckpointError, UnsupportedModel, DeviceUnavailable, TargetUnavailable, LayoutError, TaskGroupMismatch,
                ModeUnsupported)


@dataclass
class Phases:
    """Where a scenario's time went, in seconds per phase (`PHASES`), and which phases reused an earlier run."""

    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict:
        return {"phase_seconds": {p: round(self.seconds[p], 2) for p in PHASES if p in self.seconds}, "reused": self.reused}


# The TargetRun fields a scenario's JSON keeps: all but the records and the capture time (a phase).
RUN_STATS = ("engine_version", "graph_steps", "counts_graph_steps", "eager_steps", "prefill_graph_steps",
             "prefill_eager_steps", "fallback_reasons", "graph_memory")

# In the order they run: the eager baseline, the capture (or compile) of the target's graphs, the target's
# run without it, transformers scoring the run, the forced re-run past near-ties, and the comparison.
PHASES = ("baseline", "capture", "run", "oracle", "forced_rerun", "compare")


NOT_JUDGED = "not judged: the scenario ended early"


@dataclass
class ScenarioResult:
    """The verdicts of one scenario and why it failed, if it did."""

    scenario: Scenario
    verdicts: list[Verdict]
    run: TargetRun
    seconds: float
    failures: list[str] = field(default_factory=list)
    forced_requests: int = 0  # requests compared past a near-tie (forced in the loop, or continued)
    phases: Phases = field(default_factory=Phases)
    baseline_version: str = ""  # the engine whose eager run was the baseline; "" for transformers
    drift: DriftStats = NOTHING_COMPARED  # over the compared steps of every request
    drift_judged: str = NOT_JUDGED  # against what the drift was judged, or why it was not

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def coverage(self) -> float:
        """The share of generated tokens whose distributions were compared, 0..1."""
        compared, generated = coverage(self.verdicts)
        return compared / generated if generated else 0.0

    @property
    def first_divergence(self) -> Verdict | None:
        diverged = [v for v in self.verdicts if v.step is not None]
        return min(diverged, key=lambda v: v.step) if diverged else None

    def as_dict(self) -> dict:
        first = self.first_divergence
        compared, generated = coverage(self.verdicts)
        return {
            **self.scenario.as_dict(),
            "engine_version": self.run.engine_version,
            "baseline_engine_version": self.baseline_version,
            "passed": self.passed,
            "failures": self.failures,
            "verdicts": summarize(self.verdicts),
            "coverage": round(self.coverage, 4),
            "tokens_compared": compared,
            "tokens_generated": generated,
            "near_ties": sum(v.ties for v in self.verdicts),
            "router_near_ties": sum(v.router_ties for v in self.verdicts),
            "forced_requests": self.forced_requests,
            "drift": self.drift.as_dict(),
            "drift_judged": self.drift_judged,
            **{stat: getattr(self.run, stat) for stat in RUN_STATS if stat != "engine_version"},
            "first_divergence": None if first is None else first.as_dict() | {"passed": first.passed},
            "seconds": round(self.seconds, 2),
            **self.phases.as_dict(),
            "requests": [v.as_dict() for v in self.verdicts],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ScenarioResult:
        """The inverse of `as_dict` (after a JSON round trip), the run's records aside: a finished scenario read
        back from a check's JSON (`check --resume`)."""
        run = TargetRun([], **{f: d[f] for f in RUN_STATS})
        return cls(Scenario.from_dict(d), [Verdict(**v) for v in d["requests"]], run, d["seconds"], d["failures"],
                   d["forced_requests"], Phases(dict(d["phase_seconds"]), list(d["reused"])),
                   d["baseline_engine_version"], DriftStats.from_dict(d["drift"]), d["drift_judged"])

    @classmethod
    def raised(cls, scenario: Scenario, error: Exception, seconds: float) -> ScenarioResult:
        """A scenario that the harness itself could not finish: failed, naming the error."""
        return cls(scenario, [], TargetRun([]), seconds, [f"internal error: {type(error).__name__}: {error}"])


def scenario_failures(scenario: Scenario, verdicts: list[Verdict], run: TargetRun, min_coverage: float) -> list[str]:
    """Failed verdicts; else too little compared (below `min_coverage` of the generated tokens); and a
    graph scenario in which no step replayed a graph (silent fallback), where the target counts graph steps;
    with prefill graphs on, likewise for prefill."""
    failures = [f"{v.rid}: {v.reason}" for v in verdicts if not v.passed]
    compared, generated = coverage(verdicts)
    if not verdicts:
        failures.append("no request was judged: a scenario that compared nothing cannot pass")
    elif not generated or (not failures and compared < min_coverage * generated):
        failures.append(f"too little compared: {compared} of {generated} generated tokens "
                        f"({compared / max(generated, 1):.0%}), below the minimum coverage {min_coverage:.0%} "
                        "(--min-coverage)")
    if scenario.mode in GRAPH_MODES and run.counts_graph_steps and run.graph_steps == 0:
        failures.append(f"no decode step replayed a graph in mode {scenario.mode!r} (silent eager fallback)")
    if (scenario.mode in GRAPH_MODES and scenario.engine.prefill_graphs and run.counts_graph_steps
            and run.prefill_graph_steps == 0):
        failures.append(f"no prefill replayed a graph in mode {scenario.mode!r} with prefill graphs on (silent eager "
                        "fallback)")
    return failures


# The modes whose decode steps run a compiler's kernels (inductor's, torchair's): against eager, other kernels.
COMPILED_MODES = ("compile", "tree", "compile_nograph")


def kernel_pair(scenario: Scenario) -> KernelPair:
    """Whether the scenario's two sides run other kernels: transformers', another target's, a compiler's on one side
    only (modes compile and tree against eager, the twin against eager), or the other reduction order of several
    ranks. A graph mode against its twin runs the same kernels."""
    engine = scenario.engine
    same_target = scenario.baseline == "eager" or scenario.baseline in TWINS.values()
    compiled = (engine.mode in COMPILED_MODES) != (scenario.baseline_engine().mode in COMPILED_MODES)
    across = not same_target or compiled or engine.world_size > 1
    return "across_kernels" if across else "same_kernels"


@dataclass
class _Case:
    """One scenario as the judge works through it."""

    scenario: Scenario
    checkpoint: Path
    requests: list[Request]
    pair: KernelPair
    tolerance: Tolerance
    phases: Phases = field(default_factory=Phases)
    started: float = field(default_factory=time.perf_counter)
    baseline_version: str = ""  # the engine whose eager run is the baseline; "" for transformers

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.scenario.engine.dtype)

    def result(self, verdicts: list[Verdict], run: TargetRun, failures: list[str], forced: int = 0,
               drift: DriftStats = NOTHING_COMPARED, drift_judged: str = NOT_JUDGED) -> ScenarioResult:
        return ScenarioResult(self.scenario, verdicts, run, time.perf_counter() - self.started, failures, forced,
                              self.phases, self.baseline_version, drift, drift_judged)


class EngineFailed(Exception):
    """An engine of the scenario (the one under test, or the baseline's) raised: the scenario fails saying so."""


class Judge:
    """Runs scenarios on one target, reusing the eager run that several scenarios share. `close` ends the engines the
    targets keep between runs."""

    def __init__(self, target: Target, progress: Callable[[str], None] = lambda line: None,
                 min_coverage: float | None = None, against: Sequence[Target] = (),
                 drift_baseline: DriftBaseline | None = None) -> None:
        self.target = target
        self.against = {t.name: t for t in against}  # targets whose eager runs are baselines, by name (`--against`)
        self.progress = progress
        self.min_coverage = MIN_COVERAGE if min_coverage is None else min_coverage
        self.drift_baseline = drift_baseline
        self._shared_runs: dict[tuple, TargetRun] = {}  # eager and twin runs on one rank, each made once

    def run(self, scenario: Scenario) -> ScenarioResult:
        """Judge `scenario`: the baseline, the run under test, transformers' score where it is the baseline, the
        comparison carried past near-ties, and the drift over every compared step."""
        case = self.prepare(scenario)
        try:
            baseline = self.baseline(case)
            run = self.run_test(case)
            baseline = baseline or self.score(case, run.generations)
            verdicts, forced = self.compare_past_near_ties(case, baseline, run)
        except EngineFailed as failure:
            return case.result([], TargetRun([]), [str(failure)])
        verdicts = [length_problems(case.requests, run.generations).get(v.rid, v) for v in verdicts]
        drift, drift_judged, drift_failures = self.judge_drift(case, verdicts)
        return case.result(verdicts, run, scenario_failures(scenario, verdicts, run, self.min_coverage) + drift_failures,
                           forced, drift, drift_judged)

    def prepare(self, scenario: Scenario) -> _Case:
        """The scenario's checkpoint, requests and tolerance."""
        checkpoint = ensure_checkpoint(scenario.model)
        self.target.validate(scenario, checkpoint)
        requests = make_requests(scenario.workload, read_config(checkpoint).vocab_size, scenario.max_new_tokens,
                                 scenario.seed)
        # Other kernels: float noise, bounded per dtype.
        pair = kernel_pair(scenario)
        return _Case(scenario, checkpoint, requests, pair, Tolerance.for_pair(
            getattr(torch, scenario.engine.dtype), self.target.device, pair == "across_kernels"))

    def baseline(self, case: _Case) -> list[Generation] | None:
        """The baseline target's eager (or twin) run, made once and shared by scenarios; None where transformers is the
        baseline."""
        target = self.baseline_target(case.scenario)
        if target is None:
            return None
        run = self.shared_run(case, "baseline", target, case.scenario.baseline_engine())
        case.baseline_version = run.engine_version
        return run.generations

    def run_test(self, case: _Case) -> TargetRun:
        """The run under test (the shared run where the scenario is eager, or a twin mode, on one rank)."""
        scenario = case.scenario
        self.progress(f"{scenario.name}: running {scenario.mode} on {self.target.name}")
        if (scenario.engine == scenario.baseline_engine() and not scenario.dp_ranks) or _one_rank_twin(scenario):
            return self.shared_run(case, "run", self.target, scenario.engine)
        return self._timed_run(case, self.target, scenario, case.requests, "run")

    def score(self, case: _Case, generations: list[Generation]) -> list[Generation]:
        """Transformers' distributions along the test's own tokens."""
        from harness.inputs.oracle import oracle_score  # transformers: only a scenario judged against it imports it

        self.progress(f"{case.scenario.name}: scoring its tokens with transformers")
        with case.phases.timing("oracle"):
            return oracle_score(case.checkpoint, case.requests, generations, top_k=case.scenario.engine.top_k,
                                dtype=case.dtype)

    def compare_past_near_ties(self, case: _Case, baseline: list[Generation],
                               run: TargetRun) -> tuple[list[Verdict], int]:
        """The verdicts, the comparison carried past every near-tie by segments recomputed from the baseline's inputs
        (`forcing.py`), in rounds until none stops where it can go on; and how many requests that took."""
        segments: dict[str, list[Segment]] = {}
        sides = Sides(case.requests, lambda requests: self.rerun_test(case, requests, forced=True),
                      lambda requests: self.rerun_test(case, requests, forced=False),
                      lambda requests, tests: self.continue_baseline(case, requests, tests))
        ties: dict[str, RoutingTie] = {}
        searched: dict[str, Generation] = {}  # per rid, the baseline its router near-tie was searched along
        for _ in range(case.scenario.max_new_tokens + 1):  # each round carries a stopped request a step further at least
            baseline_now = _reached(baseline, segments, "baseline")
            test_now = _reached(run.generations, segments, "test")
            # Only a baseline a continuation replaced is searched again: each search loads transformers' model.
            fresh = [g for g in baseline_now.values() if searched.get(g.rid) is not g]
            with case.phases.timing("compare"):
                ties = {**{rid: tie for rid, tie in ties.items() if searched[rid] is baseline_now[rid]},
                        **self.routing_ties(case, fresh, run.generations)}
                searched.update((g.rid, g) for g in fresh)
                verdicts = compare_generations(baseline, run.generations, case.tolerance, segments=segments,
                                               routing_ties=ties)
            stops = [v for v in verdicts if v.resume_from is not None]
            if not stops:
                break
            self.progress(f"{case.scenario.name}: {len(stops)} request(s) stopped at a near-tie: compared past it "
                          f"({self.target.forcing.replace('_', ' ')})")
            new = next_segments(self.target.forcing, stops, baseline_now, test_now, segments, sides)
            if not new:
                break
            for segment in new:
                segments.setdefault(segment.baseline.rid, []).append(segment)
        return verdicts, len(segments)

    def judge_drift(self, case: _Case, verdicts: list[Verdict]) -> tuple[DriftStats, str, list[str]]:
        """The drift statistics over every compared step, judged as a distribution against the noise profile of correct
        runs on the same target, device, dtype and kernel pair, and against the figure stored for the scenario
        (--drift-baseline): the statistics, how they were judged, and the failures."""
        drift = DriftStats.of([step for v in verdicts for step in v.drift])
        key = (self.target.name, self.target.device, case.scenario.engine.dtype, case.pair)
        judged, failures = judge_drift(drift, noise_profile(*key), where=profile_key(*key))
        if self.drift_baseline is not None:
            against, grew = self.drift_baseline.judge(case.scenario, self.target.device, self.target.name,
                                                      this_machine(self.target.device), drift)
            judged, failures = f"{judged}; {against}", failures + grew
        return drift, judged, failures

    def rerun_test(self, case: _Case, requests: list[Request], forced: bool) -> list[Generation]:
        """The test run again: every request, some `forced` in its loop (the scenario's schedule), or continuations
        (their DP ranks round robin)."""
        scenario = case.scenario if forced else replace(case.scenario, dp_ranks=None)
        return self._timed_run(case, self.target, scenario, requests, "forced_rerun").generations

    def continue_baseline(self, case: _Case, requests: list[Request], tests: list[Generation]) -> list[Generation]:
        """The baseline's continuations of `requests`: its target run on them, or transformers scoring the test's."""
        target = self.baseline_target(case.scenario)
        if target is None:
            from harness.inputs.oracle import oracle_score

            with case.phases.timing("forced_rerun"):
                return oracle_score(case.checkpoint, requests, tests, top_k=case.scenario.engine.top_k, dtype=case.dtype)
        baseline = replace(case.scenario, engine=case.scenario.baseline_engine(), dp_ranks=None)
        return self._timed_run(case, target, baseline, requests, "forced_rerun").generations

    def _timed_run(self, case: _Case, target: Target, scenario: Scenario, requests: list[Request],
                   phase: str) -> TargetRun:
        """`target`'s run of `requests`, timed as `phase`; EngineFailed if its engine raised."""
        try:
            with case.phases.timing(phase):
                run = target.run(scenario, case.checkpoint, requests)
        except SETUP_ERRORS:
            raise
        except Exception as error:
            role = "the engine under test" if target is self.target else "the baseline's engine"
            raise EngineFailed(f"{role} ({target.name}) raised {type(error).__name__}: {error}") from None
        _split_capture(case.phases, phase, run)
        return run

    def close(self) -> None:
        """End what the targets keep between runs (their engines' workers)."""
        for target in [self.target, *self.against.values()]:
            target.close()

    def baseline_target(self, scenario: Scenario) -> Target | None:
        """The target whose eager run is `scenario`'s baseline: this one, the one judged against, or none (the oracle)."""
        if scenario.baseline == "oracle":
            return None
        if scenario.baseline in TWINS.values() and self.target.twins(scenario.engine).get(scenario.mode) != scenario.baseline:
            raise TargetUnavailable(f"scenario {scenario.name}: the {self.target.name} target on {self.target.device} runs "
                                    f"no {scenario.baseline} twin of mode {scenario.mode} with these options, so it "
                                    "cannot be judged as the same kernels")
        if scenario.baseline == "eager" or scenario.baseline in TWINS.values():
            return self.target
        if scenario.baseline not in self.against:
            raise ValueError(f"scenario {scenario.name}: baseline {scenario.baseline!r} is no target judged against")
        return self.against[scenario.baseline]

    def shared_run(self, case: _Case, phase: str, target: Target, engine: EngineArgs) -> TargetRun:
        """`target`'s run of the case's requests with `engine` on one rank (eager, or a twin mode), made once and
        reused by later scenarios."""
        scenario = case.scenario
        shared = replace(scenario, engine=engine, dp_ranks=None)
        key = (target.name, str(case.checkpoint), scenario.workload, scenario.max_new_tokens, scenario.seed, engine)
        if key in self._shared_runs:
            case.phases.reused.append(phase)
            return self._shared_runs[key]
        if phase == "baseline":
            self.progress(f"{scenario.name}: baseline {engine.mode} on {target.name}")
        if target is not self.target:
            target.validate(shared, case.checkpoint)
        self._shared_runs[key] = self._timed_run(case, target, shared, case.requests, phase)
        return self._shared_runs[key]

    def routing_ties(self, case: _Case, baseline: list[Generation], test: list[Generation]) -> dict[str, RoutingTie]:
        """For a test that does not report its MoE routing, per rid the first router near-tie along the
        baseline's tokens, past which the two sides may route differently (none where the routing is
        reported and compared, or cannot differ)."""
        checkpoint, tolerance = case.checkpoint, case.tolerance
        if (not baseline or not tolerance.router_gap or not routing.has_experts(checkpoint)
                or any(g.routed_experts for g in test)):
            return {}
        if not routing.searchable(checkpoint):
            self.progress(f"{case.scenario.name}: router near-ties not searched (checkpoint above "
                          f"{routing.MAX_CHECKPOINT_BYTES >> 30} GiB): MoE verdicts across kernels may flag them")
            return {}
        by_rid = {g.rid: g for g in baseline if g.error is None}
        judged = [r for r in case.requests if r.rid in by_rid]
        sequences = [r.prompt_ids + by_rid[r.rid].output_ids[:-1] for r in judged]
        ties = {r.rid: first_routing_tie(gaps, len(r.prompt_ids), tolerance.router_gap)
                for r, gaps in zip(judged, routing.router_gaps(checkpoint, sequences))}
        return {rid: tie for rid, tie in ties.items() if tie is not None}


def _one_rank_twin(scenario: Scenario) -> bool:
    """A twin mode on one rank: its run is the baseline of the graph mode judged against it."""
    return scenario.mode in TWINS.values() and scenario.engine.world_size == 1 and not scenario.dp_ranks


def _reached(generations: list[Generation], segments: dict[str, list[Segment]], side: str) -> dict[str, Generation]:
    """Per rid, the generation of `side` ("baseline" or "test") its comparison stands on: its last segment's, else
    its own."""
    return {g.rid: getattr(segments[g.rid][-1], side) if g.rid in segments else g for g in generations}


def _split_capture(phases: Phases, phase: str, run: TargetRun) -> None:
    """Move the time the target reports for capturing (or compiling) its graphs out of `phase` into "capture"."""
    if run.capture_seconds:
        phases.seconds[phase] -= run.capture_seconds
        phases.seconds["capture"] = phases.seconds.get("capture", 0.0) + run.capture_seconds
