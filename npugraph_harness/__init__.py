"""npugraph-harness from Python: judge an engine's graph mode token by token, from your own code or test suite.

    import npugraph_harness

    result = npugraph_harness.check(model="/path/to/checkpoint", target="sglang", modes=["eager", "graph"])
    print(result.summary())   # the table `npugraph-harness check` prints
    result.assert_passed()    # AssertionError naming each failure and its first divergence

`check` takes the options of `npugraph-harness check` as keyword arguments, named after their flags
(`--max-new-tokens 8` is `max_new_tokens=8`, `--tp 2` is `tp=2`, a list for a comma-separated option, True for a
switch), runs the same validated plan and raises `UsageError` with the command line's one-line message for a bad
one, before any work. In pytest, the `npugraph` fixture calls it (`npugraph_harness.pytest_plugin`).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from harness.exits import UsageError

if TYPE_CHECKING:
    from harness.report import CheckResult

__all__ = ["CheckResult", "UsageError", "check"]


def check(*, progress: Callable[[str], None] | None = None, **options: Any) -> CheckResult:
    """Run `npugraph-harness check` with `options`; its result, passed or not. `progress` gets each progress line
    (default: printed on stderr). SIGINT and SIGTERM raise KeyboardInterrupt and `harness.exits.Terminated` once
    every process the check started is gone; the reports written so far are kept."""
    from harness.check import new_result, plan_check, run_check, stderr_progress
    from harness.stops import stop_signals
    from harness.targets.subprocesses import descendants_ended

    args = parse_options(options)
    with stop_signals(), descendants_ended():
        plan = plan_check(args)
        result = new_result(plan)
        run_check(plan, result, progress or stderr_progress)
    return result


def parse_options(options: dict[str, Any]) -> argparse.Namespace:
    """`options`, named after the flags of `npugraph-harness check`, parsed by its own parser."""
    from harness.cli import OneLineParser, add_check_options

    parser = OneLineParser(prog="npugraph_harness.check", add_help=False)
    add_check_options(parser)
    flags = {action.option_strings[0].removeprefix("--").replace("-", "_"): action
             for action in parser._actions if action.option_strings}
    argv = []
    for name, value in options.items():
        if name not in flags:
            raise UsageError(f"npugraph_harness.check got an unknown option {name!r}; it takes {', '.join(flags)}")
        flag = flags[name].option_strings[0]
        if isinstance(flags[name], argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"{name}={value!r}: a switch ({flag}) takes True or False")
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(os.fspath(item) if isinstance(item, os.PathLike) else str(item) for item in value)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return parser.parse_args(argv)


def __getattr__(name: str) -> Any:
    if name == "CheckResult":  # imported on first use: it brings torch
        from harness.report import CheckResult

        return CheckResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
