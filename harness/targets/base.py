"""The target contract: an engine under test runs one scenario's requests and returns records."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.inputs.scenarios import Scenario
from reference_runner.records import Generation, Request


class TargetUnavailable(RuntimeError):
    """The target's engine is not installed here, or cannot run the requested device, mode or checkpoint."""


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
    counts_graph_steps: bool = True  # False where the engine does not say which steps replayed a graph (SGLang, vLLM)
    engine_version: str = ""  # the engine that ran and its version, e.g. "vllm 0.32.0"
    # Of the run, spent capturing or compiling graphs (where the engine reports it); a timing, not a record.
    capture_seconds: float = field(default=0.0, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetRun:
        """The inverse of `dataclasses.asdict` (after a JSON round trip)."""
        return cls(**{**d, "generations": [Generation.from_dict(g) for g in d["generations"]]})


class Target(Protocol):
    name: str
    device: str
    # Whether the target can feed given tokens in place of its own choices (`Request.forced_from`) and replay
    # MoE routing: the judge's continuation past a near-tie. Without it comparisons stop at the first one.
    can_force_tokens: bool

    def validate(self, scenario: Scenario, checkpoint: Path) -> None:
        """Raise TargetUnavailable if this target cannot run `scenario` on `checkpoint`: before anything runs.
        By default every scenario is accepted."""

    def run(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        """Run `requests` on `checkpoint` as `scenario.engine` says (its mode, layout, dtype...)."""
        ...


# The share of generated tokens a scenario must compare to pass, unless --min-coverage says otherwise: a
# target that can force tokens compares every step past a near-tie; one that cannot stops at the first
# near-tie of each request, which in bfloat16 leaves a third to two thirds of the tokens unseen.
MIN_COVERAGE = {True: 0.9, False: 0.3}  # by `Target.can_force_tokens`


def default_min_coverage(target: Target) -> float:
    """The coverage a scenario needs on `target` when --min-coverage is not given."""
    return MIN_COVERAGE[target.can_force_tokens]
