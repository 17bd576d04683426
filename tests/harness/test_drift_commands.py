"""Precision baselines on the command line: `check --drift-record FILE` stores each passed scenario's drift
statistics as it ends, `check --drift-baseline FILE` fails a scenario whose drift grew beyond them, a bad file is
one line and exit 2 before any work, and `report` shows and plots each scenario's drift against its stored figure."""
import json

import pytest

from harness.cli import main
from harness.verdicts.drift import DriftStats
from harness.verdicts.drift_baseline import DRIFT_GROWTH, DriftBaseline
from suites.faults import FAULTS

# Eager against transformers and graph against eager on llama, 121 compared steps each: enough to be judged (in a
# dtype whose noise profiles are measured).
CHECK = ["check", "--model", "llama", "--modes", "eager,graph", "--max-new-tokens", "20", "--dtype", "bfloat16"]
STEPS = 8 * 20 - 39  # the mixed workload's requests stop 39 tokens short of 8 x 20


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert (out, len(err.splitlines())) == ("", 1), err
    return err.rstrip("\n")


def test_a_missing_drift_baseline_is_refused_with_one_line(tmp_path, capsys):
    missing = tmp_path / "drift.json"
    assert refused([*CHECK, "--drift-baseline", str(missing)], capsys) == (
        f"npugraph-harness: error: --drift-baseline {missing}: no such file (record one with --drift-record)")


@pytest.mark.parametrize("option", ["--drift-baseline", "--drift-record"])
def test_a_file_that_holds_no_drift_figures_is_refused_with_one_line(tmp_path, capsys, option):
    report = tmp_path / "check.json"
    report.write_text(json.dumps({"passed": True, "scenarios": []}))
    assert refused([*CHECK, option, str(report)], capsys) == (
        f"npugraph-harness: error: {option} {report}: not a drift baseline written by --drift-record (ValueError: not a "
        "drift baseline of format 1 (written by check --drift-record))")


def test_recorded_figures_pass_the_same_run_and_are_printed_in_the_table(tmp_path, capsys):
    figures = tmp_path / "baselines" / "drift-cpu.json"
    assert main([*CHECK, "--drift-record", str(figures)]) == 0
    stored = DriftBaseline.load(figures)
    assert [(r.scenario.name, r.drift.steps) for r in stored.records] == [
        ("llama-eager-vs-oracle-mixed", STEPS), ("llama-graph-vs-eager-mixed", STEPS)]
    capsys.readouterr()
    assert main([*CHECK, "--drift-baseline", str(figures), "--json", str(tmp_path / "check.json")]) == 0
    out = capsys.readouterr().out
    assert f"    drift: {STEPS} steps: |dlogprob| mean " in out
    assert (f"within the noise profile reference/cpu/bfloat16/across_kernels; within {DRIFT_GROWTH:g}x the figures stored "
            f"in {figures}") in out
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["drift_baseline"] == str(figures)
    assert [DriftStats.from_dict(s["drift"]) for s in doc["scenarios"]] == [r.drift for r in stored.records]


def shrunk(path, factor: float) -> None:
    """The stored figures of `path` times `factor`, as if recorded by a run that drifted less."""
    doc = json.loads(path.read_text())
    for record in doc["records"]:
        drift = record["drift"]
        for name in ("mean_abs_diff", "p99_abs_diff", "max_abs_diff", "mean_kl", "p99_kl", "max_kl"):
            drift[name] *= factor
    path.write_text(json.dumps(doc))


def test_drift_grown_beyond_its_stored_figure_fails_the_scenario(tmp_path):
    figures, report = tmp_path / "drift.json", tmp_path / "check.json"
    assert main([*CHECK, "--modes", "eager", "--drift-record", str(figures)]) == 0
    shrunk(figures, 0.5)
    assert main([*CHECK, "--modes", "eager", "--drift-baseline", str(figures), "--json", str(report)]) == 1
    (scenario,) = json.loads(report.read_text())["scenarios"]
    assert scenario["verdicts"]["mismatch"] == 0
    assert [f.split(":")[0] for f in scenario["failures"]] == ["drift grew beyond the baseline"] * 4
    assert f"({DRIFT_GROWTH:g}x " in scenario["failures"][0] and f"stored in {figures} by torch " in scenario["failures"][0]


def test_only_scenarios_that_passed_are_recorded(tmp_path, monkeypatch):
    figures = tmp_path / "drift.json"
    FAULTS["positions_not_refreshed"].inject(monkeypatch)
    assert main([*CHECK, "--drift-record", str(figures)]) == 1
    assert [r.scenario.name for r in DriftBaseline.load(figures).records] == ["llama-eager-vs-oracle-mixed"]


def test_report_shows_and_plots_each_scenarios_drift_against_its_stored_figure(tmp_path, capsys):
    results, figures = tmp_path / "results", tmp_path / "drift.json"
    assert main([*CHECK, "--modes", "eager", "--drift-record", str(figures), "--json", str(results / "check.json")]) == 0
    shrunk(figures, 0.5)
    (results / "bench.json").write_text(json.dumps({"machine_info": {"npugraph": {"device": "cpu"}}, "benchmarks": [
        {"name": "test_decode_step[llama-1-eager]", "stats": {"min": 1e-3, "median": 1e-3},
         "extra_info": {"model": "llama", "kind": "step", "mode": "eager", "bs": 1, "tokens": 1}}]}))
    capsys.readouterr()
    assert main(["report", str(results), "--drift-baseline", str(figures), "--ratios", str(tmp_path / "none.json")]) == 0
    summary = (results / "summary.md").read_text()
    assert "## Precision drift" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| llama-eager-vs-oracle-mixed bfloat16 |"))
    assert row.endswith("| mean \\|delta logprob\\|, mean KL divergence |")  # the flips were not scaled
    assert (results / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip().endswith(f"and {results / 'drift.png'}")


def test_a_resumed_scenario_keeps_its_drift_and_is_recorded(tmp_path):
    report, figures = tmp_path / "check.json", tmp_path / "drift.json"
    assert main([*CHECK, "--modes", "eager", "--json", str(report)]) == 0
    (first,) = json.loads(report.read_text())["scenarios"]
    assert main([*CHECK, "--modes", "eager", "--json", str(report), "--resume", str(report), "--drift-record",
                 str(figures)]) == 0
    (resumed,) = json.loads(report.read_text())["scenarios"]
    assert (resumed["drift"], resumed["drift_judged"]) == (first["drift"], first["drift_judged"])
    assert [r.drift.as_dict() for r in DriftBaseline.load(figures).records] == [first["drift"]]
