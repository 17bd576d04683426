"""Fault injection: each known graph-replay bug, injected into the real runner, is caught.

Every fault is a patch of one method of the runner the engine uses (NPUGraphRunner on npu and on
the CPU's SimNPUGraph, GraphRunner on cuda). The unpatched runner passes the very same scenario.
Stale lengths have two forms: a host list that `update()` did not refresh where attention reads host
lists (npu, cpu), and a device `seq_lens` that was not refreshed where it reads those (cuda).
"""
import bisect
import dataclasses

import pytest

from harness.scenarios import Scenario
from reference_runner.graph_runner import GraphRunner, NPUGraphRunner

# The correct methods, taken before any patch.
prepare_static_inputs, replay = GraphRunner.prepare_static_inputs, GraphRunner.replay


def skip_host_list_update(self, bs, seq_lens_cpu):
    self.graphs[bs].replay()  # lengths stay those frozen at capture


def update_with_previous_step_lengths(self, bs, seq_lens_cpu):
    stale = getattr(self, "_previous_seq_lens", seq_lens_cpu)
    self._previous_seq_lens = seq_lens_cpu
    stale = (stale + [self.seq_len_fill_value] * bs)[:bs]
    self.graphs[bs].update(cpu_update_input=[{"actual_seq_lengths_kv": stale}])  # the update raced replay
    self.graphs[bs].replay()


def seq_lens_not_refreshed(self, forward_batch, bs):
    stale = self.seq_lens.clone()
    prepare_static_inputs(self, forward_batch, bs)
    self.seq_lens.copy_(stale)  # attention on cuda reads the capture-time lengths


def padded_rows_keep_stale_slots(self, forward_batch, bs):
    stale = self.out_cache_loc.clone()
    prepare_static_inputs(self, forward_batch, bs)
    # Padded rows keep the out_cache_loc of an earlier, larger batch: live slots, not dummy slot 0.
    self.out_cache_loc[forward_batch.batch_size:].copy_(stale[forward_batch.batch_size:])


def positions_not_refreshed(self, forward_batch, bs):
    stale = self.positions.clone()
    prepare_static_inputs(self, forward_batch, bs)
    self.positions.copy_(stale)


def return_static_output_view(self, forward_batch):
    replay(self, forward_batch)  # the correct replay, whose copy of the outputs is thrown away
    raw_bs = forward_batch.batch_size
    bs = self.capture_bs[bisect.bisect_left(self.capture_bs, raw_bs)]
    return self.output_buffers[bs][:raw_bs]  # read later, after the next replay overwrote it


def never_replay(self, forward_batch):
    return False  # e.g. a wrong graph key: every step silently runs eager


FAULTS = {
    "host_list_update_skipped": (NPUGraphRunner, "replay_graph", skip_host_list_update),
    "update_fed_previous_step_lengths": (NPUGraphRunner, "replay_graph", update_with_previous_step_lengths),
    "device_seq_lens_not_refreshed": (GraphRunner, "prepare_static_inputs", seq_lens_not_refreshed),
    "padded_rows_write_live_slots": (GraphRunner, "prepare_static_inputs", padded_rows_keep_stale_slots),
    "positions_not_refreshed": (GraphRunner, "prepare_static_inputs", positions_not_refreshed),
    "output_read_after_next_replay": (GraphRunner, "replay", return_static_output_view),
    "graph_never_replayed": (GraphRunner, "can_run", never_replay),
}

HOST_LIST_FAULTS = {"host_list_update_skipped", "update_fed_previous_step_lengths"}
DEVICE_LENS_FAULTS = {"device_seq_lens_not_refreshed"}


def skip_unless_applicable(fault: str, device: str) -> None:
    """Skip a stale-lengths fault on a device whose attention reads the other kind of lengths."""
    if fault in HOST_LIST_FAULTS and device == "cuda":
        pytest.skip("cuda graphs have no host-list update: attention reads the device seq_lens")
    if fault in DEVICE_LENS_FAULTS and device != "cuda":
        pytest.skip(f"attention on {device} reads the host lengths (tests/test_devices.py injects this on the "
                    "CPU with the cuda backend)")


SCENARIO = Scenario(model="llama", mode="graph", reference="eager", workload="mixed", max_new_tokens=32)


# float32 becomes the device's default dtype; bfloat16 is where float noise between kernels is widest.
DTYPES = ["float32", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_runner_passes_the_fault_scenario(check, dtype):
    result = check(dataclasses.replace(SCENARIO, dtype=dtype))
    assert result.failures == []
    assert result.run.graph_steps > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fault", FAULTS)
def test_injected_fault_is_caught(check, monkeypatch, device, fault, dtype):
    skip_unless_applicable(fault, device)
    cls, method, broken = FAULTS[fault]
    monkeypatch.setattr(cls, method, broken)
    result = check(dataclasses.replace(SCENARIO, dtype=dtype))
    assert not result.passed
    if fault == "graph_never_replayed":
        assert result.failures == ["no decode step replayed a graph in mode 'graph' (silent eager fallback)"]
    else:
        assert "mismatch" in {v.status for v in result.verdicts}
