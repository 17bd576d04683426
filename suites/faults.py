"""The fault library: known graph-replay bugs, each a patch of one method of the real runner.

Every fault changes one thing of the correct behaviour and is injected with `Fault.inject`, so that the
suites can show it caught while the unpatched runner passes the same scenario. Faults that run on
launched ranks are `RankJob.setup` functions (`module:function`), called on every rank before its
engine is built, and break rank 1 only.
"""
from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch.nn.functional as F

from reference_runner.engine.model_runner import ModelRunner
from reference_runner.graphs import runner as runner_module
from reference_runner.graphs.runner import GraphRunner, NPUGraphRunner
from reference_runner.models.layers import RowParallelLinear
from reference_runner.models.moe import SparseMoeBlock, select_experts

# The correct methods, taken before any patch.
prepare_static_inputs, replay, capture = GraphRunner.prepare_static_inputs, GraphRunner.replay, GraphRunner.capture


@dataclass(frozen=True)
class Fault:
    """`replacement` patched over `owner.attribute`; `lengths` names the kind of KV lengths a stale-lengths
    fault corrupts ("host" lists or "device" seq_lens), which shows only where attention reads that kind."""

    owner: type
    attribute: str
    replacement: Callable
    lengths: str | None = None

    def inject(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(self.owner, self.attribute, self.replacement)

    def skip_reason(self, device: str) -> str | None:
        """Why this fault cannot show on `device`, or None."""
        if self.lengths == "host" and device == "cuda":
            return "cuda graphs have no host-list update: attention reads the device seq_lens"
        if self.lengths == "device" and device != "cuda":
            return (f"attention on {device} reads the host lengths (tests/runner/test_devices.py injects this on the "
                    "CPU with the cuda backend)")
        return None


# --- stale lengths ------------------------------------------------------------------------------

def skip_host_list_update(self, bs, seq_lens_cpu):
    self.graphs[bs].replay()  # lengths stay those frozen at capture


def update_with_previous_step_lengths(self, bs, seq_lens_cpu):
    stale = getattr(self, "_previous_seq_lens", seq_lens_cpu)
    self._previous_seq_lens = seq_lens_cpu
    stale = (stale + [self.seq_len_fill_value] * bs)[:bs]
    self.graphs[bs].update(cpu_update_input=self.attn_backend.graph_update_input(stale))  # the update raced replay
    self.graphs[bs].replay()


def seq_lens_not_refreshed(self, forward_batch, bs):
    stale = self.seq_lens.clone()
    prepare_static_inputs(self, forward_batch, bs)
    self.seq_lens.copy_(stale)  # attention on cuda reads the capture-time lengths


# --- static inputs ------------------------------------------------------------------------------

def padded_rows_keep_stale_slots(self, forward_batch, bs):
    stale = self.out_cache_loc.clone()
    prepare_static_inputs(self, forward_batch, bs)
    # Padded rows keep the out_cache_loc of an earlier, larger batch: live slots, not dummy slot 0.
    self.out_cache_loc[forward_batch.batch_size:].copy_(stale[forward_batch.batch_size:])


def positions_not_refreshed(self, forward_batch, bs):
    stale = self.positions.clone()
    prepare_static_inputs(self, forward_batch, bs)
    self.positions.copy_(stale)


def block_table_kept_at(width: int) -> Fault:
    """The bug: the static block table never grows past `width` columns (the width seen at capture), so the
    last blocks a sequence grows into near max_context are not copied in and attention reads block 0."""

    def block_table_kept_at_capture_width(self, forward_batch, bs):
        prepare_static_inputs(self, forward_batch, bs)
        self.block_tables[:, width:].zero_()

    return Fault(GraphRunner, "prepare_static_inputs", block_table_kept_at_capture_width)


# --- outputs and replay -------------------------------------------------------------------------

def return_static_output_view(self, forward_batch):
    replay(self, forward_batch)  # the correct replay, whose copy of the outputs is thrown away
    raw_bs = forward_batch.batch_size
    bs = self.capture_bs[bisect.bisect_left(self.capture_bs, raw_bs)]
    return self.output_buffers[bs][:raw_bs]  # read later, after the next replay overwrote it


def never_replay(self, forward_batch):
    return False  # e.g. a wrong graph key: every step silently runs eager


FAULTS = {
    "host_list_update_skipped": Fault(NPUGraphRunner, "replay_graph", skip_host_list_update, lengths="host"),
    "update_fed_previous_step_lengths": Fault(NPUGraphRunner, "replay_graph", update_with_previous_step_lengths,
                                              lengths="host"),
    "device_seq_lens_not_refreshed": Fault(GraphRunner, "prepare_static_inputs", seq_lens_not_refreshed,
                                           lengths="device"),
    "padded_rows_write_live_slots": Fault(GraphRunner, "prepare_static_inputs", padded_rows_keep_stale_slots),
    "positions_not_refreshed": Fault(GraphRunner, "prepare_static_inputs", positions_not_refreshed),
    "output_read_after_next_replay": Fault(GraphRunner, "replay", return_static_output_view),
    "graph_never_replayed": Fault(GraphRunner, "can_run", never_replay),
}
STALE_LENGTHS = sorted(name for name, fault in FAULTS.items() if fault.lengths)


# --- MoE ----------------------------------------------------------------------------------------

def capture_with_routing_frozen(self):
    """The bug: each MoE block routes the warmup batch once and the captured graph reads that routing
    from a static buffer instead of running the router's top-k again: every replay reuses it."""
    frozen = self.frozen_routing = {}  # a static buffer of the runner: alive as long as its graphs

    def routed_once(block, router_logits):
        key = (id(block), router_logits.shape[0])
        if key not in frozen:
            frozen[key] = select_experts(router_logits, block.top_k, block.renormalize)
        return frozen[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SparseMoeBlock, "select_experts", routed_once)
        capture(self)


ROUTING_FROZEN = Fault(GraphRunner, "capture", capture_with_routing_frozen)


# --- late in a sequence --------------------------------------------------------------------------
# Faults that strike only after the first near-ties of a request: caught only if the comparison goes on
# past a near-tie (the judge's forced continuation).

def runner_up_boosted_in_fourth_block(self, forward_batch):
    """The bug: every row decoding in its fourth KV block (positions >= 3 blocks) gets 3.0 added to its
    runner-up logit, as a block-table bug near the end of a sequence would skew it."""
    logits = replay(self, forward_batch)
    late = forward_batch.positions >= 3 * self.model_runner.kv_cache.block_size
    runner_up = logits.topk(2, dim=-1).indices[:, 1:]
    return logits.scatter_add(1, runner_up, 3.0 * late[:, None].to(logits.dtype))


LATE_FAULTS = {"fourth_block_runner_up_boosted": Fault(GraphRunner, "replay", runner_up_boosted_in_fourth_block)}
LATE_FROM_POSITION = 48  # the fourth block at the scenarios' block size, 16


# --- one rank of several (RankJob.setup) ---------------------------------------------------------

def all_reduce_missing_in_graph(parallel) -> None:
    """Rank 1 captures its row-parallel layers without their all-reduce: its partial sums stay partial."""
    if parallel.rank != 1:
        return

    def capture_without_all_reduce(self):
        forward = RowParallelLinear.forward
        RowParallelLinear.forward = lambda layer, x: F.linear(x, layer.weight, layer.bias)
        try:
            capture(self)
        finally:
            RowParallelLinear.forward = forward

    GraphRunner.capture = capture_without_all_reduce


def pads_to_its_own_bucket(parallel) -> None:
    """Rank 1 pads each decode batch to the bucket of its own batch size, not of the largest DP rank's."""
    if parallel.rank == 1:
        runner_module.dp_buffer_len = lambda forward_batch: forward_batch.batch_size


def raises_mid_run(parallel) -> None:
    """Rank 1 raises at its 6th forward."""
    if parallel.rank != 1:
        return
    forward, calls = ModelRunner.forward, itertools.count(1)

    def failing_forward(self, forward_batch):
        if next(calls) == 6:
            raise RuntimeError("injected failure at forward 6")
        return forward(self, forward_batch)

    ModelRunner.forward = failing_forward


def raises_at_start(parallel) -> None:
    """Rank 1 raises before building its engine."""
    if parallel.rank == 1:
        raise RuntimeError("injected")


def hangs_outside_collectives(parallel) -> None:
    """Rank 1 never reaches its first collective; its peers wait in theirs."""
    if parallel.rank == 1:
        time.sleep(3600)


def every_rank_hangs(parallel) -> None:
    time.sleep(3600)


RANK_FAULTS = {f.__name__: f"{__name__}:{f.__name__}" for f in (
    all_reduce_missing_in_graph, pads_to_its_own_bucket, raises_mid_run, raises_at_start, hangs_outside_collectives,
    every_rank_hangs)}
