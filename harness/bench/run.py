"""`npugraph-harness bench`: run `suites/bench` with pytest, gated by the baselines stored for this machine
class and device (or, with `--record`, merge a passing run into them: `harness/bench/record.py`).

pytest runs in the source checkout (`--rootdir` and working directory: its conftest, pyproject.toml and
baselines/), whatever directory `bench` is started from; its exit statuses map onto the command line's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.bench.record import record, stored_baselines
from harness.bench.results import (
    BASELINES,
    BENCH_DIR,
    COMPARE_FAIL,
    GATED_TIMES_DEVICES,
    ROOT,
    load_ratios,
    machine_class,
    processor_name,
    ratios_path,
)
from harness.exits import EXIT_FAIL, EXIT_PASS, EXIT_SIGINT, UsageError

# pytest's exit statuses: 0 passed, 1 tests failed, 2 interrupted, 3 internal error, 4 usage error, 5 nothing collected.
PYTEST_EXITS = {0: EXIT_PASS, 1: EXIT_FAIL, 2: EXIT_SIGINT}
PYTEST_SETUP_ERRORS = {3: "pytest stopped with an internal error (exit 3; its output above says where)",
                       4: "pytest refused its arguments (exit 4; see above)",
                       5: "no benchmark was collected (pytest exit 5): nothing was measured"}


def bench(args: argparse.Namespace) -> int:
    """Run the benchmarks with pytest and gate them with the stored baselines that exist (or, with --record,
    merge a passing run into them); say which gate has nothing stored."""
    from pytest_benchmark.utils import get_machine_id

    from reference_runner.device import detect_device, resolve_device

    if not BENCH_DIR.is_dir():
        raise UsageError(f"{BENCH_DIR} not found: `bench` runs from a source checkout")
    if args.record and any(arg.startswith("--plant-replay-slowdown") for arg in args.pytest_args):
        raise UsageError("bench --record: a run with a planted replay slowdown (--plant-replay-slowdown) is no baseline")
    device = resolve_device(args.device) if args.device else detect_device()
    name = processor_name(device)
    storage, ratios = BASELINES / machine_class(device, name), ratios_path(device)
    argv = [sys.executable, "-m", "pytest", str(BENCH_DIR), f"--ignore={BENCH_DIR / 'test_moe_formulations.py'}",
            "--benchmark-only", f"--device={device}", f"--benchmark-storage=file://{storage}"]
    if not args.record:
        # Absolute times hold on the machine class that stored them; speed-ups on any machine of the same processor.
        if stored_baselines(storage / get_machine_id()):
            argv.append("--benchmark-compare")
            if device in GATED_TIMES_DEVICES:
                argv.append(f"--benchmark-compare-fail={COMPARE_FAIL}")
        else:
            print(f"bench: no absolute baseline for {storage / get_machine_id()}: times not compared "
                  f"(`npugraph-harness bench --record` stores one)")
        if ratios.is_file() and load_ratios(ratios, name) is not None:
            argv.append(f"--ratio-baseline={ratios}")
        else:
            print(f"bench: no stored speed-ups for {name} in {ratios}: ratio gate off "
                  "(`npugraph-harness bench --record` stores them)")
    with tempfile.TemporaryDirectory(prefix="npugraph-bench-") as scratch:
        results = args.json or (Path(scratch) / "bench.json" if args.record else None)
        if results:
            results.parent.mkdir(parents=True, exist_ok=True)
            argv.append(f"--benchmark-json={results.resolve()}")  # pytest runs in the checkout, not here
        sys.stdout.flush()  # the notes above come before pytest's output
        code = subprocess.run([*argv, f"--rootdir={ROOT}", *args.pytest_args], cwd=ROOT).returncode
        if code in PYTEST_SETUP_ERRORS:
            raise UsageError(f"bench: {PYTEST_SETUP_ERRORS[code]}")
        if code not in PYTEST_EXITS:
            raise UsageError(f"bench: pytest exited with status {code}")
        if args.record and code == 0:
            print(*record(json.loads(results.read_text()), storage / get_machine_id(), device, ratios).lines(), sep="\n")
        elif args.record:  # a benchmark failed, or the run was interrupted: its numbers are not a baseline
            print(f"bench --record: nothing recorded, the run did not pass; {BASELINES} is unchanged"
                  + (f" (this run's results: {args.json})" if args.json else ""))
    return PYTEST_EXITS[code]
