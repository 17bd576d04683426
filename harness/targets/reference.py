"""The reference runner in this repository as a target: in process, or on tp * dp launched ranks."""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from harness.inputs.scenarios import TWINS, Scenario
from harness.targets.base import Target, TargetRun
from harness.targets.launch import RankJob, RankResult, launch, merge
from harness.targets.worker import RunRequests, WorkerJob
from reference_runner import __version__
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.errors import ModeUnsupported
from reference_runner.graphs import get_graph_backend
from reference_runner.models.loader import drop_kept_model
from reference_runner.parallel.state import DIST_TIMEOUT_S
from reference_runner.records import Request

ENGINE_VERSION = f"reference {__version__}"


def run_engine(checkpoint: str, args: EngineArgs, device: str, requests: list[Request]) -> TargetRun:
    """One rank's run of `requests` in this process, on an engine of its own (its model, handed back when the run is
    over, serves the next run's engine if nothing in it changed: `reference_runner/models/loader.py`)."""
    engine = Engine(checkpoint, args, device=device)
    generations = engine.generate(requests)
    stats = engine.stats
    run = TargetRun(
        generations,
        graph_steps=stats.graph_steps,
        eager_steps=stats.eager_steps,
        prefill_graph_steps=stats.prefill_graph_steps,
        prefill_eager_steps=stats.prefill_eager_steps,
        fallback_reasons=dict(stats.fallback_reasons),
        graph_memory=engine.graph_memory(),
        engine_version=ENGINE_VERSION,
        capture_seconds=engine.capture_seconds,
    )
    engine.release()
    return run


def start_engine(job: WorkerJob) -> RunRequests:
    """As a worker's runner: each run on an engine of its own, as in process."""
    return functools.partial(run_engine, job.checkpoint, job.engine, job.device)


class ReferenceTarget(Target):
    name = "reference"
    forcing = "in_loop"  # Request.forced_from, forced_ids and forced_experts, fed through the graphs' static buffers

    def __init__(self, device: str, rank_setup: str | None = None, dist_timeout_s: float = DIST_TIMEOUT_S) -> None:
        self.device = device
        self.rank_setup = rank_setup  # see RankJob.setup: fault injection on launched ranks
        self.dist_timeout_s = dist_timeout_s

    def close(self) -> None:
        drop_kept_model()

    def warm_up(self, modes: Sequence[str]) -> None:
        """Start the warm-up of the graph backend of each mode but eager (the compiled modes on the CPU: inductor's probe
        of the machine)."""
        for mode in set(modes) - {"eager"}:
            backend = get_graph_backend(self.device, mode)
            if backend.warm_up is not None:
                backend.warm_up()

    def twins(self, engine: EngineArgs) -> dict[str, str]:
        """Compile's twin where the device runs it; not with prefill graphs, which compile mode compiles too and the
        twin, compiling decode steps only, would not."""
        if engine.prefill_graphs:
            return {}
        twins = {}
        for mode, twin in TWINS.items():
            with contextlib.suppress(ModeUnsupported):
                get_graph_backend(self.device, twin)
                twins[mode] = twin
        return twins

    def run(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        if scenario.engine.world_size > 1:
            return self.run_ranks(scenario, checkpoint, requests)
        return run_engine(str(checkpoint), scenario.engine, self.device, requests)

    def run_ranks(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        """Launch tp * dp ranks; one TP rank per DP rank reports. A bad layout raises LayoutError."""
        job = RankJob(str(checkpoint), requests, scenario.engine, device=self.device,
                      dp_ranks=list(scenario.dp_ranks) if scenario.dp_ranks else None,
                      setup=self.rank_setup, dist_timeout_s=self.dist_timeout_s)
        results = launch(job)  # RankFailed: the judge fails the scenario with the failed rank's message
        leaders = [r for r in results if r.tp_rank == 0]  # TP ranks of one DP rank ran the same steps
        return TargetRun(
            merge(job, results),
            graph_steps=sum(r.graph_steps for r in leaders),
            eager_steps=sum(r.eager_steps for r in leaders),
            prefill_graph_steps=sum(r.prefill_graph_steps for r in leaders),
            prefill_eager_steps=sum(r.prefill_eager_steps for r in leaders),
            fallback_reasons=dict(sum((Counter(r.fallback_reasons) for r in leaders), Counter())),
            graph_memory=summed_graph_memory(results),
            engine_version=ENGINE_VERSION,
            capture_seconds=max(r.capture_seconds for r in results),  # the ranks capture at the same time
        )


def summed_graph_memory(results: list[RankResult]) -> dict[str, int] | None:
    """Every rank holds its own graphs (on its own device): their bytes summed over the ranks, None in eager mode."""
    if results[0].graph_memory is None:
        return None
    return {key: sum(r.graph_memory[key] for r in results) for key in results[0].graph_memory}
