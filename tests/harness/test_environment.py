"""The Ascend environment a check ran on is recorded in its JSON, and an AIV expansion mode is warned about,
in the check's output and in the report; off npu the record says why there is none. The npu side runs here
over a stand-in of torch_npu."""
import json
import sys
import types

import pytest

from harness.bench.report import render_markdown
from harness.cli import main
from harness.environment import AIV_WARNING, ascend_environment

FAST = ["check", "--model", "llama", "--modes", "graph", "--max-new-tokens", "4"]


@pytest.fixture
def torch_npu_stand_in(monkeypatch):
    utils = types.SimpleNamespace(get_cann_version=lambda module="CANN": {"CANN": "8.3.RC1"}[module])
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(__version__="2.8.0", utils=utils))


def test_the_check_json_says_why_nothing_ascend_is_recorded_off_npu(tmp_path):
    report = tmp_path / "check.json"
    assert main([*FAST, "--device", "cpu", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["environment"] == {
        "skipped": "device cpu: torch_npu, CANN and torchair are not used"}


@pytest.mark.parametrize("mode", [None, "AIV", "AI_CPU"])
def test_npu_environment_names_versions_and_warns_about_aiv(torch_npu_stand_in, monkeypatch, mode):
    monkeypatch.delenv("HCCL_OP_EXPANSION_MODE", raising=False)
    if mode is not None:
        monkeypatch.setenv("HCCL_OP_EXPANSION_MODE", mode)
    environment = ascend_environment("npu")
    assert {k: v for k, v in environment.items() if k != "torchair"} == {
        "torch_npu": "2.8.0", "torch_npu_release": "7.2", "cann": "8.3.RC1", "HCCL_OP_EXPANSION_MODE": mode,
        "warnings": [AIV_WARNING] if mode == "AIV" else []}


def test_the_report_shows_the_environment_and_its_warning():
    check = {"passed": True, "scenarios": [], "environment": {
        "torch_npu": "2.8.0", "torch_npu_release": "7.2", "cann": "8.3.RC1", "torchair": None,
        "HCCL_OP_EXPANSION_MODE": "AIV", "warnings": [AIV_WARNING]}}
    summary = render_markdown([], {"npugraph": {"device": "npu"}}, [], {}, 0.1, check, {})
    assert ("Environment: torch_npu 2.8.0, torch_npu_release 7.2, cann 8.3.RC1, torchair -, HCCL_OP_EXPANSION_MODE AIV"
            in summary)
    assert f"- **WARNING**: {AIV_WARNING}" in summary
