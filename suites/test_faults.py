"""Fault injection: each known graph-replay bug (`suites/faults.py`), injected into the real runner, is
caught, and the unpatched runner passes the very same scenario (compiled mode's twin in bfloat16:
suites/test_precision.py).

A fault late in a sequence strikes requests that met a near-tie earlier: in bfloat16 most of them do, so
it is caught only because the comparison continues past near-ties, in a re-run forced with the
baseline's tokens, compiled mode (other kernels, so near-ties) included. A fault that keeps every step
within compiled bfloat16's per-step tolerance fails as systematic drift, its statistics over the scenario
judged against the noise profile of correct runs, on checkpoints that profile was not measured on.

Stale lengths have two forms: a host list that `update()` did not refresh where attention reads host
lists (npu, cpu), and a device `seq_lens` that was not refreshed where it reads those (cuda). A replay
with no update since the previous one fails as the hang it would be on an NPU, not as a mismatch; an
update racing a replay, or another graph's update, fails naming the race; FIA not captured as a task
group stops the check before any replay, with exit status 2.
"""
import dataclasses

import pytest

from harness.cli import main
from harness.exits import EXIT_USAGE
from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.scenarios import Scenario
from harness.inputs.workloads import make_requests
from reference_runner.attention import default_dtype
from reference_runner.engine.args import EngineArgs
from reference_runner.graphs import cpu as emulation
from reference_runner.graphs.releases import RELEASES, TORCH_NPU_FLOOR
from suites.faults import (
    CROSS_ROW_MOE,
    FAMILY_FAULTS,
    FAULTS,
    LATE_FAULTS,
    LATE_FROM_POSITION,
    NOT_INTERCEPTED,
    PADDED_ROWS_UNMASKED,
    RUNNER_UP_LIFTED_EVERY_STEP,
)

SCENARIO = Scenario(model="llama", baseline="eager", engine=EngineArgs(mode="graph"), workload="mixed", max_new_tokens=32)
WITH_PREFILL_GRAPHS = dataclasses.replace(SCENARIO, engine=EngineArgs(mode="graph", prefill_graphs=True))

# bfloat16 is where float noise between kernels is widest; float32 exists only where attention has it.
DTYPES = ["float32", "bfloat16"]
SUPPORTED = [name for name, release in RELEASES.items() if float(name) >= float(TORCH_NPU_FLOOR.name)]


