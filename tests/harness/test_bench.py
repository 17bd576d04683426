"""Benchmark results, speed-ups, the ratio gate, speed goals and `npugraph-harness report`, on constructed results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.bench.record import gated_speedups, record, save_ratios
from harness.bench.results import (
    GOALS,
    BenchResult,
    load_ratios,
    ratio_gate,
    results_from_benchmarks,
    speedups,
)
from harness.cli import main


def bench(mode, bs, min_ms, speedup=1.0, kind="step", model="llama", median_ms=None):
    """One benchmark as pytest-benchmark's JSON writes it."""
    tokens = bs if kind == "step" else 32 * bs
    name = f"test_decode_{kind}[{model}-{bs}-{mode}]"
    return {"name": name, "fullname": f"suites/bench/test_decode_throughput.py::{name}",
            "extra_info": {"model": model, "kind": kind, "mode": mode, "bs": bs, "tokens": tokens,
                           "speedup_vs_eager": speedup},
            "stats": {"min": min_ms / 1e3, "median": (median_ms or min_ms) / 1e3}}


RUN = [bench("eager", 1, 1.0), bench("graph", 1, 0.5, 2.0), bench("compile", 1, 0.2, 5.0),
       bench("eager", 8, 1.2), bench("graph", 8, 0.8, 1.5), bench("compile", 8, 0.3, 4.0),
       bench("eager", 1, 40.0, kind="loop"), bench("compile", 1, 8.0, 5.0, kind="loop"),
       bench("hf", 1, 60.0, 0.7, kind="loop")]


def test_results_read_extra_info_and_skip_foreign_benchmarks():
    foreign = {"name": "test_other", "extra_info": {}, "stats": {"min": 1.0, "median": 1.0}}
    results = results_from_benchmarks([bench("graph", 8, 0.5, 1.7, median_ms=0.6), foreign])
    assert results == [BenchResult("llama", "step", "graph", 8, 8, median_s=0.6e-3, min_s=0.5e-3, speedup=1.7)]
    assert results[0].key == "llama/step/bs8/graph"
    assert results[0].tokens_per_s == pytest.approx(8 / 0.6e-3)


def test_speedups_are_the_measured_ones_of_every_mode_but_eager():
    results = results_from_benchmarks([*RUN, bench("graph", 32, 1.0, speedup=None)])  # its eager was deselected
    assert speedups(results) == {
        "llama/step/bs1/graph": 2.0, "llama/step/bs1/compile": 5.0,
        "llama/step/bs8/graph": 1.5, "llama/step/bs8/compile": 4.0,
        "llama/loop/bs1/compile": 5.0, "llama/loop/bs1/hf": 0.7,
    }


def test_saved_ratios_hold_the_gated_decode_step_speed_ups_only(tmp_path):
    save_ratios(tmp_path / "ratios.json", gated_speedups(RUN), {"device": "cpu", "device_name": "Test CPU"})
    assert load_ratios(tmp_path / "ratios.json", "Test CPU") == {
        "llama/step/bs1/compile": 5.0, "llama/step/bs1/graph": 2.0,
        "llama/step/bs8/compile": 4.0, "llama/step/bs8/graph": 1.5,
    }
    assert json.loads((tmp_path / "ratios.json").read_text())["machines"]["Test CPU"]["machine"] == {
        "device": "cpu", "device_name": "Test CPU"}


def test_speed_ups_are_stored_per_processor_and_a_record_keeps_the_other_processors(tmp_path):
    save_ratios(tmp_path / "ratios.json", {"llama/step/bs1/compile": 5.2}, {"device": "cpu", "device_name": "AMD EPYC"})
    save_ratios(tmp_path / "ratios.json", {"llama/step/bs1/compile": 3.5}, {"device": "cpu", "device_name": "Intel Xeon"})
    assert load_ratios(tmp_path / "ratios.json", "AMD EPYC") == {"llama/step/bs1/compile": 5.2}
    assert load_ratios(tmp_path / "ratios.json", "Intel Xeon") == {"llama/step/bs1/compile": 3.5}
    assert load_ratios(tmp_path / "ratios.json", "Test CPU") is None


