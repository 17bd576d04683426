"""Benchmark results: speed-ups over eager, the ratio gate and the performance goals.

Absolute times hold on the machine class that stored them. Ratios measured in one run hold on any machine with
the same processor or accelerator, but not across them (llama's compile/eager at batch 1: 5.2x on an AMD EPYC,
3.5x on an Intel Xeon with AVX-512), so both are stored per processor or accelerator. The ratio gate compares
each mode's speed-up over eager (same model, kind and batch size, same session) with the stored one. Each
speed-up is measured by its benchmark, against eager rounds interleaved with its own (see
`suites/bench/conftest.py`), and stored in its `extra_info`; throughput is reported at the median.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "suites" / "bench"
BASELINES = ROOT / "baselines"
GATED_MODES = ("graph", "compile")  # speed-ups the ratio gate holds; eager is the unit, hf the peer
# Only the decode step's: a 32-token loop round (~50 ms) sees the load of a shared machine change
# within it, and its speed-up swung 2x between runs here; loops are reported, not gated.
GATED_KINDS = ("step",)
# Over 8 full runs of one tree on the shared 2-core CPU runner under load, a gated speed-up fell at most 21% below the
# stored one (a compile/eager one; graph/eager at most 6%), over 10 idle ones at most 7%; a planted 2x slowdown of
# graph replay halves the graph ones and cuts the compiled ones by 17-46%.
DEFAULT_TOLERANCE = 0.3
# Absolute times gate only on the dedicated accelerator hosts, at the fastest round (the median moves with
# load). On the shared CPU runners here the fastest round itself moved up to +69% between two runs of an
# unchanged tree, much more than the speed-ups: there the times are compared and shown, and the ratio gate
# fails the run.
COMPARE_FAIL = "min:30%"
GATED_TIMES_DEVICES = ("npu", "cuda")


@dataclass(frozen=True)
class BenchResult:
    """One benchmark: what ran (from its `extra_info`) and its median and fastest time per call."""

    model: str
    kind: str  # "step": one decode step; "loop": a whole generate call of `tokens` tokens
    mode: str  # eager, graph, compile, or hf (Hugging Face generate, the peer)
    bs: int
    tokens: int  # tokens produced per call
    median_s: float
    min_s: float
    speedup: float | None  # over eager, measured interleaved with it; 1.0 for eager itself

    @property
    def key(self) -> str:
        return f"{self.model}/{self.kind}/bs{self.bs}/{self.mode}"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s


def results_from_benchmarks(benchmarks: list[dict]) -> list[BenchResult]:
    """Results from pytest-benchmark's `benchmarks` list (its JSON, or `Metadata.as_dict()`)."""
    fields = ("model", "kind", "mode", "bs", "tokens")
    return [BenchResult(**{f: b["extra_info"][f] for f in fields}, median_s=b["stats"]["median"], min_s=b["stats"]["min"],
                        speedup=b["extra_info"].get("speedup_vs_eager"))
            for b in benchmarks if all(f in b["extra_info"] for f in fields)]


@dataclass(frozen=True)
class CostRatio:
    """A time-to-verdict ratio measured in one run (`suites/bench/test_time_to_verdict.py`), required at most `limit`."""

    ratio: str  # e.g. "check_vs_transformers": the check's seconds over the reference's
    model: str
    measured: float
    limit: float
    seconds: dict[str, float]  # each side's seconds

    @property
    def met(self) -> bool:
        return self.measured <= self.limit


def cost_ratios_from_benchmarks(benchmarks: list[dict]) -> list[CostRatio]:
    """The time-to-verdict ratios among pytest-benchmark's `benchmarks` (those whose `extra_info` holds one)."""
    fields = [f.name for f in dataclasses.fields(CostRatio)]
    return [CostRatio(**{f: b["extra_info"][f] for f in fields}) for b in benchmarks
            if all(f in b["extra_info"] for f in fields)]


def load_results(path: Path) -> tuple[list[BenchResult], list[CostRatio], dict]:
    """The results, time-to-verdict ratios and machine info of a pytest-benchmark JSON file (`--benchmark-json` or
    a stored one)."""
    doc = json.loads(Path(path).read_text())
    benchmarks = doc["benchmarks"]
    return results_from_benchmarks(benchmarks), cost_ratios_from_benchmarks(benchmarks), doc.get("machine_info", {})


