"""The reference runner in this repository as a target: in process, or on tp * dp launched ranks."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from harness.inputs.scenarios import Scenario
from harness.targets.base import TargetRun
from harness.targets.launch import RankJob, launch, merge
from reference_runner.engine.engine import Engine
from reference_runner.parallel.state import DIST_TIMEOUT_S
from reference_runner.records import Request


class ReferenceTarget:
    name = "reference"

    def __init__(self, device: str, rank_setup: str | None = None, dist_timeout_s: float = DIST_TIMEOUT_S) -> None:
        self.device = device
        self.rank_setup = rank_setup  # see RankJob.setup: fault injection on launched ranks
        self.dist_timeout_s = dist_timeout_s

    def run(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        if scenario.engine.world_size > 1:
            return self.run_ranks(scenario, checkpoint, requests)
        engine = Engine(checkpoint, scenario.engine, device=self.device)
        generations = engine.generate(requests)
        stats = engine.stats
        return TargetRun(
            generations,
            graph_steps=stats.graph_steps,
            eager_steps=stats.eager_steps,
            prefill_graph_steps=stats.prefill_graph_steps,
            prefill_eager_steps=stats.prefill_eager_steps,
            fallback_reasons=dict(stats.fallback_reasons),
            graph_memory=engine.graph_memory(),
        )

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
        )