def test_baselines_of_each_processor_have_a_folder_of_their_own():
    from harness.bench.results import machine_class

    assert machine_class("cpu", "AMD EPYC", "x86_64") == "cpu-x86_64-amd-epyc"
    assert machine_class("cpu", "Intel(R) Xeon(R) Processor", "x86_64") == "cpu-x86_64-intel-xeon-processor"
    assert machine_class("cuda", "NVIDIA H200", "x86_64") == "cuda-x86_64-nvidia-h200"


STORED = {"llama/step/bs1/graph": 2.0, "llama/step/bs1/compile": 5.0, "llama/step/bs32/graph": 3.0}


@pytest.mark.parametrize("graph_speedup, passed", [
    (2.0, True),    # unchanged
    (1.42, True),   # a drop of 29%, inside the 30% tolerance
    (1.38, False),  # a drop of 31%
    (0.2, False),   # the graph path slowed down
    (9.0, True),    # faster than stored never fails
])
def test_ratio_gate_fails_a_speed_up_that_dropped_beyond_the_tolerance(graph_speedup, passed):
    results = results_from_benchmarks([bench("eager", 1, 1.0), bench("graph", 1, 0.5, graph_speedup),
                                       bench("compile", 1, 0.2, 5.0)])
    checks = ratio_gate(speedups(results), STORED, tolerance=0.3)
    assert [(c.key, c.passed) for c in checks] == [("llama/step/bs1/compile", True), ("llama/step/bs1/graph", passed)]
    assert checks[1].floor == pytest.approx(1.4)


def test_ratio_check_reads_as_one_line():
    checks = ratio_gate({"llama/step/bs1/graph": 1.0}, STORED, tolerance=0.3)
    assert [str(c) for c in checks] == ["llama/step/bs1/graph: 1.00x (stored 2.00x) FAIL: below 1.40x"]


def test_goals_take_the_speed_up_over_eager_and_the_fastest_rounds_against_hf():
    results = results_from_benchmarks(RUN)
    measured = {(t.what, t.kind, t.bs): t.measure(results) for t in GOALS if t.measure(results) is not None}
    assert measured == pytest.approx({
        ("compiled decode step >= 5x eager", "step", 1): 5.0,
        ("compiled decode step >= 4x eager", "step", 8): 4.0,
        ("SimNPUGraph replay within 1.3x of eager's time", "step", 1): 2.0,
        ("SimNPUGraph replay within 1.3x of eager's time", "step", 8): 1.5,
        ("compiled >= 3x HF generate tokens/s", "loop", 1): 7.5,
        ("compiled not slower than eager", "step", 1): 5.0,
        ("compiled not slower than eager", "step", 8): 4.0,
        ("compiled not slower than eager", "loop", 1): 5.0,
        ("device graph beats eager", "step", 1): 2.0,
    })


MACHINE = {"machine": "x86_64", "system": "Linux", "python_implementation": "CPython", "python_version": "3.11.9",
           "npugraph": {"device": "cpu", "device_name": "Test CPU", "torch": "2.x", "threads": 1}}


def write_results(folder, benchmarks, check=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps({"machine_info": MACHINE, "benchmarks": benchmarks}))
    if check is not None:
        (folder / "check.json").write_text(json.dumps(check))
    return folder


@pytest.fixture
def stored(tmp_path):
    """A stored baseline run (1.25x the throughput at eager bs=1) and stored speed-ups."""
    baseline = tmp_path / "0001_cpu.json"
    baseline.write_text(json.dumps({"machine_info": MACHINE, "benchmarks": [bench("eager", 1, 0.8), *RUN[1:]]}))
    ratios = tmp_path / "ratios-cpu.json"
    save_ratios(ratios, {"llama/step/bs1/graph": 2.0, "llama/step/bs1/compile": 5.0}, MACHINE["npugraph"])
    return ["--baseline", str(baseline), "--ratios", str(ratios)]


