"""`check` loses nothing finished: its JSON and JUnit files are rewritten as each scenario ends and say whether the
run is complete; a scenario the harness itself fails to finish fails alone; `--resume` takes the finished scenarios
of a report made with the same options and checkpoints, and runs the rest."""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.cli import main
from harness.inputs.checkpoints import ensure_checkpoint
from harness.judge import Judge

FAST = ["check", "--model", "llama,qwen2", "--modes", "eager", "--workload", "batch1", "--max-new-tokens", "2"]
NAMES = ["llama-eager-vs-oracle-batch1", "qwen2-eager-vs-oracle-batch1"]


def scenario_lines(err: str) -> list[str]:
    """The progress lines that start each scenario, without their time stamps."""
    return [line.split("] ", 1)[1] for line in err.splitlines() if "] scenario " in line]


def test_the_reports_hold_each_scenario_as_soon_as_it_ends(tmp_path, monkeypatch):
    report, junit, seen = tmp_path / "check.json", tmp_path / "check.xml", []
    run = Judge.run

    def run_reading_the_reports(judge, scenario):
        doc = json.loads(report.read_text())
        cases = ET.parse(junit).getroot().findall("testcase")
        seen.append(([s["name"] for s in doc["scenarios"]], doc["pending"], doc["complete"],
                     [c.find("skipped") is not None for c in cases]))
        return run(judge, scenario)

    monkeypatch.setattr(Judge, "run", run_reading_the_reports)
    assert main([*FAST, "--json", str(report), "--junit", str(junit)]) == 0
    assert seen == [([], NAMES, False, [True, True]), (NAMES[:1], NAMES[1:], False, [False, True])]
    doc = json.loads(report.read_text())
    assert (doc["complete"], doc["passed"], doc["stopped_by"], doc["pending"]) == (True, True, None, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json", "check.xml"]  # no temporary file left


def test_a_scenario_that_raises_inside_the_harness_fails_with_its_error_and_the_next_still_runs(tmp_path, monkeypatch,
                                                                                                 capsys):
    report = tmp_path / "check.json"
    run = Judge.run

    def first_raises(judge, scenario):
        if scenario.model == "llama":
            raise RuntimeError("injected")
        return run(judge, scenario)

    monkeypatch.setattr(Judge, "run", first_raises)
    assert main([*FAST, "--json", str(report)]) == 1
    doc = json.loads(report.read_text())
    assert [(s["name"], s["passed"], s["failures"]) for s in doc["scenarios"]] == [
        (NAMES[0], False, ["internal error: RuntimeError: injected"]), (NAMES[1], True, [])]
    assert doc["complete"] is True
    assert "RuntimeError: injected" in capsys.readouterr().err  # its traceback, for the bug report


def test_a_run_stopped_by_an_error_outside_any_scenario_keeps_what_finished_and_says_why(tmp_path, monkeypatch):
    report, junit = tmp_path / "check.json", tmp_path / "check.xml"
    run = Judge.run

    def stop_at_the_second(judge, scenario):
        if scenario.model == "qwen2":
            raise KeyboardInterrupt
        return run(judge, scenario)

    monkeypatch.setattr(Judge, "run", stop_at_the_second)
    assert main([*FAST, "--json", str(report), "--junit", str(junit)]) == 130
    doc = json.loads(report.read_text())
    assert (doc["complete"], doc["passed"], doc["stopped_by"]) == (False, False, "stopped by SIGINT (Ctrl-C)")
    assert ([s["name"] for s in doc["scenarios"]], doc["pending"]) == (NAMES[:1], NAMES[1:])
    (skipped,) = ET.parse(junit).getroot().iter("skipped")
    assert skipped.get("message") == "not run: stopped by SIGINT (Ctrl-C)"


def finished_report(tmp_path: Path, *options: str) -> Path:
    report = tmp_path / "first.json"
    assert main([*FAST, *options, "--json", str(report)]) == 0
    return report


def test_resume_runs_only_the_scenarios_the_report_does_not_hold(tmp_path, capsys):
    report = tmp_path / "first.json"
    assert main([*FAST[:2], "llama", *FAST[3:], "--json", str(report)]) == 0
    capsys.readouterr()
    assert main([*FAST, "--resume", str(report), "--json", str(tmp_path / "second.json")]) == 0
    assert scenario_lines(capsys.readouterr().err) == [f"scenario 1/2: {NAMES[0]}: finished before, not run again",
                                                       f"scenario 2/2: {NAMES[1]}"]
    first, second = (json.loads((tmp_path / name).read_text())["scenarios"] for name in ("first.json", "second.json"))
    assert second[0] == first[0]  # taken as it was
    assert [s["name"] for s in second] == NAMES


@pytest.mark.parametrize("changed", [["--top-k", "5"], ["--dtype", "bfloat16"], ["--min-coverage", "0.5"]])
def test_resume_runs_again_a_scenario_finished_with_other_options(tmp_path, capsys, changed):
    report = finished_report(tmp_path)
    capsys.readouterr()
    assert main([*FAST, *changed, "--resume", str(report)]) == 0
    assert scenario_lines(capsys.readouterr().err) == [f"scenario 1/2: {NAMES[0]}", f"scenario 2/2: {NAMES[1]}"]


def test_resume_runs_again_a_scenario_whose_checkpoint_changed(tmp_path, capsys):
    # A checkpoint directory whose weights file was rewritten since the report.
    checkpoint = tmp_path / "llama"
    checkpoint.mkdir()
    for file in ("config.json", "model.safetensors"):
        (checkpoint / file).write_bytes((ensure_checkpoint("llama") / file).read_bytes())
    options = ["check", "--model", str(checkpoint), *FAST[3:]]
    report = tmp_path / "first.json"
    assert main([*options, "--json", str(report)]) == 0
    (checkpoint / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    capsys.readouterr()
    assert main([*options, "--resume", str(report)]) == 0
    assert scenario_lines(capsys.readouterr().err) == [f"scenario 1/1: {checkpoint}-eager-vs-oracle-batch1"]
