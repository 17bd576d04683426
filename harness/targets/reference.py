"""The reference runner in this repository as a target."""
from __future__ import annotations

from pathlib import Path

import torch

from harness.scenarios import Scenario
from harness.targets import TargetRun
from reference_runner.engine import Engine
from reference_runner.records import Request


class ReferenceTarget:
    name = "reference"

    def __init__(self, device: str) -> None:
        self.device = device

    def run(self, scenario: Scenario, mode: str, checkpoint: Path, requests: list[Request]) -> TargetRun:
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