def test_report_writes_markdown_and_png(tmp_path, stored, capsys):
    check = {"passed": False, "scenarios": [
        {"name": "llama-graph", "passed": True, "verdicts": {"match": 8}, "graph_steps": 200, "eager_steps": 0},
        {"name": "qwen2-graph", "passed": False, "failures": ["r3 step 7: mismatch"],
         "verdicts": {"match": 7, "mismatch": 1}, "graph_steps": 200, "eager_steps": 0}]}
    results = write_results(tmp_path / "results", RUN, check)
    assert main(["report", str(results), *stored]) == 1  # the check failed
    summary = (results / "summary.md").read_text()
    assert "Machine: Test CPU (cpu), torch 2.x, 1 thread(s), one rank." in summary
    assert "FAILED: 1 of 2 scenarios passed." in summary
    assert "| qwen2-graph | **FAIL** | 7 | 0 | 1 | 200 | 0 |" in summary
    assert "- FAIL `qwen2-graph`: r3 step 7: mismatch" in summary
    assert "| 1 | eager | 1.000 | 1,000 | -20% | 1x | - |" in summary
    assert "| 1 | graph | 0.500 | 2,000 | +0% | 2.00x | ok (stored 2.00x) |" in summary
    assert "| compiled >= 3x HF generate tokens/s | llama | loop | 1 | 7.50x | >= 3.00x | yes |" in summary
    assert "all 2 gated speed-ups within tolerance" in summary
    assert (results / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {results / 'summary.md'} and {results / 'bench.png'}"


def test_report_exits_1_when_a_speed_up_dropped(tmp_path, stored):
    slowed = [bench("eager", 1, 1.0), bench("graph", 1, 5.0, 0.2), bench("compile", 1, 0.2, 5.0)]
    results = write_results(tmp_path / "results", slowed)
    assert main(["report", str(results / "bench.json"), *stored]) == 1
    summary = (results / "summary.md").read_text()
    assert "| 1 | graph | 5.000 | 200 | -90% | 0.20x | **FAIL** (stored 2.00x) |" in summary
    assert "1 of 2 speed-ups FAILED the ratio gate: llama/step/bs1/graph" in summary


def test_report_passes_an_unchanged_run(tmp_path, stored):
    assert main(["report", str(write_results(tmp_path / "results", RUN)), *stored]) == 0


def cost(ratio: str, measured: float, limit: float, seconds: dict[str, float]) -> dict:
    """A benchmark of suites/bench/test_time_to_verdict.py, as pytest-benchmark writes it."""
    return {"name": f"test_{ratio}", "stats": {"min": 60.0, "median": 60.0},
            "extra_info": {"ratio": ratio, "model": "smollm2", "measured": measured, "limit": limit, "seconds": seconds}}


@pytest.mark.parametrize(("compile_vs_graph", "status", "met"), [(3.2, 0, "yes"), (6.0, 1, "**no**")])
def test_report_lists_each_time_to_verdict_ratio_against_its_limit(tmp_path, stored, compile_vs_graph, status, met):
    costs = [cost("check_vs_generate", 1.31, 1.5, {"generate": 10.2, "check": 13.4}),
             cost("compile_vs_graph", compile_vs_graph, 5, {"graph": 30.0, "compile": 30.0 * compile_vs_graph})]
    results = write_results(tmp_path / "results", [*RUN, *costs])
    assert main(["report", str(results), *stored]) == status
    summary = (results / "summary.md").read_text()
    assert "| check_vs_generate | smollm2 | generate 10.2, check 13.4 | 1.31x | <= 1.5x | yes |" in summary
    assert (f"| compile_vs_graph | smollm2 | graph 30.0, compile {30 * compile_vs_graph:.1f} | {compile_vs_graph:.2f}x | "
            f"<= 5x | {met} |") in summary


def test_report_without_results_exits_2_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"npugraph-harness: error: no benchmark results at {tmp_path / 'bench.json'} "
        f"(write them with `npugraph-harness bench --json {tmp_path / 'bench.json'}`)")


