"""`npugraph-harness bench`: run `suites/bench` with pytest, gated by the baselines stored for this machine
class and device (or, with `--record`, store new ones).

pytest runs in the source checkout (`--rootdir` and working directory: its conftest, pyproject.toml and
baselines/), whatever directory `bench` is started from; its exit statuses map onto the command line's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from harness.bench.results import (
    BASELINES,
    BENCH_DIR,
    COMPARE_FAIL,
    GATED_TIMES_DEVICES,
    ROOT,
    machine_class,
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
    store new ones); say which gate has nothing stored."""
    from pytest_benchmark.utils import get_machine_id

    from reference_runner.device import detect_device, resolve_device

    if not BENCH_DIR.is_dir():
        raise UsageError(f"{BENCH_DIR} not found: `bench` runs from a source checkout")
    device = resolve_device(args.device) if args.device else detect_device()
    storage, ratios = BASELINES / machine_class(device), ratios_path(device)
    argv = [sys.executable, "-m", "pytest", str(BENCH_DIR), f"--ignore={BENCH_DIR / 'test_moe_formulations.py'}",
            "--benchmark-only", f"--device={device}", f"--benchmark-storage=file://{storage}"]
    if args.record:
        argv += [f"--benchmark-save={device}", f"--ratio-save={ratios}"]
    else:
        # Absolute times hold on the machine class that stored them; speed-ups on any machine of the device.
        if list((storage / get_machine_id()).glob("[0-9][0-9][0-9][0-9]_*.json")):
            argv.append("--benchmark-compare")
            if device in GATED_TIMES_DEVICES:
                argv.append(f"--benchmark-compare-fail={COMPARE_FAIL}")
        else:
            print(f"bench: no absolute baseline for {storage / get_machine_id()}: times not compared "
                  f"(`npugraph-harness bench --record` stores one)")
        if ratios.is_file():
            argv.append(f"--ratio-baseline={ratios}")
        else:
            print(f"bench: no stored speed-ups {ratios}: ratio gate off (`npugraph-harness bench --record` stores them)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        argv.append(f"--benchmark-json={args.json.resolve()}")  # pytest runs in the checkout, not here
    sys.stdout.flush()  # the notes above come before pytest's output
    code = subprocess.run([*argv, f"--rootdir={ROOT}", *args.pytest_args], cwd=ROOT).returncode
    if code in PYTEST_SETUP_ERRORS:
        raise UsageError(f"bench: {PYTEST_SETUP_ERRORS[code]}")
    if code not in PYTEST_EXITS:
        raise UsageError(f"bench: pytest exited with status {code}")
    return PYTEST_EXITS[code]
