"""`npugraph-harness` command line: `check` (exit 0 only if every verdict passes), `bench`, `report`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness.bench import add_bench_parser, bench
from harness.bench_report import add_report_parser, report
from harness.scenarios import MODES, default_matrix

DEFAULT_MODELS = ["llama", "qwen2_moe"]  # one dense, one MoE
EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad options or an unusable setup: reported in one line, exit status 2."""


def _csv(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


def _int_csv(value: str) -> list[int]:
    try:
        return [int(item) for item in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npugraph-harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="graph vs eager (and eager vs transformers) token by token")
    check.add_argument("--model", type=_csv, default=None,
                       help="built-in names (llama, qwen2, qwen2_moe, mixtral, llama_kv1) or checkpoint dirs, comma-separated")
    check.add_argument("--device", default=None, help="cpu, cuda or npu (default: detected)")
    check.add_argument("--target", default="reference", help="engine under test: reference or sglang")
    check.add_argument("--modes", type=_csv, default=["eager", "graph"], help=f"comma-separated of {', '.join(MODES)}")
    check.add_argument("--workload", default="mixed", help="request mix (mixed, join_leave, batch3, batch13, ...)")
    check.add_argument("--max-bs", type=int, default=8, help="largest captured batch; larger batches run eager")
    check.add_argument("--graph-bs", type=_int_csv, default=None, help="capture sizes, e.g. 1,2,4,8")
    check.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launched locally)")
    check.add_argument("--dp", type=int, default=1, help="data-parallel ranks (DP attention for MoE)")
    check.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: float32, bfloat16 on npu")
    check.add_argument("--max-new-tokens", type=int, default=32, help="tokens decoded per request (before per-request offsets)")
    check.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    check.add_argument("--junit", type=Path, default=None, help="write JUnit XML here")
    add_bench_parser(sub)
    add_report_parser(sub)
    return parser


def validate_options(args: argparse.Namespace) -> None:
    """Reject option values that no scenario could run with, before any work starts."""
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise UsageError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    for name in ("max_bs", "tp", "dp", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.graph_bs and not all(1 <= bs <= args.max_bs for bs in args.graph_bs):
        raise UsageError(f"--graph-bs {args.graph_bs} must lie in 1..--max-bs ({args.max_bs})")


def check(args: argparse.Namespace) -> int:
    import transformers

    from harness.judge import Judge
    from harness.report import table, write_json, write_junit
    from harness.targets import get_target
    from reference_runner.device import default_dtype, detect_device, resolve_device

    transformers.logging.disable_progress_bar()  # checkpoint writes and the oracle: the check prints its own lines
    validate_options(args)
    device = resolve_device(args.device) if args.device else detect_device()
    try:
        target = get_target(args.target, device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    scenarios = default_matrix(
        args.model or DEFAULT_MODELS, args.modes, workload=args.workload, tp=args.tp, dp=args.dp,
        dtype=args.dtype or default_dtype(device), max_bs=args.max_bs, graph_bs=tuple(args.graph_bs) if args.graph_bs else None,
        max_new_tokens=args.max_new_tokens,
    )
    judge = Judge(target, progress=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr))
    results = []
    for i, scenario in enumerate(scenarios, 1):
        judge.progress(f"scenario {i}/{len(scenarios)}: {scenario.name}")
        results.append(judge.run(scenario))
    print(table(results))
    if args.json:
        write_json(results, args.json, device=device, target=args.target)
    if args.junit:
        write_junit(results, args.junit)
    return EXIT_PASS if all(r.passed for r in results) else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    """Entry point of `npugraph-harness` and `python -m harness`; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else EXIT_PASS
    commands = {"check": check, "bench": bench, "report": report}
    from harness.judge import SETUP_ERRORS

    try:
        return commands[args.command](args)
    except (UsageError, OSError, *SETUP_ERRORS) as error:
        print(f"npugraph-harness: error: {error}", file=sys.stderr)
        return EXIT_USAGE
