"""`npugraph-harness bench`: run `suites/bench` with pytest, gated by the baselines stored for this machine
class and device (or, with `--record`, store new ones)."""
from __future__ import annotations

import argparse
import subprocess
import sys

from harness.bench.results import BASELINES, BENCH_DIR, COMPARE_FAIL, GATED_TIMES_DEVICES, machine_class, ratios_path
from harness.exits import UsageError


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
        argv.append(f"--benchmark-json={args.json}")
    sys.stdout.flush()  # the notes above come before pytest's output
    return subprocess.run(argv + args.pytest_args).returncode
