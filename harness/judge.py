"""Run scenarios on a target and judge each one: token verdicts, how much they compared, and the graph-mode
sanity rules.

Past a near-tie the free-running test no longer sees the baseline's inputs. A target that can force
tokens is then run once more, every request of the scenario in one run (so the schedule is the same),
those that stopped at a near-tie fed the baseline's tokens from there on and, on MoE models, computing
with the baseline's experts: the comparison continues to their last step (`verdicts/compare.py`).

The target's eager run on one rank is made once per model, workload, length, seed and engine options, and
serves both as the `eager` scenario's run and as the baseline of every other mode.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.oracle import oracle_score
from harness.inputs.scenarios import Scenario
from harness.inputs.workloads import make_requests
from harness.targets.base import Target, TargetRun, TargetUnavailable, default_min_coverage
from harness.verdicts import routing
from harness.verdicts.compare import Verdict, compare_generations, coverage, length_problems, summarize
from harness.verdicts.drift import NOTHING_COMPARED, DriftStats
from harness.verdicts.drift_baseline import DriftBaseline, this_machine
from harness.verdicts.noise import judge_drift, noise_profile, profile_key
from harness.verdicts.routing import RoutingTie, first_routing_tie
from harness.verdicts.tolerances import KernelPair, Tolerance
from reference_runner.device import DeviceUnavailable
from reference_runner.errors import (
    CheckpointError,
    GraphTreesUnsupported,
    LayoutError,
    TaskGroupMismatch,
    UnsupportedModel,
)
from reference_runner.models.loader import read_config
from reference_runner.records import Generation, Request

# Problems of the setup, not of the engine under test: the check stops with exit status 2.
SETUP_ERRORS = (CheckpointError, UnsupportedModel, DeviceUnavailable, TargetUnavailable, LayoutError, TaskGroupMismatch,
                GraphTreesUnsupported)


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


@dataclass
class ScenarioResult:
    """The verdicts of one scenario and why it failed, if it did."""

    scenario: Scenario
    verdicts: list[Verdict]
    run: TargetRun
    seconds: float
    failures: list[str] = field(default_factory=list)
    forced_requests: int = 0  # requests re-run with the baseline's tokens forced past a near-tie
    phases: Phases = field(default_factory=Phases)
    drift: DriftStats = NOTHING_COMPARED  # over the compared steps of every request
    drift_judged: str = ""  # against what the drift was judged, or why it was not

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
                   DriftStats.from_dict(d["drift"]), d["drift_judged"])

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
    if scenario.mode != "eager" and run.counts_graph_steps and run.graph_steps == 0:
        failures.append(f"no decode step replayed a graph in mode {scenario.mode!r} (silent eager fallback)")
    if (scenario.mode != "eager" and scenario.engine.prefill_graphs and run.counts_graph_steps
            and run.prefill_graph_steps == 0):
        failures.append(f"no prefill replayed a graph in mode {scenario.mode!r} with prefill graphs on (silent eager "
                        "fallback)")
    return failures


def kernel_pair(scenario: Scenario) -> KernelPair:
    """Whether the scenario's two sides run other kernels: transformers', inductor's (modes compile and tree), or
    the other reduction order of several ranks."""
    across = scenario.baseline == "oracle" or scenario.mode in ("compile", "tree") or scenario.engine.world_size > 1
    return "across_kernels" if across else "same_kernels"


def forced_request(request: Request, baseline: Generation, step: int) -> Request:
    """`request` fed the baseline's tokens from `step` on and computing with the baseline's experts (MoE)."""
    return replace(request, forced_from=step, forced_ids=baseline.output_ids[step:],
                   forced_experts=[position for fed in baseline.routed_experts for position in fed])


class Judge:
    """Runs scenarios on one target, reusing the eager run that several scenarios share."""

    def __init__(self, target: Target, progress: Callable[[str], None] = lambda line: None,
                 min_coverage: float | None = None, drift_baseline: DriftBaseline | None = None) -> None:
        self.target = target
        self.progress = progress
        self.min_coverage = default_min_coverage(target) if min_coverage is None else min_coverage
        self.drift_baseline = drift_baseline
        self._eager_runs: dict[tuple, TargetRun] = {}

    def run(self, scenario: Scenario) -> ScenarioResult:
        start, phases = time.perf_counter(), Phases()
        checkpoint = ensure_checkpoint(scenario.model)
        self.target.validate(scenario, checkpoint)
        requests = make_requests(scenario.workload, read_config(checkpoint).vocab_size, scenario.max_new_tokens,
                                 scenario.seed)
        engine = scenario.engine

        def result(verdicts: list[Verdict], run: TargetRun, failures: list[str], forced: int = 0,
                   drift: DriftStats = NOTHING_COMPARED, judged: str = "not judged: the scenario ended early") -> ScenarioResult:
            return ScenarioResult(scenario, verdicts, run, time.perf_counter() - start, failures, forced, phases, drift,
                                  judged)

        dtype = getattr(torch, engine.dtype)
        pair = kernel_pair(scenario)
        baseline = None
        if scenario.baseline == "eager":
            baseline = self.eager_run(scenario, checkpoint, requests, phases, "baseline").generations
        self.progress(f"{scenario.name}: running {scenario.mode} on {self.target.name}")
        is_eager_run = scenario.engine == scenario.baseline_engine() and not scenario.dp_ranks
        run = self._run_target(scenario, checkpoint, requests, phases, "run", shared=is_eager_run)
        if isinstance(run, str):
            return result([], TargetRun([]), [run])
        if baseline is None:
            self.progress(f"{scenario.name}: scoring its tokens with transformers")
            with phases.timing("oracle"):
                baseline = oracle_score(checkpoint, requests, run.generations, top_k=engine.top_k, dtype=dtype)
        tolerance = Tolerance.for_pair(dtype, self.target.device, pair == "across_kernels")
        with phases.timing("compare"):
            ties = self.routing_ties(scenario, checkpoint, requests, baseline, run.generations, tolerance)
            verdicts = compare_generations(baseline, run.generations, tolerance, routing_ties=ties)
        stopped = {v.rid: v.force_from for v in verdicts if v.force_from is not None}
        if stopped and self.target.can_force_tokens:
            self.progress(f"{scenario.name}: re-running with the baseline's tokens forced past the near-ties of "
                          f"{len(stopped)} request(s)")
            by_rid = {g.rid: g for g in baseline}
            rerun = self._run_target(scenario, checkpoint, [
                forced_request(r, by_rid[r.rid], stopped[r.rid]) if r.rid in stopped else r for r in requests],
                phases, "forced_rerun")
            if isinstance(rerun, str):
                return result(verdicts, run, [rerun], len(stopped))
            continuations = {g.rid: g for g in rerun.generations if g.rid in stopped}
            with phases.timing("compare"):
                verdicts = compare_generations(baseline, run.generations, tolerance, continuations=continuations,
                                               routing_ties=ties)
        wrong_length = length_problems(requests, run.generations)
        verdicts = [wrong_length.get(v.rid, v) for v in verdicts]
        failures = scenario_failures(scenario, verdicts, run, self.min_coverage)
        drift = DriftStats.of([step for v in verdicts for step in v.drift])
        judged, drift_failures = self.judge_drift(scenario, pair, drift)
        return result(verdicts, run, failures + drift_failures, len(stopped) if self.target.can_force_tokens else 0,
                      drift, judged)

    def judge_drift(self, scenario: Scenario, pair: KernelPair, drift: DriftStats) -> tuple[str, list[str]]:
        """The scenario's drift statistics judged as a distribution, against the noise profile of correct runs on the
        same target, device, dtype and kernel pair, and against the figure stored for it (--drift-baseline): how, and
        the failures."""
        key = (self.target.name, self.target.device, scenario.engine.dtype, pair)
        judged, failures = judge_drift(drift, noise_profile(*key), where=profile_key(*key))
        if self.drift_baseline is not None:
            against, grew = self.drift_baseline.judge(scenario, self.target.device, self.target.name,
                                                      this_machine(self.target.device), drift)
            judged, failures = f"{judged}; {against}", failures + grew
        return judged, failures

    def _run_target(self, scenario: Scenario, checkpoint: Path, requests: list[Request], phases: Phases,
                    phase: str, shared: bool = False) -> TargetRun | str:
        """The target's run (`shared`: the eager run on one rank that baselines reuse, `eager_run`), or why the
        scenario failed: the engine under test crashed."""
        try:
            if shared:
                return self.eager_run(scenario, checkpoint, requests, phases, phase)
            with phases.timing(phase):
                run = self.target.run(scenario, checkpoint, requests)
            _split_capture(phases, phase, run)
            return run
        except SETUP_ERRORS:
            raise
        except Exception as error:
            return f"the engine under test ({self.target.name}) raised {type(error).__name__}: {error}"

    def eager_run(self, scenario: Scenario, checkpoint: Path, requests: list[Request], phases: Phases,
                  phase: str) -> TargetRun:
        """The target's eager run on one rank of `scenario`'s requests, made once and reused by later scenarios."""
        engine = scenario.baseline_engine()
        key = (str(checkpoint), scenario.workload, scenario.max_new_tokens, scenario.seed, engine)
        if key in self._eager_runs:
            phases.reused.append(phase)
            return self._eager_runs[key]
        if phase == "baseline":
            self.progress(f"{scenario.name}: baseline eager")
        with phases.timing(phase):
            self._eager_runs[key] = self.target.run(replace(scenario, engine=engine, dp_ranks=None), checkpoint, requests)
        return self._eager_runs[key]

    def routing_ties(self, scenario: Scenario, checkpoint: Path, requests: list[Request], baseline: list[Generation],
                     test: list[Generation], tolerance: Tolerance) -> dict[str, RoutingTie]:
        """For a test that does not report its MoE routing, per rid the first router near-tie along the
        baseline's tokens, past which the two sides may route differently (none where the routing is
        reported and compared, or cannot differ)."""
        if not tolerance.router_gap or not routing.has_experts(checkpoint) or any(g.routed_experts for g in test):
            return {}
        if not routing.searchable(checkpoint):
            self.progress(f"{scenario.name}: router near-ties not searched (checkpoint above "
                          f"{routing.MAX_CHECKPOINT_BYTES >> 30} GiB): MoE verdicts across kernels may flag them")
            return {}
        by_rid = {g.rid: g for g in baseline if g.error is None}
        judged = [r for r in requests if r.rid in by_rid]
        sequences = [r.prompt_ids + by_rid[r.rid].output_ids[:-1] for r in judged]
        ties = {r.rid: first_routing_tie(gaps, len(r.prompt_ids), tolerance.router_gap)
                for r, gaps in zip(judged, routing.router_gaps(checkpoint, sequences))}
        return {rid: tie for rid, tie in ties.items() if tie is not None}


def _split_capture(phases: Phases, phase: str, run: TargetRun) -> None:
    """Move the time the target reports for capturing (or compiling) its graphs out of `phase` into "capture"."""
    if run.capture_seconds:
        phases.seconds[phase] -= run.capture_seconds
        phases.seconds["capture"] = phases.seconds.get("capture", 0.0) + run.capture_seconds