def speedups(results: list[BenchResult]) -> dict[str, float]:
    """Each non-eager result's speed-up over eager, by key."""
    return {r.key: r.speedup for r in results if r.mode != "eager" and r.speedup is not None}


@functools.cache
def processor_name(device: str) -> str:
    """What baselines are stored under: the accelerator's name, or on the CPU the processor's brand as
    pytest-benchmark's machine_info records it (py-cpuinfo's `brand_raw`, `AMD EPYC`)."""
    if device != "cpu":
        from reference_runner.device import device_name

        return device_name(device)
    import cpuinfo  # pytest-benchmark's dependency

    return cpuinfo.get_cpu_info().get("brand_raw") or platform.machine()


def machine_class(device: str, name: str, arch: str | None = None) -> str:
    """Where the absolute baselines of a device named `name` live under `baselines/` (`cpu-x86_64-amd-epyc`; this
    host's architecture by default): pytest-benchmark's machine id (`Linux-CPython-3.11-64bit`) names none of them."""
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", name.lower())).strip("-")
    return f"{device}-{arch or platform.machine()}-{slug}"


def ratios_path(device: str) -> Path:
    return BASELINES / f"ratios-{device}.json"


def stored_machines(path: Path) -> dict[str, dict]:
    """Per device name, what `path` stores: its `machine` and its `speedups`."""
    return json.loads(Path(path).read_text())["machines"]


def load_ratios(path: Path, name: str) -> dict[str, float] | None:
    """The speed-ups `path` stores for the device named `name`, or None where it stores none for it."""
    machine = stored_machines(path).get(name)
    return None if machine is None else machine["speedups"]


def stored_names(path: Path) -> list[str]:
    """The devices `path` stores speed-ups for."""
    return sorted(stored_machines(path))


@dataclass(frozen=True)
class RatioCheck:
    """A measured speed-up against its stored value: it fails below `stored * (1 - tolerance)`."""

    key: str
    stored: float
    measured: float
    tolerance: float

    @property
    def floor(self) -> float:
        return self.stored * (1 - self.tolerance)

    @property
    def passed(self) -> bool:
        return self.measured >= self.floor

    def __str__(self) -> str:
        verdict = "ok" if self.passed else f"FAIL: below {self.floor:.2f}x"
        return f"{self.key}: {self.measured:.2f}x (stored {self.stored:.2f}x) {verdict}"


def ratio_gate(measured: dict[str, float], stored: dict[str, float], tolerance: float) -> list[RatioCheck]:
    """Checks of every stored speed-up that this run measured (keys not measured are not judged)."""
    return [RatioCheck(key, stored[key], measured[key], tolerance) for key in sorted(stored) if key in measured]


@dataclass(frozen=True)
class SpeedGoal:
    """`faster` must run at least `factor` times the speed of `slower` (same model, kind and batch size)."""

    what: str
    model: str
    kind: str
    bs: int
    faster: str
    slower: str
    factor: float
    devices: tuple[str, ...]

    def measure(self, results: list[BenchResult]) -> float | None:
        """Against eager, the interleaved speed-up; against another mode, the ratio of fastest rounds."""
        runs = {r.mode: r for r in results if (r.model, r.kind, r.bs) == (self.model, self.kind, self.bs)}
        if self.faster not in runs or self.slower not in runs:
            return None
        if self.slower == "eager":
            return runs[self.faster].speedup
        return runs[self.slower].min_s / runs[self.faster].min_s


# The performance goals of the benchmarks, on the tiny llama; reported, not gated.
GOALS = [
    *(SpeedGoal(f"compiled decode step >= {f:g}x eager", "llama", "step", bs, "compile", "eager", f, ("cpu",))
      for bs, f in [(1, 5.0), (8, 4.0)]),
    *(SpeedGoal("SimNPUGraph replay within 1.3x of eager's time", "llama", "step", bs, "graph", "eager", 1 / 1.3, ("cpu",))
      for bs in (1, 8)),
    *(SpeedGoal("compiled >= 3x HF generate tokens/s", "llama", "loop", bs, "compile", "hf", 3.0, ("cpu",))
      for bs in (1, 8)),
    *(SpeedGoal("compiled not slower than eager", "llama", kind, bs, "compile", "eager", 1.0, ("cpu", "cuda", "npu"))
      for kind in ("step", "loop") for bs in (1, 8, 32)),
    SpeedGoal("device graph beats eager", "llama", "step", 1, "graph", "eager", 1.0, ("cuda", "npu")),
]
