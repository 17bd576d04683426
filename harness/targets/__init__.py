"""Engines under test. A target runs one scenario's requests in one mode and returns records.

Adding an engine (vLLM-Ascend, ...) is one file with a class that has `name` and `run`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.scenarios import Scenario
from reference_runner.records import Generation, Request


class TargetUnavailable(RuntimeError):
    """The target's engine is not installed here, or cannot run on the requested device."""


@dataclass
class TargetRun:
    """Records of one run plus how its decode steps ran (graph replays vs eager)."""

    generations: list[Generation]
    graph_steps: int = 0
    eager_steps: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    graph_memory: dict | None = None
    counts_graph_steps: bool = True  # False where the engine does not say which steps replayed a graph (SGLang)


class Target(Protocol):
    name: str

    def run(self, scenario: Scenario, mode: str, checkpoint: Path, requests: list[Request]) -> TargetRun: ...


def get_target(name: str, device: str) -> Target:
    """The target called `name` (`reference` or `sglang`) on `device`."""
    factories: dict[str, Callable[[str], Target]] = {"reference": _reference, "sglang": _sglang}
    if name not in factories:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(factories)}")
    return factories[name](device)


def _reference(device: str) -> Target:
    from harness.targets.reference import ReferenceTarget

    return ReferenceTarget(device)


def _sglang(device: str) -> Target:
    from harness.targets.sglang import SGLangTarget

    return SGLangTarget(device)