def in_dtype(device: str, dtype: str, scenario: Scenario = SCENARIO) -> Scenario:
    """`scenario` in `dtype`, or a skip where the device's attention has no float32 (npu: FIA)."""
    if dtype == "float32" and default_dtype(device) != "float32":
        pytest.skip(f"{device} attention has no float32: its bfloat16 case is this test there")
    return dataclasses.replace(scenario, engine=dataclasses.replace(scenario.engine, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_runner_passes_the_fault_scenario(check, device, dtype):
    result = check(in_dtype(device, dtype))
    assert result.failures == []
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fault", FAULTS)
def test_injected_fault_is_caught(check, monkeypatch, device, fault, dtype):
    if reason := FAULTS[fault].skip_reason(device):
        pytest.skip(reason)
    scenario = in_dtype(device, dtype)
    FAULTS[fault].inject(monkeypatch)
    FAULTS[fault].assert_caught(check(scenario))


@pytest.mark.parametrize("release", SUPPORTED)
def test_correct_runner_passes_under_every_torch_npu_release_from_the_floor(check, monkeypatch, device, release):
    if device != "cpu":
        pytest.skip(f"the torch_npu release is emulated on the CPU only; on {device} the installed one runs")
    monkeypatch.setattr(emulation, "EMULATED_RELEASE", RELEASES[release])
    result = check(SCENARIO)
    assert result.failures == []
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("fault", NOT_INTERCEPTED)
def test_fia_not_captured_as_task_groups_exits_2_naming_the_release(monkeypatch, capsys, device, fault):
    if reason := NOT_INTERCEPTED[fault].skip_reason(device):
        pytest.skip(reason)
    NOT_INTERCEPTED[fault].inject(monkeypatch)
    release = emulation.EMULATED_RELEASE
    assert main(["check", "--model", "llama", "--modes", "graph", "--device", device, "--max-new-tokens", "4"]) == EXIT_USAGE
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]  # progress aside
    assert errors == [
        f"npugraph-harness: error: graph bs=8: 0 updatable task groups captured for the step's 2 attention calls: "
        f"{release} (emulated by SimNPUGraph) did not capture FIA (npu_fused_infer_attention_score) as one updatable "
        "task group per call, so update() would change nothing and the lengths would stay frozen at capture"]


@pytest.mark.parametrize("prefill_graphs", [False, True], ids=["decode-graphs", "decode-and-prefill-graphs"])
def test_correct_runner_passes_with_and_without_prefill_graphs(check, prefill_graphs):
    result = check(WITH_PREFILL_GRAPHS if prefill_graphs else SCENARIO)
    assert result.failures == []
    assert (result.run.graph_steps > 0, result.run.prefill_graph_steps > 0) == (True, prefill_graphs)


@pytest.mark.parametrize("fault", FAMILY_FAULTS)
def test_family_fault_is_caught_where_prefill_graphs_share_the_pool(check, monkeypatch, fault):
    FAMILY_FAULTS[fault].inject(monkeypatch)
    result = check(WITH_PREFILL_GRAPHS)
    assert result.run.prefill_graph_steps > 0
    FAMILY_FAULTS[fault].assert_caught(result)


def test_lazy_copy_out_of_decode_outputs_passes_with_decode_graphs_alone(check, monkeypatch):
    # The twin of prefill_graph_writes_into_live_decode_output: the same runner, no other family in the pool.
    FAMILY_FAULTS["prefill_graph_writes_into_live_decode_output"].inject(monkeypatch)
    result = check(SCENARIO)
    assert result.failures == []
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_padded_rows_reach_a_cross_row_moe_only_unmasked(check, monkeypatch, device, masked):
    if not masked and (reason := PADDED_ROWS_UNMASKED.skip_reason(device)):
        pytest.skip(reason)
    CROSS_ROW_MOE.inject(monkeypatch)
    if not masked:
        PADDED_ROWS_UNMASKED.inject(monkeypatch)
    result = check(dataclasses.replace(SCENARIO, model="qwen2_moe"))
    assert result.run.graph_steps > 0
    if masked:
        assert result.failures == []
    else:
        PADDED_ROWS_UNMASKED.assert_caught(result)


@pytest.mark.parametrize("mode", ["graph", "compile"])
@pytest.mark.parametrize("fault", LATE_FAULTS)
def test_a_fault_late_in_the_sequence_is_caught_in_bfloat16(check, monkeypatch, fault, mode):
    LATE_FAULTS[fault].inject(monkeypatch)
    scenario = dataclasses.replace(SCENARIO, engine=EngineArgs(mode=mode, dtype="bfloat16"))
    result = check(scenario)
    mismatches = [v for v in result.verdicts if v.status == "mismatch"]
    assert mismatches
    prompt_lens = {r.rid: len(r.prompt_ids) for r in make_requests("mixed", 512, SCENARIO.max_new_tokens)}
    # Caught where it strikes: at a step whose forward fed a position of the fourth block.
    assert all(prompt_lens[v.rid] + v.step - 1 >= LATE_FROM_POSITION for v in mismatches)


# Checkpoints the noise profiles were not measured on: a built-in's config with a vocabulary of 640, not 512, so that
# every weight drawn after the embedding differs from the built-in's, at the built-ins' scale.
HELD_OUT = {"moe": "qwen2_moe", "dense": "llama"}
COMPILED_BFLOAT16 = EngineArgs(mode="compile", dtype="bfloat16")


def held_out(kind: str) -> Scenario:
    checkpoint = ensure_checkpoint(HELD_OUT[kind], vocab_size=640)
    return Scenario(model=str(checkpoint), baseline="eager", engine=COMPILED_BFLOAT16)


@pytest.mark.parametrize("kind", HELD_OUT)
def test_correct_compiled_bfloat16_passes_a_held_out_checkpoint_within_its_noise_profile(check, kind):
    result = check(held_out(kind))
    assert result.failures == []
    assert result.drift_judged == "within the noise profile reference/cpu/bfloat16/across_kernels"


def test_a_runner_up_lifted_by_1_at_every_step_fails_as_systematic_drift_though_every_step_passes(check, monkeypatch):
    RUNNER_UP_LIFTED_EVERY_STEP.inject(monkeypatch)
    result = check(held_out("dense"))
    assert {v.status for v in result.verdicts} <= {"match", "tie"}
    assert result.coverage == 1.0
    assert result.failures and all(f.startswith("systematic drift: ") for f in result.failures)


def test_a_runner_up_lifted_by_3_late_in_the_sequence_fails_as_systematic_drift(check, monkeypatch):
    # A step whose margin lies between the tie margin (1.5) and the lift (3.0) is a mismatch too, where one is struck:
    # the drift statistics fail the scenario whether or not one is.
    LATE_FAULTS["fourth_block_runner_up_boosted"].inject(monkeypatch)
    result = check(held_out("moe"))
    assert any(f.startswith("systematic drift: ") for f in result.failures)