@pytest.mark.parametrize(("device", "fails_on_times"), [("cpu", False), ("cuda", True), ("npu", True)])
def test_bench_fails_on_absolute_times_only_on_accelerator_hosts(tmp_path, monkeypatch, device, fails_on_times):
    from pytest_benchmark.utils import get_machine_id

    from harness.bench import run as bench_module

    stored = tmp_path / f"{device}-x86_64" / get_machine_id()
    stored.mkdir(parents=True)
    (stored / f"0001_{device}.json").write_text("{}")
    ran, run = [], subprocess.run

    def run_pytest(argv, *args, **kwargs):  # the pytest run is recorded, anything else (machine id) runs
        if argv[1:3] != ["-m", "pytest"]:
            return run(argv, *args, **kwargs)
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(bench_module, "BASELINES", tmp_path)
    monkeypatch.setattr(bench_module, "machine_class", lambda device, name: f"{device}-x86_64")
    monkeypatch.setattr(bench_module, "processor_name", lambda device: "Test device")
    monkeypatch.setattr("reference_runner.device.resolve_device", lambda name: name)
    monkeypatch.setattr(subprocess, "run", run_pytest)
    assert main(["bench", "--device", device]) == 0
    (argv,) = ran
    assert "--benchmark-compare" in argv
    assert ("--benchmark-compare-fail=min:30%" in argv) is fails_on_times


@pytest.mark.parametrize("corrupt", ["bench.json", "check.json"])
@pytest.mark.parametrize("content", ["{truncated", "[]", json.dumps({"benchmarks": [{**bench("eager", 1, 1.0), "stats": {}}]})],
                         ids=["not-json", "json-list", "fields-missing"])
def test_report_on_corrupt_results_exits_2_with_one_line(tmp_path, stored, capsys, corrupt, content):
    results = write_results(tmp_path / "results", RUN, check={"passed": True, "scenarios": []})
    (results / corrupt).write_text(content)
    assert main(["report", str(results), *stored]) == 2
    what = "pytest-benchmark results" if corrupt == "bench.json" else "check results"
    err = capsys.readouterr().err
    assert err.startswith(f"npugraph-harness: error: {results / corrupt}: not readable as {what} (")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("pytest_status", "status", "line"), [
    (0, 0, None),
    (1, 1, None),
    (2, 130, None),  # pytest interrupted
    (3, 2, "bench: pytest stopped with an internal error (exit 3; its output above says where)"),
    (4, 2, "bench: pytest refused its arguments (exit 4; see above)"),
    (5, 2, "bench: no benchmark was collected (pytest exit 5): nothing was measured"),
])
def test_bench_maps_pytest_exit_statuses_onto_the_command_lines(monkeypatch, capsys, pytest_status, status, line):
    run = subprocess.run

    def run_pytest(argv, *args, **kwargs):
        return run(argv, *args, **kwargs) if argv[1:3] != ["-m", "pytest"] else subprocess.CompletedProcess(argv, pytest_status)

    monkeypatch.setattr(subprocess, "run", run_pytest)
    assert main(["bench", "--device", "cpu"]) == status
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("npugraph-harness")]
    assert errors == ([f"npugraph-harness: error: {line}"] if line else [])


