"""A property of the command line: any combination of options, valid or not, exits 0, 1 or 2 without a
traceback; exit 2 says one thing before any work (no progress line); exit 0 reports scenarios that each
judged at least one request. Valid values keep a run to seconds (one or three requests, at most three
tokens, eager and graph); `compile`, several ranks and absent devices are left to their own tests."""
import contextlib
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cli import main

EXAMPLES = {False: 30, True: 300}  # default run, --nightly
ALWAYS = ("--model", "--workload", "--max-new-tokens", "--json")  # on every line: no valid line runs the defaults


def option_values(report: str, folder: str) -> dict[str, tuple[list[str], list[str]]]:
    """Per flag: (valid values, invalid values)."""
    return {
        "--model": (["llama", "qwen2"], ["", ",", "nope", "llama,llama", "llama,", folder]),
        "--modes": (["eager", "graph", "eager,graph"], ["", ",", "turbo", "eager,eager", "graph,"]),
        "--workload": (["batch1", "batch3"], ["", "nope"]),
        "--max-new-tokens": (["1", "3"], ["0", "-1", "100000", "x"]),
        "--max-bs": (["2", "8"], ["0", "-5", "100000"]),
        "--graph-bs": (["1", "1,2"], ["", ",", "0", "2,2", "99"]),
        "--tp": (["1"], ["0", "3", "1000000"]),
        "--dp": (["1"], ["0", "-1", "1000000"]),
        "--max-context": (["64", "256"], ["0", "8", "2048", "1000000000"]),
        "--block-size": (["8", "16"], ["0", "-1"]),
        "--num-blocks": (["64"], ["0", "1", "1000000000000"]),
        "--top-k": (["5"], ["0", "1000000"]),
        "--dtype": (["float32"], ["float8", ""]),
        "--device": (["cpu"], ["tpu", ""]),
        "--target": (["reference"], ["tgi", ""]),
        "--json": ([report], [folder]),
    }


@st.composite
def command_lines(draw, values: dict[str, tuple[list[str], list[str]]]) -> list[str]:
    """`check` with a value for some flags: mostly valid, up to three flags given an invalid one."""
    bad = draw(st.permutations(sorted(values)))[: draw(st.sampled_from([0, 1, 1, 2, 3]))]
    argv = ["check"]
    for flag, (valid, invalid) in values.items():
        value = draw(st.sampled_from(invalid if flag in bad else valid if flag in ALWAYS else [None, *valid]))
        argv += [] if value is None else [flag, value]
    return argv


def test_any_command_line_exits_0_1_or_2_without_a_traceback_and_never_passes_on_nothing(tmp_path, pytestconfig):
    report = tmp_path / "check.json"
    nightly = pytestconfig.getoption("--nightly")
    statuses = []

    @settings(max_examples=EXAMPLES[nightly], deadline=None, derandomize=not nightly, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(argv=command_lines(option_values(str(report), str(tmp_path))))
    def exits_cleanly(argv: list[str]) -> None:
        report.unlink(missing_ok=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
        lines = err.getvalue().splitlines()
        assert status in (0, 1, 2) and "Traceback" not in err.getvalue(), err.getvalue()
        if status == 2:
            assert lines[-1].startswith("npugraph-harness: error: ") and not any(x.startswith("[") for x in lines), lines
        if status == 0:
            doc = json.loads(report.read_text())
            assert doc["passed"] and doc["scenarios"]
            assert all(sum(s["verdicts"].values()) > 0 for s in doc["scenarios"])
        statuses.append(status)

    exits_cleanly()
    assert {0, 2} <= set(statuses)  # both sides of the property were exercised
