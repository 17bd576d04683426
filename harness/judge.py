"""Run scenarios on a target and judge each one: token verdicts plus the graph-mode sanity rules."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.oracle import oracle_generate
from harness.inputs.scenarios import Scenario
from harness.inputs.workloads import make_requests
from harness.targets.base import Target, TargetRun, TargetUnavailable
from harness.verdicts import routing
from harness.verdicts.compare import Verdict, compare_generations, summarize
from harness.verdicts.routing import RoutingTie, first_routing_tie
from harness.verdicts.tolerances import Tolerance
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
class ScenarioResult:
    """The verdicts of one scenario and why it failed, if it did."""

    scenario: Scenario
    verdicts: list[Verdict]
    run: TargetRun
    seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def first_divergence(self) -> Verdict | None:
        diverged = [v for v in self.verdicts if v.step is not None]
        return min(diverged, key=lambda v: v.step) if diverged else None

    def as_dict(self) -> dict:
        first = self.first_divergence
        return {
            **self.scenario.as_dict(),
            "passed": self.passed,
            "failures": self.failures,
            "verdicts": summarize(self.verdicts),
            "graph_steps": self.run.graph_steps,
            "counts_graph_steps": self.run.counts_graph_steps,
            "eager_steps": self.run.eager_steps,
            "prefill_graph_steps": self.run.prefill_graph_steps,
            "prefill_eager_steps": self.run.prefill_eager_steps,
            "fallback_reasons": self.run.fallback_reasons,
            "graph_memory": self.run.graph_memory,
            "first_divergence": None if first is None else first.__dict__ | {"passed": first.passed},
            "seconds": round(self.seconds, 2),
        }


def scenario_failures(scenario: Scenario, verdicts: list[Verdict], run: TargetRun) -> list[str]:
    """Failed verdicts, a scenario that judged no request (a pass must have compared something), and a graph
    scenario in which no step replayed a graph (silent fallback), where the target counts graph steps at all; with
    prefill graphs on, likewise for prefill."""
    failures = [f"{v.rid}: {v.reason}" for v in verdicts if not v.passed]
    if not verdicts:
        failures.append("no request was judged: a scenario that compared nothing cannot pass")
    if scenario.mode != "eager" and run.counts_graph_steps and run.graph_steps == 0:
        failures.append(f"no decode step replayed a graph in mode {scenario.mode!r} (silent eager fallback)")
    if (scenario.mode != "eager" and scenario.engine.prefill_graphs and run.counts_graph_steps
            and run.prefill_graph_steps == 0):
        failures.append(f"no prefill replayed a graph in mode {scenario.mode!r} with prefill graphs on (silent eager "
                        "fallback)")
    return failures


class Judge:
    """Runs scenarios on one target, caching baseline runs shared by several scenarios."""

    def __init__(self, target: Target, progress: Callable[[str], None] = lambda line: None) -> None:
        self.target = target
        self.progress = progress
        self._baselines: dict[tuple, list[Generation]] = {}

    def run(self, scenario: Scenario) -> ScenarioResult:
        start = time.perf_counter()
        checkpoint = ensure_checkpoint(scenario.model)
        requests = make_requests(scenario.workload, read_config(checkpoint).vocab_size, scenario.max_new_tokens,
                                 scenario.seed)
        baseline = self.baseline(scenario, checkpoint, requests)
        self.progress(f"{scenario.name}: running {scenario.mode} on {self.target.name}")
        try:
            run = self.target.run(scenario, checkpoint, requests)
        except SETUP_ERRORS:
            raise
        except Exception as error:  # the engine under test crashed: a failed scenario
            failure = f"the engine under test ({self.target.name}) raised {type(error).__name__}: {error}"
            return ScenarioResult(scenario, [], TargetRun([]), time.perf_counter() - start, [failure])
        engine = scenario.engine
        # Other kernels, or the other reduction order of several ranks: float noise, bounded per dtype.
        # Modes compile and tree run inductor's kernels.
        across_kernels = scenario.baseline == "oracle" or engine.mode in ("compile", "tree") or engine.world_size > 1
        tolerance = Tolerance.for_dtype(getattr(torch, engine.dtype), across_kernels)
        ties = self.routing_ties(scenario, checkpoint, requests, baseline, tolerance) if across_kernels else None
        verdicts = compare_generations(baseline, run.generations, tolerance, ties)
        failures = scenario_failures(scenario, verdicts, run)
        return ScenarioResult(scenario, verdicts, run, time.perf_counter() - start, failures)

    def routing_ties(self, scenario: Scenario, checkpoint: Path, requests: list[Request], baseline: list[Generation],
                     tolerance: Tolerance) -> dict[str, RoutingTie]:
        """Per rid, the first MoE router near-tie along the baseline's tokens (none for a dense model)."""
        if not routing.searchable(checkpoint):
            if routing.has_experts(checkpoint):
                self.progress(f"{scenario.name}: router near-ties not searched (checkpoint above "
                              f"{routing.MAX_CHECKPOINT_BYTES >> 30} GiB): MoE verdicts across kernels may flag them")
            return {}
        by_rid = {g.rid: g for g in baseline if g.error is None}
        judged = [r for r in requests if r.rid in by_rid]
        sequences = [r.prompt_ids + by_rid[r.rid].output_ids[:-1] for r in judged]
        ties = {r.rid: first_routing_tie(gaps, len(r.prompt_ids), tolerance.router_gap)
                for r, gaps in zip(judged, routing.router_gaps(checkpoint, sequences))}
        return {rid: tie for rid, tie in ties.items() if tie is not None}

    def baseline(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> list[Generation]:
        """The generations `scenario` is judged against: transformers' (`oracle`) or the target's own eager run."""
        engine = scenario.baseline_engine()
        key = (scenario.baseline, str(checkpoint), scenario.workload, scenario.max_new_tokens, scenario.seed, engine)
        if key not in self._baselines:
            self.progress(f"{scenario.name}: baseline {scenario.baseline}")
            if scenario.baseline == "oracle":
                self._baselines[key] = oracle_generate(checkpoint, requests, dtype=getattr(torch, engine.dtype))
            else:
                eager = replace(scenario, engine=engine, dp_ranks=None)
                self._baselines[key] = self.target.run(eager, checkpoint, requests).generations
        return self._baselines[key]