def test_bench_runs_from_any_directory(tmp_path):
    # From outside the checkout pytest-benchmark used to crash (exit 3) on baselines it could not place under the cwd.
    done = subprocess.run([sys.executable, "-m", "harness", "bench", "--", "-k", "no_such_benchmark"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "INTERNALERROR" not in done.stdout + done.stderr
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        2, "npugraph-harness: error: bench: no benchmark was collected (pytest exit 5): nothing was measured")


def stored_run(folder, benchmarks, name="0001_cpu.json"):
    """A stored pytest-benchmark file of `benchmarks` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"machine_info": MACHINE, "benchmarks": benchmarks}))
    return folder / name


def test_a_selection_is_merged_into_a_new_baseline_that_keeps_every_stored_benchmark(tmp_path):
    first = stored_run(tmp_path / "machine", RUN)
    before = first.read_bytes()
    save_ratios(tmp_path / "ratios-cpu.json", gated_speedups(RUN), {**MACHINE["npugraph"], "torch": "old"})
    selection = [bench("eager", 1, 0.9), bench("graph", 1, 0.4, 2.2)]  # -k "bs1 and step and not compile"
    recorded = record({"machine_info": MACHINE, "benchmarks": selection}, tmp_path / "machine", "cpu",
                      tmp_path / "ratios-cpu.json")
    assert recorded.lines() == [
        f"recorded 9 benchmarks in {tmp_path / 'machine' / '0002_cpu.json'}: 2 measured, 7 kept from 0001_cpu.json "
        "(not run this time)",
        f"recorded 4 speed-ups in {tmp_path / 'ratios-cpu.json'}: 1 measured, 3 kept from before"]
    merged = {b["name"]: b for b in json.loads(recorded.baseline.read_text())["benchmarks"]}
    assert set(merged) == {b["name"] for b in RUN}
    assert merged["test_decode_step[llama-1-graph]"] == selection[1]
    assert merged["test_decode_step[llama-8-graph]"]["extra_info"]["measured_in"] == "0001_cpu.json"
    assert first.read_bytes() == before  # older files stay as they were
    assert load_ratios(tmp_path / "ratios-cpu.json", "Test CPU") == {
        "llama/step/bs1/compile": 5.0, "llama/step/bs1/graph": 2.2,
        "llama/step/bs8/compile": 4.0, "llama/step/bs8/graph": 1.5,
    }
    assert json.loads((tmp_path / "ratios-cpu.json").read_text())["machines"]["Test CPU"]["machine"] == MACHINE["npugraph"]


def test_a_benchmark_kept_through_several_records_names_the_run_that_measured_it(tmp_path):
    stored_run(tmp_path, RUN)
    stored_run(tmp_path, [bench("eager", 1, 0.9)], name="0002_cpu.json")  # as a record before merging wrote it
    recorded = record({"machine_info": MACHINE, "benchmarks": [bench("eager", 8, 1.1)]}, tmp_path, "cpu",
                      tmp_path / "ratios-cpu.json")
    assert recorded.baseline.name == "0003_cpu.json"
    merged = {b["name"]: b["extra_info"].get("measured_in") for b in json.loads(recorded.baseline.read_text())["benchmarks"]}
    assert merged == {"test_decode_step[llama-1-eager]": "0002_cpu.json", "test_decode_step[llama-8-eager]": None}
    again = record({"machine_info": MACHINE, "benchmarks": [bench("eager", 8, 1.0)]}, tmp_path, "cpu",
                   tmp_path / "ratios-cpu.json")
    assert json.loads(again.baseline.read_text())["benchmarks"][0]["extra_info"]["measured_in"] == "0002_cpu.json"


def test_the_first_record_of_a_machine_class_is_0001_and_keeps_nothing(tmp_path):
    recorded = record({"machine_info": MACHINE, "benchmarks": RUN}, tmp_path / "new", "cpu", tmp_path / "ratios-cpu.json")
    assert (recorded.baseline.name, recorded.kept, recorded.ratios_kept) == ("0001_cpu.json", 0, 0)
    assert recorded.lines()[0] == f"recorded 9 benchmarks in {recorded.baseline}: 9 measured"


def machine_folder(baselines):
    """Where `bench` keeps this machine's absolute baselines under `baselines`."""
    from pytest_benchmark.utils import get_machine_id

    from harness.bench.results import machine_class

    return baselines / machine_class("cpu", "Test CPU") / get_machine_id()


@pytest.fixture
def bench_here(tmp_path, monkeypatch):
    """`bench_here(status, benchmarks, *args)`: `main(["bench", "--device", "cpu", *args])` against baselines in
    `tmp_path`, with a pytest that writes `benchmarks` as its JSON (when asked for one) and exits `status`; the exit
    status and pytest's arguments (None if pytest did not run)."""
    from harness.bench import run as bench_module

    monkeypatch.setattr(bench_module, "BASELINES", tmp_path)
    monkeypatch.setattr(bench_module, "ratios_path", lambda device: tmp_path / f"ratios-{device}.json")
    monkeypatch.setattr(bench_module, "processor_name", lambda device: "Test CPU")
    run, ran = subprocess.run, []

    def run_pytest(argv, *args, **kwargs):
        if argv[1:3] != ["-m", "pytest"]:
            return run(argv, *args, **kwargs)
        ran.append(argv)
        for out in [arg.split("=", 1)[1] for arg in argv if arg.startswith("--benchmark-json=")]:
            Path(out).write_text(json.dumps({"machine_info": MACHINE, "benchmarks": ran_benchmarks}))
        return subprocess.CompletedProcess(argv, pytest_status)

    def bench_cpu(status, benchmarks, *args):
        nonlocal pytest_status, ran_benchmarks
        pytest_status, ran_benchmarks = status, benchmarks
        return main(["bench", "--device", "cpu", *args]), ran[-1] if ran else None

    pytest_status, ran_benchmarks = 0, []
    monkeypatch.setattr(subprocess, "run", run_pytest)
    return bench_cpu


def test_bench_record_merges_a_passing_selection(bench_here, tmp_path, capsys):
    folder = machine_folder(tmp_path)
    stored_run(folder, RUN)
    assert bench_here(0, [bench("graph", 1, 0.4, 2.2)], "--record", "--", "-k", "llama-1-graph")[0] == 0
    assert capsys.readouterr().out.splitlines()[-2].startswith(
        f"recorded 9 benchmarks in {folder / '0002_cpu.json'}: 1 measured, 8 kept from 0001_cpu.json")
    assert len(json.loads((folder / "0002_cpu.json").read_text())["benchmarks"]) == 9


@pytest.mark.parametrize(("pytest_status", "status"), [(1, 1), (2, 130)], ids=["a-benchmark-failed", "interrupted"])
def test_bench_record_of_a_run_that_did_not_pass_records_nothing(bench_here, tmp_path, capsys, pytest_status, status):
    folder = machine_folder(tmp_path)
    stored_run(folder, RUN)
    run_json = tmp_path / "run.json"
    assert bench_here(pytest_status, [bench("graph", 1, 0.4, 2.2)], "--record", "--json", str(run_json))[0] == status
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"bench --record: nothing recorded, the run did not pass; {tmp_path} is unchanged (this run's results: "
        f"{run_json})")
    assert sorted(p.name for p in folder.iterdir()) == ["0001_cpu.json"]
    assert not (tmp_path / "ratios-cpu.json").exists()


