"""`npugraph-harness check`: exit status, JSON and JUnit reports (bad input: test_validation.py)."""
import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from harness.cli import build_parser, main
from reference_runner.engine.args import EngineArgs
from suites.faults import FAULTS

FAST = ["check", "--model", "llama", "--max-new-tokens", "12"]


@pytest.mark.parametrize(("target", "message"), [
    ("sglang", "target 'sglang' needs SGLang installed"),
    ("vllm", "target 'vllm' needs vLLM installed"),
])
def test_a_target_whose_engine_is_not_installed_exits_2_with_one_line(capsys, target, message):
    if importlib.util.find_spec(target) is not None:
        pytest.skip(f"{target} is installed here")
    assert main(["check", "--target", target, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"npugraph-harness: error: {message}")


def test_passing_check_exits_0_and_reports_graph_steps(tmp_path):
    report, junit = tmp_path / "check.json", tmp_path / "reports" / "ci" / "check.xml"  # folders made as needed
    assert main([*FAST, "--json", str(report), "--junit", str(junit)]) == 0
    doc = json.loads(report.read_text())
    assert doc["passed"] is True
    scenarios = {s["mode"]: s for s in doc["scenarios"]}
    assert scenarios["eager"]["baseline"] == "oracle"
    assert scenarios["graph"]["baseline"] == "eager"
    assert scenarios["graph"]["graph_steps"] > 0
    assert scenarios["graph"]["verdicts"] == {"match": 8, "tie": 0, "mismatch": 0}
    assert scenarios["graph"]["engine_version"] == "reference 0.1.0"
    for scenario in scenarios.values():  # every generated token compared, against transformers too
        assert (scenario["coverage"], scenario["tokens_compared"]) == (1.0, scenario["tokens_generated"])
    assert {key for key in ("name", "model", "tp_size", "dp_size", "eager_steps", "first_divergence")} <= set(scenarios["graph"])
    assert ET.parse(junit).getroot().get("failures") == "0"


def test_check_with_prefill_graphs_reports_prefill_graph_steps_and_the_memory_of_all_families(tmp_path, capsys):
    report = tmp_path / "check.json"
    assert main([*FAST, "--model", "llama,qwen2_moe", "--modes", "graph", "--prefill-graphs", "--json", str(report)]) == 0
    for scenario in json.loads(report.read_text())["scenarios"]:
        assert scenario["name"] == f"{scenario['model']}-graph+prefill-vs-eager-mixed"
        assert (scenario["prefill_graph_steps"], scenario["prefill_eager_steps"]) == (6, 0)
        memory = scenario["graph_memory"]
        assert memory["largest_family_bytes"] <= memory["all_families_bytes"] <= 1.1 * memory["largest_family_bytes"]
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "+prefill" in line]
    assert [row[-2] for row in rows] == ["6/0", "6/0"]  # the table's prefill column (before secs): graph/eager


def test_a_graph_bug_makes_check_exit_1(tmp_path, monkeypatch):
    FAULTS["update_fed_previous_step_lengths"].inject(monkeypatch)
    report, junit = tmp_path / "check.json", tmp_path / "check.xml"
    assert main([*FAST, "--modes", "graph", "--json", str(report), "--junit", str(junit)]) == 1
    graph = json.loads(report.read_text())["scenarios"][0]
    assert graph["passed"] is False
    assert graph["first_divergence"]["status"] == "mismatch"
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_help_answers_without_importing_torch():
    # Parsing imports no command module: --help and bad options never wait for torch and transformers.
    code = ("import sys; from harness.cli import main; status = main(['check', '--help']); "
            "sys.exit(status if 'torch' not in sys.modules else 99)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--max-bs" in done.stdout and "--tp" in done.stdout


def test_engine_flags_come_from_engine_args():
    args = build_parser().parse_args(["check", "--tp", "2", "--max-bs", "4", "--graph-bs", "1,4", "--dtype", "bfloat16"])
    assert EngineArgs.from_cli_args(args, mode="graph") == EngineArgs(
        mode="graph", dtype="bfloat16", max_bs=4, graph_bs=(1, 4), tp_size=2)
