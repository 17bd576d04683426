"""`npugraph-harness check`: judge the engine under test on a matrix of scenarios, print the table,
write the reports; exit 0 only if every scenario passed."""
from __future__ import annotations

import argparse
import sys
import time

from harness.exits import EXIT_FAIL, EXIT_PASS, UsageError
from harness.inputs.scenarios import default_matrix
from reference_runner.engine.args import MODES, EngineArgs


def check(args: argparse.Namespace) -> int:
    import transformers

    from harness.judge import SETUP_ERRORS, Judge
    from harness.report import table, write_json, write_junit
    from harness.targets import get_target
    from reference_runner.attention import default_dtype
    from reference_runner.device import detect_device, resolve_device

    transformers.logging.disable_progress_bar()  # checkpoint writes and the oracle: the check prints its own lines
    validate_options(args)
    try:
        device = resolve_device(args.device) if args.device else detect_device()
        target = get_target(args.target, device)
    except (ValueError, *SETUP_ERRORS) as error:
        raise UsageError(str(error)) from None
    engine = EngineArgs.from_cli_args(args, dtype=args.dtype or default_dtype(device))
    try:
        scenarios = default_matrix(args.model, args.modes, engine, workload=args.workload,
                                   max_new_tokens=args.max_new_tokens)
        judge = Judge(target, progress=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr),
                      min_coverage=args.min_coverage)
        results = []
        for i, scenario in enumerate(scenarios, 1):
            judge.progress(f"scenario {i}/{len(scenarios)}: {scenario.name}")
            results.append(judge.run(scenario))
        print(table(results))
        if args.json:
            write_json(results, args.json, device=device, target=args.target)
        if args.junit:
            write_junit(results, args.junit)
    except (OSError, *SETUP_ERRORS) as error:
        raise UsageError(str(error)) from None
    return EXIT_PASS if all(r.passed for r in results) else EXIT_FAIL


def validate_options(args: argparse.Namespace) -> None:
    """Reject option values that no scenario could run with, before any work starts."""
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise UsageError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    for name in ("max_bs", "tp_size", "dp_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_size', '').replace('_', '-')} must be >= 1, got {value}")
    if args.min_coverage is not None and not 0 <= args.min_coverage <= 1:
        raise UsageError(f"--min-coverage must lie in 0..1, got {args.min_coverage:g}")
    max_bs = args.max_bs or EngineArgs.max_bs
    if args.graph_bs and not all(1 <= bs <= max_bs for bs in args.graph_bs):
        raise UsageError(f"--graph-bs {list(args.graph_bs)} must lie in 1..--max-bs ({max_bs})")