def test_bench_record_refuses_a_planted_slowdown_before_running(bench_here, capsys):
    assert bench_here(0, RUN, "--record", "--", "--plant-replay-slowdown=2") == (2, None)
    assert capsys.readouterr().err.strip() == ("npugraph-harness: error: bench --record: a run with a planted replay "
                                                "slowdown (--plant-replay-slowdown) is no baseline")


@pytest.mark.parametrize("stored_for", [None, "AMD EPYC"], ids=["no-file", "another-processor"])
def test_bench_with_nothing_stored_says_which_comparison_is_off_and_runs_ungated(bench_here, tmp_path, capsys,
                                                                                stored_for):
    if stored_for:  # speed-ups of another processor do not gate this one's
        save_ratios(tmp_path / "ratios-cpu.json", gated_speedups(RUN), {"device": "cpu", "device_name": stored_for})
    status, argv = bench_here(0, RUN)
    assert status == 0
    assert not [arg for arg in argv if arg.startswith(("--benchmark-compare", "--ratio-baseline"))]
    assert capsys.readouterr().out.splitlines() == [
        f"bench: no absolute baseline for {machine_folder(tmp_path)}: times not compared "
        "(`npugraph-harness bench --record` stores one)",
        f"bench: no stored speed-ups for Test CPU in {tmp_path / 'ratios-cpu.json'}: ratio gate off "
        "(`npugraph-harness bench --record` stores them)"]


def test_machine_info_keeps_the_hardware_and_drops_what_differs_between_instances_of_it():
    from harness.bench.plugin import stable_machine_info

    def instance(node, release, hz):
        return {"node": node, "release": release, "machine": "x86_64", "python_version": "3.11.7",
                "cpu": {"brand_raw": "AMD EPYC", "model": 1, "flags": ["avx2"], "hz_actual": [hz, 0],
                        "hz_actual_friendly": f"{hz / 1e9:.4f} GHz", "hz_advertised": [hz, 0],
                        "hz_advertised_friendly": f"{hz / 1e9:.4f} GHz", "cpuinfo_version": [9, 0, 0],
                        "cpuinfo_version_string": "9.0.0", "python_version": "3.11.7.final.0 (64 bit)"}}

    one, other = instance("vm", "6.18.44-fc-v669", 2596148000), instance("runner-7", "6.18.44-fc-v1272", 2445432000)
    assert stable_machine_info(one) == stable_machine_info(other) == {
        "machine": "x86_64", "python_version": "3.11.7", "cpu": {"brand_raw": "AMD EPYC", "model": 1, "flags": ["avx2"]}}
    assert stable_machine_info(one) != stable_machine_info({**one, "cpu": {**one["cpu"], "flags": ["avx2", "avx512f"]}})
