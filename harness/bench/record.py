"""`npugraph-harness bench --record`: a passing run merged into the stored baselines, which never shrink.

The run's benchmarks go into the next numbered file of the machine class's folder, with every benchmark of the
newest stored file that the run did not measure (a `-k` selection, a benchmark skipped here), each marked with
the file that measured it (`extra_info["measured_in"]`): the newest file, the one comparisons read, always holds
every benchmark, and older files stay as they were. The stored speed-ups are merged the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.bench.results import GATED_KINDS, GATED_MODES, results_from_benchmarks, speedups, stored_machines

BASELINE_FILES = "[0-9][0-9][0-9][0-9]_*.json"  # pytest-benchmark's numbered files; the newest sorts last


def stored_baselines(folder: Path) -> list[Path]:
    """The numbered pytest-benchmark files of one machine class and machine id, oldest first."""
    return sorted(folder.glob(BASELINE_FILES))


@dataclass(frozen=True)
class Recorded:
    """What one record stored: how many benchmarks and speed-ups this run measured and how many it kept."""

    baseline: Path
    measured: int
    kept: int
    kept_from: Path | None
    ratios: Path
    ratios_measured: int
    ratios_kept: int

    def lines(self) -> list[str]:
        kept = f", {self.kept} kept from {self.kept_from.name} (not run this time)" if self.kept else ""
        ratios_kept = f", {self.ratios_kept} kept from before" if self.ratios_kept else ""
        return [f"recorded {self.measured + self.kept} benchmarks in {self.baseline}: {self.measured} measured{kept}",
                f"recorded {self.ratios_measured + self.ratios_kept} speed-ups in {self.ratios}: "
                f"{self.ratios_measured} measured{ratios_kept}"]


def gated_speedups(benchmarks: list[dict]) -> dict[str, float]:
    """The speed-ups the ratio gate holds (decode steps of the graph modes), rounded as stored."""
    return {key: round(value, 3) for key, value in speedups(results_from_benchmarks(benchmarks)).items()
            if key.split("/")[1] in GATED_KINDS and key.split("/")[3] in GATED_MODES}


def save_ratios(path: Path, ratios: dict[str, float], machine: dict) -> int:
    """Merge `ratios` into the speed-ups `path` stores for this run's `machine` (its `device_name`; the file is
    created if missing, other devices' speed-ups are kept); how many stored ones of this device it kept."""
    machines = stored_machines(path) if path.is_file() else {}
    stored = machines.get(machine["device_name"], {}).get("speedups", {})
    kept = {key: value for key, value in stored.items() if key not in ratios}
    machines[machine["device_name"]] = {"machine": machine, "speedups": dict(sorted({**kept, **ratios}.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machines": dict(sorted(machines.items()))}, indent=2) + "\n")
    return len(kept)


def record(run: dict, folder: Path, device: str, ratios: Path) -> Recorded:
    """Store pytest-benchmark's JSON `run` (a passing run) as `folder`'s next `NNNN_<device>.json`, merged with the
    newest stored file, and merge its gated speed-ups into `ratios`."""
    stored = stored_baselines(folder)
    previous = stored[-1] if stored else None
    measured = {b["fullname"] for b in run["benchmarks"]}
    kept = [] if previous is None else [
        {**b, "extra_info": {**b["extra_info"], "measured_in": b["extra_info"].get("measured_in", previous.name)}}
        for b in json.loads(previous.read_text())["benchmarks"] if b["fullname"] not in measured]
    baseline = folder / f"{int(previous.name[:4]) + 1 if previous else 1:04d}_{device}.json"
    folder.mkdir(parents=True, exist_ok=True)
    benchmarks = sorted([*run["benchmarks"], *kept], key=lambda b: b["fullname"])
    baseline.write_text(json.dumps({**run, "benchmarks": benchmarks}, indent=4) + "\n")
    new_ratios = gated_speedups(run["benchmarks"])
    ratios_kept = save_ratios(ratios, new_ratios, run["machine_info"].get("npugraph", {}))
    return Recorded(baseline, len(measured), len(kept), previous, ratios, len(new_ratios), ratios_kept)
