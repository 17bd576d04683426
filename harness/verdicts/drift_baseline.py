"""Precision baselines: each scenario's drift statistics stored (`check --drift-record FILE`), and a later run's
judged against them (`check --drift-baseline FILE`), as `baselines/` stores throughput.

A new kernel or a torch upgrade moves the drift of a correct pair long before a token flips: a scenario fails where a
judged statistic grew beyond `DRIFT_GROWTH` times its stored figure (the flip rate: and `FLIP_SLACK` flips, as flips
come whole). A scenario is matched by everything that decides its tokens (model, mode, dtype, workload, seed,
length, engine options), on the same device, target and machine (`this_machine`): like throughput, drift figures
hold for the machine that recorded them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.inputs.scenarios import Scenario
from harness.verdicts.drift import DriftStats, allowed, beyond
from harness.verdicts.noise import JUDGED, MIN_STEPS, within_or_beyond

DRIFT_GROWTH = 1.5  # a statistic may grow to this many times its stored figure
FORMAT = 1


def this_machine(device: str) -> str:
    """What decides a correct pair's drift besides the scenario and torch: the accelerator; on the CPU the processor,
    the instruction set torch's kernels dispatch to and the threads (float32 products round otherwise on another
    thread count: graph against eager measured 3.8e-7 mean |delta logprob| on 1 thread, 1.1e-6 on 2)."""
    import torch

    from reference_runner.device import device_name

    if device != "cpu":
        return device_name(device)
    return f"{device_name(device)} {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class StoredDrift:
    """One scenario's drift as recorded: on which device, target and machine, with which torch, when."""

    scenario: Scenario
    device: str
    target: str
    machine: str
    drift: DriftStats
    recorded: dict  # torch version, date...

    @property
    def key(self) -> tuple:
        return self.scenario, self.device, self.target, self.machine

    def as_dict(self) -> dict:
        return {"scenario": self.scenario.as_dict(), "device": self.device, "target": self.target,
                "machine": self.machine, "drift": self.drift.as_dict(), "recorded": self.recorded}

    @classmethod
    def from_dict(cls, d: dict) -> StoredDrift:
        return cls(Scenario.from_dict(d["scenario"]), d["device"], d["target"], d["machine"],
                   DriftStats.from_dict(d["drift"]), d["recorded"])


@dataclass(frozen=True)
class DriftBaseline:
    """The drift figures a file stores."""

    path: Path
    records: tuple[StoredDrift, ...] = ()

    @classmethod
    def load(cls, path: Path) -> DriftBaseline:
        """The figures in `path`; an empty baseline where it does not exist. Raises ValueError (or OSError, KeyError,
        TypeError) where it is no drift baseline."""
        if not path.exists():
            return cls(path)
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not a drift baseline of format {FORMAT} (written by check --drift-record)")
        return cls(path, tuple(StoredDrift.from_dict(d) for d in doc["records"]))

    def stored(self, scenario: Scenario, device: str, target: str, machine: str) -> StoredDrift | None:
        return next((r for r in self.records if r.key == (scenario, device, target, machine)), None)

    def judge(self, scenario: Scenario, device: str, target: str, machine: str,
              drift: DriftStats) -> tuple[str, list[str]]:
        """How `drift` compares with the stored figure (or why it was not compared), and a failure per statistic that
        grew beyond DRIFT_GROWTH times it."""
        stored = self.stored(scenario, device, target, machine)
        if stored is None:
            return f"no figure stored in {self.path} for this scenario on {target}, {device}, {machine}", []
        if drift.steps < MIN_STEPS:
            return f"not compared with {self.path}: {drift.steps} steps compared, fewer than {MIN_STEPS}", []
        recorded = f"stored in {self.path} by torch {stored.recorded.get('torch', '?')} on {stored.recorded.get('date', '?')}"
        failures = beyond(drift, {name: stored.drift.statistic(name) for name in JUDGED}, DRIFT_GROWTH,
                          "drift grew beyond the baseline", recorded)
        return f"{within_or_beyond(failures)} {DRIFT_GROWTH:g}x the figures stored in {self.path}", failures

    def merged(self, records: list[StoredDrift]) -> bytes:
        """This file's content with `records` added, each replacing the figure stored for its scenario."""
        new = {r.key for r in records}
        kept = [r for r in self.records if r.key not in new]
        doc = {"format": FORMAT, "what": "drift statistics per scenario: npugraph-harness check --drift-record; "
                                         "judged by check --drift-baseline",
               "records": [r.as_dict() for r in [*kept, *records]]}
        return (json.dumps(doc, indent=1) + "\n").encode()


def growth_limit(name: str, stored: DriftStats, steps: int) -> float:
    """The most statistic `name` may reach over `steps` compared steps against its stored figure."""
    return allowed(name, stored.statistic(name), DRIFT_GROWTH, steps)
