"""Compiled graph mode (`mode="compile"`, sim/piecewise.py on the CPU) gives eager's tokens, and
compiles once for every captured size (the batch dim marked dynamic; on cuda a size of 1 apart): later lengths,
batches and requests reuse it. The
compiled graphs still read the lengths refreshed before each replay (host lists through `update()`,
or the device `seq_lens` on cuda): leaving them stale is caught.

Compiled code may round differently from eager, so a near-tie (`tie`) is accepted, never a mismatch. Against its
twin (`compile_nograph`: the same compiled step, no graph) compile is judged as graph is against eager: bit for bit in
bfloat16 on the CPU, so a graph fault far below the tolerance across kernels is a mismatch there.
"""
import dataclasses

import pytest

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.scenarios import Scenario
from harness.inputs.workloads import make_requests
from reference_runner.attention import default_dtype
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.graphs import compiled
from reference_runner.sim import piecewise
from suites.faults import FAULTS, STALE_LENGTHS, runner_up_lifted

MODELS = ["llama", "qwen2_moe"]
COMPILE = EngineArgs(mode="compile")  # the Scenario defaults: these engines share inductor's cache
TWIN = "compile_nograph"


def compilations(device: str) -> int:
    """Compiles so far in this process: piecewise pieces on the CPU, whole forwards on cuda and npu."""
    return piecewise.compilations if device == "cpu" else compiled.compilations


@pytest.mark.parametrize("workload", ["mixed", "join_leave"])
@pytest.mark.parametrize("model", MODELS)
def test_compile_matches_eager(check, model, workload):
    result = check(Scenario(model=model, baseline="eager", engine=COMPILE, workload=workload, max_new_tokens=32))
    assert result.failures == []
    assert {v.status for v in result.verdicts} <= {"match", "tie"}
    assert result.run.graph_steps > 0


def test_the_captured_sizes_share_one_compile_and_never_compile_again(device):
    before = compilations(device)
    args = dataclasses.replace(COMPILE, dtype=default_dtype(device), graph_bs=tuple(range(1, 9)))
    engine = Engine(ensure_checkpoint("llama"), args, device=device)
    runner = engine.model_runner.graph_runner
    # On the CPU every size shares one compile (its trace specialises no size of 1); on cuda dynamo specialises a size
    # of 1; on npu FIA's host list (a length per row) makes dynamo compile every size.
    expected = {"cpu": 1, "cuda": 2}.get(device, len(runner.capture_bs))
    assert compilations(device) - before == expected
    for workload in ["mixed", "join_leave", "batch3", "batch8"]:
        engine.generate(make_requests(workload, engine.model_runner.vocab_size, max_new_tokens=24))
    assert {1, 3, 8} <= set(runner.bucket_hits)
    assert compilations(device) - before == expected


@pytest.mark.parametrize("baseline", ["eager", TWIN])
@pytest.mark.parametrize("fault", STALE_LENGTHS)
def test_compiled_graphs_still_read_the_refreshed_lengths(check, monkeypatch, device, fault, baseline):
    if reason := FAULTS[fault].skip_reason(device):
        pytest.skip(reason)
    FAULTS[fault].inject(monkeypatch)
    FAULTS[fault].assert_caught(check(Scenario(model="llama", baseline=baseline, engine=COMPILE, workload="mixed",
                                               max_new_tokens=32)))


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("model", [*MODELS, pytest.param("mixtral", marks=pytest.mark.slow),
                                   pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_compile_matches_its_twin_bit_for_bit(check, device, model, dtype):
    if device != "cpu":
        pytest.skip(f"bit for bit is the CPU's measure; on {device} the twin is judged at graph-vs-eager tolerance")
    result = check(Scenario(model=model, baseline=TWIN, engine=dataclasses.replace(COMPILE, dtype=dtype),
                            workload="join_leave", max_new_tokens=32))
    assert result.failures == []
    assert {v.status for v in result.verdicts} == {"match"}
    assert result.coverage == 1.0
    assert (result.drift.max_abs_diff, result.drift.flip_rate) == (0.0, 0.0)
    assert result.run.graph_steps > 0


def test_the_twin_replays_no_graph_and_compiles_once_for_every_batch_size(device):
    if device == "npu":
        pytest.skip("npu refuses mode compile_nograph (graphs/npu.py)")
    before = compilations(device)
    engine = Engine(ensure_checkpoint("llama"), EngineArgs(mode=TWIN, dtype=default_dtype(device)), device=device)
    for workload in ["mixed", "join_leave", "batch3", "batch8"]:
        engine.generate(make_requests(workload, engine.model_runner.vocab_size, max_new_tokens=24))
    assert engine.model_runner.graph_runner is None
    assert engine.stats.graph_steps == 0 and engine.stats.eager_steps > 0
    # As compile mode's captured sizes: one compile for every size on the CPU; on cuda a size of 1 is specialised.
    assert compilations(device) - before == (1 if device == "cpu" else 2)


# A bug of the graph that skews each replayed step by 0.25: within the tolerance across kernels, so judged against
# eager it passes, and only the twin, judged bit for bit, names it.
SMALL_SKEW = runner_up_lifted(0.1)


@pytest.mark.parametrize(("baseline", "caught"), [("eager", False), (TWIN, True)])
def test_a_graph_fault_below_the_tolerance_across_kernels_is_caught_only_against_the_twin(check, monkeypatch, device,
                                                                                           baseline, caught):
    if device != "cpu":
        pytest.skip(f"bit for bit is the CPU's measure; on {device} the twin is judged at graph-vs-eager tolerance")
    SMALL_SKEW.inject(monkeypatch)
    result = check(Scenario(model="llama", baseline=baseline, engine=dataclasses.replace(COMPILE, dtype="bfloat16"),
                            workload="mixed", max_new_tokens=32))
    assert result.passed is not caught
    assert ("mismatch" in {v.status for v in result.verdicts}) is caught
