"""The reference runner in this repository as a target: in process, or on tp * dp launched ranks."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from harness.launch import RankJob, launch, merge
from harness.scenarios import Scenario
from harness.targets import TargetRun
from reference_runner.engine import Engine
from reference_runner.records import Request


class ReferenceTarget:
    name = "reference"

    def __init__(self, device: str, rank_setup: str | None = None, dist_timeout_s: float = 60.0) -> None:
        self.device = device
        self.rank_setup = rank_setup  # see RankJob.setup: fault injection on launched ranks
        self.dist_timeout_s = dist_timeout_s

    def run(self, scenario: Scenario, mode: str, checkpoint: Path, requests: list[Request]) -> TargetRun:
        if scenario.tp * scenario.dp > 1:
            return self.run_ranks(scenario, mode, checkpoint, requests)
        engine = Engine(
            checkpoint,
            device=self.device,
            dtype=getattr(torch, scenario.dtype),
            mode=mode,
            max_bs=scenario.max_bs,
            graph_bs=list(scenario.graph_bs) if scenario.graph_bs else None,
            block_size=scenario.block_size,
            max_context=scenario.max_context,
        )
        generations = engine.generate(requests)
        stats = engine.stats
        return TargetRun(
            generations,
            graph_steps=stats.graph_steps,
            eager_steps=stats.eager_steps,
            fallback_reasons=dict(stats.fallback_reasons),
            graph_memory=engine.graph_memory(),
        )

    def run_ranks(self, scenario: Scenario, mode: str, checkpoint: Path, requests: list[Request]) -> TargetRun:
        """Launch tp * dp ranks; one TP rank per DP rank reports. A bad layout raises LayoutError."""
        job = RankJob(str(checkpoint), requests, tp=scenario.tp, dp=scenario.dp, device=self.device,
                      dtype=scenario.dtype, mode=mode, max_bs=scenario.max_bs,
                      graph_bs=list(scenario.graph_bs) if scenario.graph_bs else None,
                      block_size=scenario.block_size, max_context=scenario.max_context,
                      dp_ranks=list(scenario.dp_ranks) if scenario.dp_ranks else None,
                      setup=self.rank_setup, dist_timeout_s=self.dist_timeout_s)
        results = launch(job)  # RankFailed: the judge fails the scenario with the failed rank's message
        leaders = [r for r in results if r.tp_rank == 0]  # TP ranks of one DP rank ran the same steps
        return TargetRun(
            merge(job, results),
            graph_steps=sum(r.graph_steps for r in leaders),
            eager_steps=sum(r.eager_steps for r in leaders),
            fallback_reasons=dict(sum((Counter(r.fallback_reasons) for r in leaders), Counter())),
        )
