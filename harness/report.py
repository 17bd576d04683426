"""Readable check reports: a console table, a JSON document and JUnit XML, the files written as scenarios end."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from harness.inputs.scenarios import Scenario
from harness.judge import PHASES, ScenarioResult
from harness.stops import signals_deferred
from harness.verdicts.compare import Verdict, coverage


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
class CheckResult:
    """What a check found so far: every finished scenario, those not run yet, and why the run stopped if it did."""

    scenarios: list[ScenarioResult]
    pending: list[Scenario]
    stopped_by: str | None = None  # why the run ended before its last scenario (`exits.stop_reason`)
    meta: dict = field(default_factory=dict)  # the run's: device, target, minimum coverage, environment
    fingerprints: dict[str, str] = field(default_factory=dict)  # by model: its checkpoint's, for `check --resume`

    @property
    def complete(self) -> bool:
        return not self.pending and self.stopped_by is None

    @property
    def passed(self) -> bool:
        """Complete, with at least one scenario, and every scenario passed."""
        return self.complete and bool(self.scenarios) and all(r.passed for r in self.scenarios)

    def summary(self) -> str:
        """The console table."""
        return table(self.scenarios)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "complete": self.complete, "stopped_by": self.stopped_by, **self.meta,
                "scenarios": [r.as_dict() | {"checkpoint_fingerprint": self.fingerprints.get(r.scenario.model)}
                              for r in self.scenarios],
                "pending": [s.name for s in self.pending]}

    def to_json(self) -> str:
        """The `--json` report."""
        return json.dumps(self.as_dict(), indent=2, default=str)

    def to_junit(self) -> bytes:
        """JUnit XML: a test case per scenario, failed ones with their failures, pending ones skipped."""
        suite = ET.Element(
            "testsuite", name="npugraph-harness", tests=str(len(self.scenarios) + len(self.pending)),
            failures=str(sum(not r.passed for r in self.scenarios)), skipped=str(len(self.pending)),
            time=f"{sum(r.seconds for r in self.scenarios):.2f}",
        )
        for r in self.scenarios:
            case = ET.SubElement(suite, "testcase", classname=f"check.{r.scenario.model}", name=r.scenario.name,
                                 time=f"{r.seconds:.2f}")
            if not r.passed:
                ET.SubElement(case, "failure", message=r.failures[0]).text = "\n".join(r.failures)
        for scenario in self.pending:
            case = ET.SubElement(suite, "testcase", classname=f"check.{scenario.model}", name=scenario.name, time="0")
            ET.SubElement(case, "skipped", message=f"not run: {self.stopped_by or 'the run has not reached it yet'}")
        return ET.tostring(suite, encoding="utf-8", xml_declaration=True)

    def failure_report(self) -> str:
        """Why the check did not pass: each failed scenario, its failures and its first divergence; or why the run
        is incomplete. Empty if it passed."""
        lines = [] if self.complete else [f"the check is incomplete: {self.stopped_by or 'scenarios not run'} "
                                          f"({len(self.pending)} of {len(self.scenarios) + len(self.pending)} "
                                          "scenarios not run)"]
        if not self.scenarios and self.complete:
            lines.append("no scenario ran")
        for r in self.scenarios:
            if r.passed:
                continue
            lines.append(f"{r.scenario.name}: FAIL ({r.run.engine_version or '?'}; {coverage_line(r)})")
            lines += [f"    ! {failure}" for failure in r.failures]
            first = r.first_divergence
            if first is not None and not first.passed:
                lines.append(f"    first divergence: {divergence_line(first)}")
        return "\n".join(lines)

    def assert_passed(self) -> None:
        """Raise AssertionError, with `failure_report()` as its message, unless the check passed."""
        if not self.passed:
            raise AssertionError(self.failure_report())


def coverage_line(result: ScenarioResult) -> str:
    compared, generated = coverage(result.verdicts)
    return f"{compared} of {generated} tokens compared"


def divergence_line(v: Verdict) -> str:
    """Request, step, both tokens, their logprobs and the baseline's margin."""
    def logprob(value: float | None) -> str:
        return "?" if value is None else f"{value:.4f}"

    margin = "?" if v.margin is None else f"{v.margin:.4f}"
    return (f"request {v.rid}, step {v.step}: baseline token {v.baseline_token} (logprob "
            f"{logprob(v.baseline_logprob)}) vs test token {v.test_token} (logprob {logprob(v.test_logprob)}), "
            f"baseline top-2 margin {margin}")


@dataclass
class CheckReports:
    """The check's `--json` and `--junit` files, rewritten atomically after every scenario, so that each holds every
    finished scenario at any moment, and says whether the run is complete and, if not, why."""

    json: Path | None
    junit: Path | None

    def write(self, result: CheckResult) -> None:
        if self.json:
            _replace(self.json, result.to_json().encode())
        if self.junit:
            _replace(self.junit, result.to_junit())


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
