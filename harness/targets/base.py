"""The target contract: an engine under test runs one scenario's requests and returns records."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.inputs.scenarios import Scenario
from reference_runner.records import Generation, Request


class TargetUnavailable(RuntimeError):
    """The target's engine is not installed here, or cannot run on the requested device."""


@dataclass
class TargetRun:
    """Records of one run plus how its decode steps ran (graph replays vs eager), and its prefill steps where
    prefill graphs are on."""

    generations: list[Generation]
    graph_steps: int = 0
    eager_steps: int = 0
    prefill_graph_steps: int = 0
    prefill_eager_steps: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    graph_memory: dict | None = None
    counts_graph_steps: bool = True  # False where the engine does not say which steps replayed a graph (SGLang)


class Target(Protocol):
    name: str

    def run(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        """Run `requests` on `checkpoint` as `scenario.engine` says (its mode, layout, dtype...)."""
        ...
