"""`npugraph_harness.check`, the Python API, runs the command line's validated plan: the same options by the names of
their flags, the same one-line errors before any work, a result that says what passed, how much it compared and
where it first diverged. The `npugraph` fixture runs it from any test suite; targets registered by entry point run
through `check --target NAME`."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import npugraph_harness
from harness.cli import main
from reference_runner.graphs.runner import GraphRunner

FAST = {"model": "llama", "workload": "batch3", "max_new_tokens": 6}
ROOT = Path(__file__).resolve().parents[2]
replay = GraphRunner.replay


def replay_with_runner_up_boosted(self, forward_batch):
    """Graph replay whose logits favour each row's runner-up by 30: a token flipped at every replayed step."""
    logits = replay(self, forward_batch)
    return logits.scatter_add(1, logits.topk(2, dim=-1).indices[:, 1:], torch.full_like(logits[:, :1], 30.0))


def test_check_returns_the_result_the_command_line_reports(tmp_path):
    result = npugraph_harness.check(**FAST, modes=["eager", "graph"], json=tmp_path / "check.json", progress=print)
    assert (result.passed, result.complete) == (True, True)
    assert [(r.scenario.name, r.passed, r.coverage) for r in result.scenarios] == [
        ("llama-eager-vs-oracle-batch3", True, 1.0), ("llama-graph-vs-eager-batch3", True, 1.0)]
    assert json.loads(result.to_json()) == json.loads((tmp_path / "check.json").read_text())
    assert result.summary().splitlines()[-1] == "2 passed, 0 failed"
    result.assert_passed()


@pytest.mark.parametrize(("options", "message"), [
    ({"max_bs": 0}, "--max-bs must be >= 1, got 0"),
    ({"modes": ["eager", "warp"]}, "--modes: unknown mode 'warp'; choose from eager, graph, compile, tree, compile_nograph"),
    ({"graph_batch_sizes": [1, 2]}, "npugraph_harness.check got an unknown option 'graph_batch_sizes'; it takes model, "),
    ({"prefill_graphs": "yes"}, "prefill_graphs='yes': a switch (--prefill-graphs) takes True or False"),
])
def test_a_bad_option_raises_the_command_lines_one_line_error_before_any_work(capsys, options, message):
    with pytest.raises(npugraph_harness.UsageError) as error:
        npugraph_harness.check(**FAST, **options)
    assert str(error.value).startswith(message)
    assert capsys.readouterr().err == ""  # nothing ran


def test_a_failed_check_asserts_with_each_failure_and_its_first_divergence(monkeypatch):
    monkeypatch.setattr(GraphRunner, "replay", replay_with_runner_up_boosted)
    result = npugraph_harness.check(**FAST, modes=["graph"])
    assert result.passed is False
    with pytest.raises(AssertionError) as failure:
        result.assert_passed()
    lines = str(failure.value).splitlines()
    assert lines[0].startswith("llama-graph-vs-eager-batch3: FAIL (reference 0.1.0; ")
    assert lines[-1].startswith("    first divergence: request b")
    assert ", step 1: baseline token " in lines[-1] and "baseline top-2 margin " in lines[-1]


SCRATCH_TEST = '''
import torch
from reference_runner.graphs.runner import GraphRunner

OPTIONS = dict(model="llama", modes=["graph"], workload="batch3", max_new_tokens=6)


def test_graph_mode(npugraph):
    npugraph.check(**OPTIONS).assert_passed()


def test_graph_mode_with_a_planted_fault(npugraph, monkeypatch):
    replay = GraphRunner.replay

    def boosted(self, forward_batch):
        logits = replay(self, forward_batch)
        return logits.scatter_add(1, logits.topk(2, dim=-1).indices[:, 1:], torch.full_like(logits[:, :1], 30.0))

    monkeypatch.setattr(GraphRunner, "replay", boosted)
    npugraph.check(**OPTIONS).assert_passed()


def test_benchmark_beside_it(benchmark):
    benchmark(sum, range(10))
'''


def test_the_fixture_in_a_suite_outside_the_repository_passes_and_fails_with_the_first_divergence(tmp_path):
    (tmp_path / "test_engine.py").write_text(SCRATCH_TEST)
    junit = tmp_path / "results" / "junit.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           "--npugraph-json", "test_engine.py", "--benchmark-compare"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 1, out
    assert "1 failed, 2 passed" in out.splitlines()[-1], out
    assert "E           AssertionError: llama-graph-vs-eager-batch3: FAIL (reference 0.1.0; " in out
    assert "E               first divergence: request b0, step 1: baseline token " in out
    reports = sorted(p.name for p in (tmp_path / "results").glob("*.json"))
    assert reports == ["test_engine.py_test_graph_mode.json", "test_engine.py_test_graph_mode_with_a_planted_fault.json"]


def test_a_target_registered_by_entry_point_runs_through_check(tmp_path, capsys):
    # A scratch package, installed nowhere: its dist-info on sys.path is what `pip install` would leave.
    package = tmp_path / "my_engine_target"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        from harness.targets.reference import ReferenceTarget


        class MyEngineTarget(ReferenceTarget):
            """An engine team's own target (here the reference runner under another name)."""

            name = "my_engine"
    '''))
    info = tmp_path / "my_engine_target-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-engine-target\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[npugraph_harness.targets]\nmy_engine = my_engine_target:MyEngineTarget\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["check", "--target", "my_engine", "--model", "llama", "--modes", "eager,graph", "--workload", "batch1",
                     "--max-new-tokens", "4"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert "2 passed, 0 failed" in capsys.readouterr().out
