"""`npugraph-harness` command line: `check` (exit 0 only if every verdict passes), `bench`, `report`.

Parsing imports nothing heavy: each command's module (and torch with it) is imported only once its
options have parsed, so `--help` and bad options answer at once. Every bad input is one line on stderr
and exit 2; Ctrl-C (SIGINT) and SIGTERM stop a command cleanly, with one line and exit 130 or 143 (`stops.py`).
Whatever the exit, the command returns only once every process it started is gone.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from harness.bench.results import DEFAULT_TOLERANCE
from harness.exits import EXIT_PASS, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, Terminated, UsageError, stop_reason
from harness.stops import raise_if_stopped, stop_signals
from harness.targets import ENTRY_POINT_GROUP, TARGETS
from harness.targets.base import MIN_COVERAGE
from harness.targets.subprocesses import descendants_ended
from harness.verdicts.drift_baseline import DRIFT_GROWTH
from reference_runner.engine.args import MODES, EngineArgs, csv_items

DEFAULT_MODELS = "llama,qwen2_moe"  # one dense, one MoE
STOP_STATUS = {UsageError: EXIT_USAGE, KeyboardInterrupt: EXIT_SIGINT, Terminated: EXIT_SIGTERM}
COMMANDS = {"check": "harness.check:check", "bench": "harness.bench.run:bench", "report": "harness.bench.report:report"}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UsageError), like every other bad input, instead of usage + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_check_options(parser: argparse.ArgumentParser) -> None:
    """The options of `check`: the command line's, and the keyword arguments of `npugraph_harness.check`."""
    parser.add_argument("--model", type=csv_items, default=csv_items(DEFAULT_MODELS),
                        help="built-in names (llama, qwen2, qwen2_moe, mixtral, llama_kv1, llama_hd32, qwen3, qwen3_moe), the "
                             "real model smollm2, or checkpoint dirs, "
                             f"comma-separated (default: {DEFAULT_MODELS})")
    parser.add_argument("--modes", type=csv_items, default=["eager", "graph"], help=f"comma-separated of {', '.join(MODES)}")
    parser.add_argument("--device", default=None, help="cpu, cuda or npu (default: detected)")
    parser.add_argument("--target", default="reference",
                        help=f"engine under test: {', '.join(TARGETS)}, or one an installed package registers (entry-point "
                             f"group {ENTRY_POINT_GROUP})")
    parser.add_argument("--against", type=csv_items, default=None, metavar="TARGETS",
                        help="judge every mode against each of these other targets' eager runs (same checkpoint and "
                             "token ids, the tolerance for different kernels) instead of transformers and the target's "
                             f"own eager run; comma-separated of {', '.join(TARGETS)}")
    parser.add_argument("--workload", default="mixed", help="request mix (mixed, join_leave, skewed, batch1, batch3, ...)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens decoded per request (before per-request offsets)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--junit", type=Path, default=None, help="write JUnit XML here")
    parser.add_argument("--resume", type=Path, default=None, metavar="FILE",
                        help="take the scenarios that check report FILE (--json) holds as finished with the same options "
                             "and checkpoints from there, and run the rest")
    parser.add_argument("--min-coverage", type=float, default=None,
                        help=f"share of generated tokens a scenario must compare to pass, 0..1 (default: {MIN_COVERAGE:g})")
    parser.add_argument("--drift-baseline", type=Path, default=None, metavar="FILE",
                        help=f"fail a scenario whose drift statistics grew beyond {DRIFT_GROWTH:g}x the figures FILE stores "
                             "for it (written by --drift-record; e.g. baselines/drift-cpu.json)")
    parser.add_argument("--drift-record", type=Path, default=None, metavar="FILE",
                        help="store the drift statistics of every scenario that passed in FILE, as each ends (added to the "
                             "figures FILE holds, replacing those of the same scenario)")
    EngineArgs.add_cli_args(parser, exclude=("mode",))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="npugraph-harness", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="graph vs eager (and eager vs transformers) token by token")
    add_check_options(check)

    bench = sub.add_parser("bench", help="decode throughput benchmarks (pytest-benchmark), gated against baselines/",
                           description="Runs suites/bench and gates it with the baselines stored for this machine "
                                       "class and device. Arguments after `--` go to pytest.")
    bench.add_argument("--device", default=None, help="cpu, cuda or npu (default: detected)")
    bench.add_argument("--record", action="store_true",
                       help="merge this run into the stored baselines (absolute times and speed-ups) instead of "
                            "comparing: what it measured replaces, the rest is kept; a run that did not pass records nothing")
    bench.add_argument("--json", type=Path, default=None, help="also write pytest-benchmark's JSON here")
    bench.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --), e.g. -k llama")

    report = sub.add_parser("report", help="markdown summary and PNG charts of saved benchmark (and check) results: "
                                           "throughput, and each check scenario's drift against its stored figure")
    report.add_argument("results", type=Path, help="pytest-benchmark JSON, or a folder with bench.json (and check.json)")
    report.add_argument("--baseline", type=Path, default=None,
                        help="stored pytest-benchmark JSON to compare throughput with (default: this machine class's newest)")
    report.add_argument("--ratios", type=Path, default=None, help="stored speed-ups (default: baselines/ratios-<device>.json)")
    report.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="ratio gate tolerance")
    report.add_argument("--check", type=Path, default=None, help="check JSON (default: check.json beside the results)")
    report.add_argument("--drift-baseline", type=Path, default=None, metavar="FILE",
                        help="stored drift figures to plot each check scenario's drift against (default: "
                             "baselines/drift-<device>.json, where it exists)")
    report.add_argument("--out", type=Path, default=None,
                        help="folder for summary.md and bench.png (default: beside the results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `npugraph-harness` and `python -m harness`; returns the exit status once every process the
    command started is gone."""
    with stop_signals():
        try:
            with descendants_ended():
                args = build_parser().parse_args(argv)
                module, name = COMMANDS[args.command].split(":")
                status = getattr(importlib.import_module(module), name)(args)
            raise_if_stopped()  # a stop that something swallowed on its way up still stops the command
            return status
        except SystemExit as exit_:  # --help
            return EXIT_USAGE if exit_.code else EXIT_PASS
        except (UsageError, KeyboardInterrupt, Terminated) as error:
            print(f"npugraph-harness: {stop_reason(error)}", file=sys.stderr)
            return next(status for kind, status in STOP_STATUS.items() if isinstance(error, kind))
