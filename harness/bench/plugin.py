"""pytest plugin for `suites/bench`: baseline storage per machine class, machine info, the ratio gate.

Loaded by the root conftest (`pytest_plugins`). `pyproject.toml` skips benchmarks by default (`--benchmark-skip`);
naming `suites/bench` (or anything inside it) on the command line runs them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.bench.results import (
    BASELINES,
    BENCH_DIR,
    DEFAULT_TOLERANCE,
    load_ratios,
    machine_class,
    processor_name,
    ratio_gate,
    results_from_benchmarks,
    speedups,
    stored_names,
)
from reference_runner.device import DeviceUnavailable, detect_device, resolve_device

DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default


def pytest_addoption(parser):
    group = parser.getgroup("ratio gate", "speed-ups over eager, measured in one run, against stored ones")
    group.addoption("--ratio-baseline", type=Path, default=None, metavar="FILE",
                    help="fail when a stored graph/eager or compile/eager speed-up drops by more than --ratio-tolerance")
    group.addoption("--ratio-tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="FRACTION",
                    help=f"largest allowed relative drop of a speed-up (default {DEFAULT_TOLERANCE})")
    group.addoption("--plant-replay-slowdown", type=int, default=1, metavar="N",
                    help="the gate's own check: every graph replay in suites/bench runs N times over, a planted N-fold "
                         "slowdown that the ratio gate must fail (`npugraph-harness bench -- --plant-replay-slowdown 2`)")


def _device(config) -> str | None:
    try:
        name = config.getoption("device", None)  # None outside this checkout (`-p harness.bench.plugin`)
        return resolve_device(name) if name else detect_device()
    except DeviceUnavailable:
        return None  # the root conftest reports it


def _names_bench_dir(config) -> bool:
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(p == BENCH_DIR or BENCH_DIR in p.parents for p in paths)


def pytest_configure(config):
    # Runs before pytest-benchmark's own configure (trylast), which reads these options.
    opt = config.option
    if not hasattr(opt, "benchmark_skip"):  # pytest-benchmark disabled (-p no:benchmark)
        return
    if _names_bench_dir(config):
        opt.benchmark_skip = False
    device = _device(config)
    if device is None:
        return
    runs = not opt.benchmark_skip or opt.benchmark_only
    # Only where benchmarks run: the processor's name costs a second on the CPU (py-cpuinfo) and starts CUDA on cuda.
    if runs and opt.benchmark_storage == DEFAULT_STORAGE:
        opt.benchmark_storage = f"file://{BASELINES / machine_class(device, processor_name(device))}"
    if runs and opt.benchmark_compare is True and opt.benchmark_storage.startswith("file://"):
        _require_stored_baseline(Path(opt.benchmark_storage.removeprefix("file://")))
    if opt.plant_replay_slowdown < 1:
        raise pytest.UsageError(f"--plant-replay-slowdown must be >= 1 (replays per replay), got {opt.plant_replay_slowdown}")
    if opt.ratio_baseline and not opt.ratio_baseline.is_file():
        raise pytest.UsageError(f"--ratio-baseline {opt.ratio_baseline}: no such file; record one with "
                                f"`npugraph-harness bench --record` (on {device})")
    if opt.ratio_baseline and load_ratios(opt.ratio_baseline, processor_name(device)) is None:
        raise pytest.UsageError(f"--ratio-baseline {opt.ratio_baseline}: no speed-ups stored for {processor_name(device)} "
                                f"(it holds {', '.join(stored_names(opt.ratio_baseline)) or 'none'}); record them with "
                                f"`npugraph-harness bench --record` (on {device})")


def _require_stored_baseline(storage: Path) -> None:
    """Fail before any benchmark runs, rather than with pytest-benchmark's usage error after all of them."""
    from pytest_benchmark.utils import get_machine_id

    folder = storage / get_machine_id()
    if not list(folder.glob("[0-9][0-9][0-9][0-9]_*.json")):
        raise pytest.UsageError(
            f"--benchmark-compare: no stored baseline for this machine class ({folder} is empty or missing). "
            "Record one on a quiet machine with `npugraph-harness bench --record` (`tox -e bench -- --record`), "
            "commit baselines/, then compare.")


# What differs between two instances of the same hardware: host name, kernel build, the clock py-cpuinfo measures at
# boot, py-cpuinfo's own version. pytest-benchmark warns (4 KB) on any difference from the compared baseline's
# machine_info; without these fields it warns where the hardware or the software stack differs.
PER_INSTANCE = ("node", "release")
PER_INSTANCE_CPU = ("hz_actual", "hz_actual_friendly", "hz_advertised", "hz_advertised_friendly", "cpuinfo_version",
                    "cpuinfo_version_string", "python_version")


def stable_machine_info(machine_info: dict) -> dict:
    """`machine_info` without the fields that differ between instances of the same hardware."""
    cpu = {k: v for k, v in machine_info.get("cpu", {}).items() if k not in PER_INSTANCE_CPU}
    return {**{k: v for k, v in machine_info.items() if k not in PER_INSTANCE}, "cpu": cpu}


def pytest_benchmark_update_machine_info(config, machine_info):
    stable = stable_machine_info(machine_info)
    machine_info.clear()
    machine_info.update(stable)
    device = _device(config) or "unknown"
    machine_info["npugraph"] = {
        "torch": torch.__version__,
        "device": device,
        "device_name": processor_name(device) if device != "unknown" else "?",
        "threads": torch.get_num_threads(),
    }


def pytest_sessionfinish(session):
    config = session.config
    opt = config.option
    bench_session = getattr(config, "_benchmarksession", None)
    if bench_session is None or not opt.ratio_baseline:
        return
    measured = speedups(results_from_benchmarks([b.as_dict(include_data=False) for b in bench_session.benchmarks if b]))
    stored = load_ratios(opt.ratio_baseline, processor_name(_device(config)))
    config._ratio_checks = ratio_gate(measured, stored, opt.ratio_tolerance)
    if not all(check.passed for check in config._ratio_checks):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True, trylast=True)  # around pytest-benchmark's summary, and only it
def pytest_terminal_summary(terminalreporter, config):
    """The ratio gate's section, after pytest-benchmark's tables. pytest-benchmark raises out of its summary when
    `--benchmark-compare-fail` finds a regression, which would end the run in a traceback: its log lines above
    already name each regression, so the run fails with one line more."""
    from pytest_benchmark.session import PerformanceRegression

    try:
        yield
        regressed = False
    except PerformanceRegression:
        regressed = True
    _ratio_gate_section(terminalreporter, config)
    if regressed:
        terminalreporter.write_line("absolute times regressed beyond --benchmark-compare-fail (listed above)",
                                    red=True, bold=True)
        terminalreporter._session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _ratio_gate_section(terminalreporter, config) -> None:
    checks = getattr(config, "_ratio_checks", None)
    if checks is None:
        return
    failed = [c for c in checks if not c.passed]
    terminalreporter.section(f"ratio gate ({config.option.ratio_baseline}, tolerance {config.option.ratio_tolerance:g})",
                             red=bool(failed), green=not failed)
    if not checks:
        terminalreporter.write_line("no stored speed-up was measured in this run: nothing compared")
    for check in checks:
        terminalreporter.write_line(str(check), red=not check.passed)
    if failed:
        terminalreporter.write_line(f"{len(failed)} of {len(checks)} speed-ups dropped by more than the tolerance",
                                    red=True, bold=True)
