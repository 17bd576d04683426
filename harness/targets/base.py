"""The target contract: an engine under test runs one scenario's requests and returns records."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.inputs.scenarios import Scenario
from reference_runner.engine.args import EngineArgs
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


# How the judge makes a target compute from the baseline's inputs again past a near-tie (`harness/forcing.py`):
# `in_loop`, the target feeds given tokens in its own decode loop (`Request.forced_from`, `forced_ids`) and, where it
# reports its routing, replays given MoE experts (`forced_experts`); `continuation`, each request is submitted again
# with the baseline's tokens up to the near-tie appended to its prompt, to both sides.
FORCINGS = ("in_loop", "continuation")


class Target(Protocol):
    name: str
    device: str
    forcing: str = "continuation"  # one of FORCINGS: any target that takes token ids can be continued

    def validate(self, scenario: Scenario, checkpoint: Path) -> None:
        """Raise TargetUnavailable if this target cannot run `scenario` on `checkpoint`: before anything runs.
        By default every scenario is accepted."""

    def run(self, scenario: Scenario, checkpoint: Path, requests: list[Request]) -> TargetRun:
        """Run `requests` on `checkpoint` as `scenario.engine` says (its mode, layout, dtype...)."""
        ...

    def close(self) -> None:
        """End what the target keeps between runs (its engines' workers). By default there is nothing."""

    def warm_up(self, modes: Sequence[str]) -> None:
        """Start in the background what runs of `modes` would otherwise wait for, so that it runs beside the first
        scenario. By default there is nothing."""

    def twins(self, engine: EngineArgs) -> dict[str, str]:
        """Per graph mode, the twin mode (`scenarios.TWINS`) this target runs with `engine`'s options, which that graph
        mode is judged against. By default none: every graph mode is judged against eager."""
        return {}


# The share of generated tokens a scenario must compare to pass, unless --min-coverage says otherwise: every target
# is compared past its near-ties (forced in its loop, or continued), so every target is held to the same share.
MIN_COVERAGE = 0.9
