"""Readable check reports: a console table, a JSON document and JUnit XML, the files written as scenarios end."""
from __future__ import annotations

import datetime
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.inputs.scenarios import Scenario
from harness.judge import PHASES, ScenarioResult
from harness.stops import signals_deferred
from harness.verdicts.drift_baseline import DriftBaseline, StoredDrift, this_machine


def table(results: list[ScenarioResult]) -> str:
    """One line per scenario: the engine that ran, verdict counts, tokens compared of those generated
    (coverage), decode graph/eager steps, prefill graph/eager steps (where prefill graphs are on), and the
    first failures if any."""
    header = (f"{'scenario':<44} {'engine':<16} {'result':<6} {'match':>5} {'tie':>4} {'mism':>4} {'compared':>13} "
              f"{'graph':>6} {'eager':>6} {'prefill':>7} {'secs':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        d = r.as_dict()
        counts = d["verdicts"]
        graph, eager = (r.run.graph_steps, r.run.eager_steps) if r.run.counts_graph_steps else ("?", "?")
        compared = f"{d['tokens_compared']}/{d['tokens_generated']} {r.coverage:>4.0%}"
        prefill = f"{r.run.prefill_graph_steps}/{r.run.prefill_eager_steps}" if r.scenario.engine.prefill_graphs else "-"
        lines.append(
            f"{r.scenario.name:<44} {r.run.engine_version or '?':<16} {'PASS' if r.passed else 'FAIL':<6} "
            f"{counts.get('match', 0):>5} {counts.get('tie', 0):>4} {counts.get('mismatch', 0):>4} {compared:>13} "
            f"{graph:>6} {eager:>6} {prefill:>7} {r.seconds:>6.1f}"
        )
        for failure in r.failures[:3]:
            lines.append(f"    ! {failure}")
        if r.drift.steps:
            lines.append(f"    drift: {r.drift.summary()}; {r.drift_judged}")
        if d["near_ties"] or d["router_near_ties"] or r.forced_requests:
            lines.append(f"    ~ near-ties: {d['near_ties']} of tokens, {d['router_near_ties']} of routing; "
                         f"{r.forced_requests} request(s) re-run forced past them")
        lines.append("    time: " + ", ".join(
            [*(f"{phase.replace('_', ' ')} {r.phases.seconds[phase]:.1f}s" for phase in PHASES if phase in r.phases.seconds),
             *(f"{phase} reused" for phase in r.phases.reused)]))
        for v in r.verdicts:
            if v.status == "tie" and v.compared < v.generated:
                lines.append(f"    ~ {v.rid}: {v.reason}")
        if r.run.fallback_reasons:
            reasons = ", ".join(f"{k} x{n}" for k, n in r.run.fallback_reasons.items())
            lines.append(f"    eager fallbacks: {reasons}")
        if r.run.graph_memory:
            lines.append("    graph memory: " + ", ".join(f"{k}={v:,}" for k, v in r.run.graph_memory.items()))
    passed = sum(r.passed for r in results)
    lines.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)


@dataclass
class CheckReports:
    """The check's `--json` and `--junit` files, rewritten atomically after every scenario, so that each holds every
    finished scenario at any moment, and says whether the run is complete and, if not, why; and `--drift-record`'s,
    to which each scenario that passed adds its drift statistics."""

    json: Path | None
    junit: Path | None
    meta: dict = field(default_factory=dict)  # the run's: device, target, environment...
    fingerprints: dict[str, str] = field(default_factory=dict)  # by model: its checkpoint's, for `check --resume`
    drift_record: Path | None = None

    def write(self, results: list[ScenarioResult], pending: list[Scenario], stopped_by: str | None = None) -> None:
        """Both files for `results` finished and `pending` not run yet; `stopped_by`: why the run ended early."""
        complete = not pending and stopped_by is None
        if self.json:
            scenarios = [r.as_dict() | {"checkpoint_fingerprint": self.fingerprints.get(r.scenario.model)} for r in results]
            doc = {"passed": complete and all(r.passed for r in results), "complete": complete, "stopped_by": stopped_by,
                   **self.meta, "scenarios": scenarios, "pending": [s.name for s in pending]}
            _replace(self.json, json.dumps(doc, indent=2, default=str).encode())
        if self.junit:
            _replace(self.junit, junit_xml(results, pending, stopped_by))
        if self.drift_record:
            _replace(self.drift_record, DriftBaseline.load(self.drift_record).merged(self.drift_figures(results)))

    def drift_figures(self, results: list[ScenarioResult]) -> list[StoredDrift]:
        """The drift of each scenario that passed, stamped with the torch that ran it and the date."""
        stamp = {"torch": torch.__version__, "date": datetime.date.today().isoformat(),
                 **{k: v for k, v in self.meta.get("environment", {}).items() if k in ("torch_npu", "cann")}}
        machine = this_machine(self.meta["device"])
        return [StoredDrift(r.scenario, self.meta["device"], self.meta["target"], machine, r.drift, stamp)
                for r in results if r.passed and r.drift.steps]


def junit_xml(results: list[ScenarioResult], pending: list[Scenario], stopped_by: str | None) -> bytes:
    """JUnit XML: a test case per scenario, failed ones with their failures, pending ones skipped."""
    suite = ET.Element(
        "testsuite", name="npugraph-harness", tests=str(len(results) + len(pending)),
        failures=str(sum(not r.passed for r in results)), skipped=str(len(pending)),
        time=f"{sum(r.seconds for r in results):.2f}",
    )
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"check.{r.scenario.model}", name=r.scenario.name,
                             time=f"{r.seconds:.2f}")
        if not r.passed:
            ET.SubElement(case, "failure", message=r.failures[0]).text = "\n".join(r.failures)
    for scenario in pending:
        case = ET.SubElement(suite, "testcase", classname=f"check.{scenario.model}", name=scenario.name, time="0")
        ET.SubElement(case, "skipped", message=f"not run: {stopped_by or 'the run has not reached it yet'}")
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def _replace(path: Path, content: bytes) -> None:
    # A reader (or a stop) never sees half a file: the new one is written aside, then renamed over the old.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with signals_deferred():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            temporary.write_bytes(content)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
