"""The fault library: known graph-replay bugs, each a patch of one method of the real runner.

Every fault changes one thing of the correct behaviour and is injected with `Fault.inject`, so that the
suites can show it caught while the unpatched runner passes the same scenario. Faults that run on
launched ranks are `RankJob.setup` functions (`module:function`), called on every rank before its
engine is built, and break rank 1 only. Faults of a target's worker process are `WorkerJob.setup`
functions, called in the worker before its engine is built.
"""
from __future__ import annotations

import bisect
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from reference_runner.attention.base import AttentionBackend
from reference_runner.attention.ops import paged_decode_attention
from reference_runner.attention.torch_native import TorchNativeAttnBackend
from reference_runner.engine.model_runner import ModelRunner
from reference_runner.graphs import cpu as cpu_graphs
from reference_runner.graphs import runner as runner_module
from reference_runner.graphs.releases import RELEASES
from reference_runner.graphs.runner import GraphRunner, NPUGraphRunner
from reference_runner.models.layers import RowParallelLinear
from reference_runner.models.moe import FusedMoE, SparseMoeBlock, select_experts

# The correct methods, taken before any patch.
prepare_static_inputs, replay, capture = GraphRunner.prepare_static_inputs, GraphRunner.replay, GraphRunner.capture
update_graph, experts_forward = NPUGraphRunner.update_graph, FusedMoE.forward

HANG, RACE = "would wait forever", "UpdateRace"  # how a failure names a replay that hangs, an update that races


@dataclass(frozen=True)
class Fault:
    """`replacement` patched over `owner.attribute` (a class's method, or a module's global).

    `lengths` names the kind of KV lengths a stale-lengths fault corrupts ("host" lists or "device" seq_lens),
    which shows only where attention reads that kind. `symptom` is what the scenario's failure says (None: a
    token mismatch). `release`: the torch_npu release line the CPU emulation takes for the bug to exist.
    `cpu_only`: why the fault shows only in the CPU emulation, where it does.
    """

    owner: Any
    attribute: str
    replacement: Any
    lengths: str | None = None
    symptom: str | None = None
    release: str | None = None
    cpu_only: str | None = None

    def inject(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(self.owner, self.attribute, self.replacement)
        if self.release is not None:
            monkeypatch.setattr(cpu_graphs, "EMULATED_RELEASE", RELEASES[self.release])

    def skip_reason(self, device: str) -> str | None:
        """Why this fault cannot show on `device`, or None."""
        if self.lengths == "host" and device == "cuda":
            return "cuda graphs have no host-list update: attention reads the device seq_lens"
        if self.lengths == "device" and device != "cuda":
            return (f"attention on {device} reads the host lengths (tests/runner/test_devices.py injects this on the "
                    "CPU with the cuda backend)")
        if self.cpu_only is not None and device != "cpu":
            return self.cpu_only
        return None

    def assert_caught(self, result) -> None:
        """The scenario `result` failed as this fault fails it: with its symptom and no mismatch, or a mismatch."""
        assert not result.passed
        statuses = {v.status for v in result.verdicts}
        if self.symptom is None:
            assert "mismatch" in statuses
        else:
            assert any(self.symptom in failure for failure in result.failures), result.failures
            assert "mismatch" not in statuses


# --- stale lengths and hangs: each replay consumes its update -----------------------------------

def skip_host_list_update(self, bs, seq_lens_cpu):
    pass  # lengths stay those frozen at capture; on an NPU the replay waits forever for its update


def update_with_previous_step_lengths(self, bs, seq_lens_cpu):
    stale = getattr(self, "_previous_seq_lens", seq_lens_cpu)
    self._previous_seq_lens = seq_lens_cpu
    update_graph(self, bs, (stale + [self.seq_len_fill_value] * bs)[:bs])  # the update raced replay


def update_only_on_bucket_change(self, bs, seq_lens_cpu):
    """The bug: update() only when the step moves to another captured size, as if an update lasted until the next."""
    if getattr(self, "_updated_bs", None) != bs:
        update_graph(self, bs, seq_lens_cpu)
    self._updated_bs = bs


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


# --- ordering: replays in flight, the shared update stream --------------------------------------

def replay_not_awaited(self, bs):
    pass  # the host runs ahead: the next update() of this graph may land while this replay still runs


class _OtherThreadInside(dict):
    """Host arguments whose reading (inside update(), between graph_task_update_begin and _end) runs `other` on
    another thread and waits for it: the interleaving that two update threads reach by chance, made certain."""

    def __init__(self, items: dict, other) -> None:
        super().__init__(items)
        self.other = other

    def __getitem__(self, key):
        if self.other is not None:
            other, self.other = self.other, None
            errors = []
            thread = threading.Thread(target=lambda: _collect(other, errors))
            thread.start()
            thread.join()
            if errors:
                raise errors[0]
        return super().__getitem__(key)


def _collect(fn, errors: list) -> None:
    try:
        fn()
    except Exception as error:  # handed to the thread that waits
        errors.append(error)


def pre_update_next_bucket_on_a_thread(self, bs, seq_lens_cpu):
    """The bug: while this step's graph is updated, a second thread updates the next larger size's graph (so that a
    growing batch finds it ready): two graphs updated at once, on the update stream torch_npu 7.3+ shares."""
    larger = [size for size in self.capture_bs if size > bs]
    if not larger:
        return update_graph(self, bs, seq_lens_cpu)
    other = larger[0]
    padded = seq_lens_cpu + [self.seq_len_fill_value] * (other - bs)
    pre_update = lambda: update_graph(self, other, padded)  # noqa: E731
    (update,) = self.attn_backend.graph_update_input(seq_lens_cpu)
    graph = self.graphs[bs]
    graph.update(cpu_update_input=[_OtherThreadInside(update, pre_update)] * self.backend.task_groups(graph))


# --- families of graphs in one pool: decode and prefill ---------------------------------------------

DECODE, PREFILL = "graph bs", "prefill graph tokens"  # the graph names of each family's runner


def copy_out_before_own_next_replay(self, forward_batch):
    """The bug: the decode runner hands out a view of its pool output and copies it out only before its own next
    replay, which holds while decode graphs are alone in the pool: a prefill graph replayed in between (the next
    step's prefill, before the engine reads this step's logits) writes into the decode graph's live output."""
    if self.name != DECODE:
        return replay(self, forward_batch)
    held = getattr(self, "_held", None)
    if held is not None:
        held.data = held.clone()  # copied out just before this runner's replay would overwrite it
    replay(self, forward_batch)  # the correct replay, whose copy of the outputs is thrown away
    raw_bs = forward_batch.batch_size
    bs = self.capture_bs[bisect.bisect_left(self.capture_bs, raw_bs)]
    self._held = self.output_buffers[bs][:raw_bs]
    return self._held


def prefill_output_view(self, forward_batch):
    """The bug: the prefill runner returns a view of its pool output; the engine reads the prefill's logprobs
    after the same step's decode replay has written over it."""
    if self.name != PREFILL:
        return replay(self, forward_batch)
    replay(self, forward_batch)
    raw_bs = forward_batch.batch_size
    return self.output_buffers[self.capture_bs[bisect.bisect_left(self.capture_bs, raw_bs)]][:raw_bs]


# Each needs prefill graphs in the decode graphs' pool; alone in the pool, the decode runner's lazy copy is correct.
FAMILY_FAULTS = {
    "prefill_graph_writes_into_live_decode_output": Fault(GraphRunner, "replay", copy_out_before_own_next_replay),
    "output_read_after_another_familys_replay": Fault(GraphRunner, "replay", prefill_output_view),
}
# The bug: graphs keep replaying on the KV cache they were captured on after it was reallocated.
STALE_KV_CACHE = Fault(GraphRunner, "recapture_if_kv_cache_moved", lambda self: None)


FAULTS = {
    "host_list_update_skipped": Fault(NPUGraphRunner, "update_graph", skip_host_list_update, lengths="host",
                                      symptom=HANG),
    "update_skipped_when_the_size_repeats": Fault(NPUGraphRunner, "update_graph", update_only_on_bucket_change,
                                                  lengths="host", symptom=HANG),
    "update_fed_previous_step_lengths": Fault(NPUGraphRunner, "update_graph", update_with_previous_step_lengths,
                                              lengths="host"),
    "device_seq_lens_not_refreshed": Fault(GraphRunner, "prepare_static_inputs", seq_lens_not_refreshed,
                                           lengths="device"),
    "padded_rows_write_live_slots": Fault(GraphRunner, "prepare_static_inputs", padded_rows_keep_stale_slots),
    "positions_not_refreshed": Fault(GraphRunner, "prepare_static_inputs", positions_not_refreshed),
    "output_read_after_next_replay": Fault(GraphRunner, "replay", return_static_output_view),
    "graph_never_replayed": Fault(GraphRunner, "can_run", never_replay,
                                  symptom="no decode step replayed a graph in mode 'graph' (silent eager fallback)"),
    "update_while_replay_in_flight": Fault(
        NPUGraphRunner, "wait_for_replay", replay_not_awaited, symptom="may still be in flight",
        cpu_only="on an NPU the race shows only when the host outruns the device (SimNPUGraph keeps replays in flight)"),
    "two_graphs_updated_at_once": Fault(
        NPUGraphRunner, "update_graph", pre_update_next_bucket_on_a_thread, symptom="same update stream",
        release="7.3", cpu_only="the two threads meet inside update() for certain only in the emulation"),
}
STALE_LENGTHS = sorted(name for name, fault in FAULTS.items() if fault.lengths)


# --- FIA not captured as a task group: setup fails (exit 2) ---------------------------------------

def decode_as_plain_kernel(self, q, k, v, layer_id, forward_batch):
    """The bug: decode through a kernel torch_npu does not intercept: its lengths, a tensor made from the host
    list, are a constant of the graph, and no task group exists for update() to refresh."""
    cache = self.kv_cache
    cache.write(layer_id, forward_batch.out_cache_loc, k, v)
    lens = torch.tensor(forward_batch.seq_lens_cpu, device=q.device)
    return paged_decode_attention(q, cache.key_caches[layer_id], cache.value_caches[layer_id],
                                  forward_batch.block_tables, lens, scale=self.scale)


NOT_INTERCEPTED = {
    "decode_kernel_not_updatable": Fault(TorchNativeAttnBackend, "forward_decode", decode_as_plain_kernel,
                                         cpu_only="patches the CPU's attention backend"),
    # The runner calls FIA plainly (`.default`), which torch_npu 7.1 does not match: the `ascend` extra's floor.
    "torch_npu_7_1_skips_fia_default": Fault(cpu_graphs, "EMULATED_RELEASE", RELEASES["7.1"],
                                             cpu_only="emulates an older torch_npu: on npu the installed one decides"),
}


# --- padded rows: FIA's unspecified rows of length 0 meet an op that mixes rows ---------------------

def experts_dispatched_by_matmul(self, x, topk_weights, topk_ids):
    """Not a bug: tokens reach the experts through a one-hot matmul over the batch (GShard's dispatch, capacity =
    tokens), exact for finite rows; but 0 * NaN is NaN, so one NaN row, padding included, reaches every row."""
    dispatch = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return experts_forward(self, dispatch @ x, topk_weights, topk_ids)


CROSS_ROW_MOE = Fault(FusedMoE, "forward", experts_dispatched_by_matmul)
PADDED_ROWS_UNMASKED = Fault(
    AttentionBackend, "mask_padded_rows", lambda self, out, forward_batch: out,
    cpu_only="what FIA writes in a row of length 0 is unspecified: the CPU's FIA stand-in writes NaN there")


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


# --- drift: a runner-up lifted a little -------------------------------------------------------------
# Each step stays within the per-step tolerance of compiled bfloat16 (a logprob drift below 3.0, flips below the
# tie margin 1.5 excused as near-ties); only the drift statistics over the scenario catch them (noise.py), or, at
# +0.5, the figure stored for the scenario (drift_baseline.py). Struck late in a sequence, the requests have met
# their first near-ties already: caught only if the comparison goes on past them (the judge's forced continuation).

def runner_up_lifted(by: float, from_position: int = 0) -> Fault:
    """The bug: after each replay, `by` is added to the runner-up logit of every row decoding at position
    `from_position` or later, as a kernel that skews its output a little would (late: a block-table bug near the end
    of a sequence)."""

    def lift_runner_up(self, forward_batch):
        logits = replay(self, forward_batch)
        struck = forward_batch.positions >= from_position
        runner_up = logits.topk(2, dim=-1).indices[:, 1:]
        return logits.scatter_add(1, runner_up, by * struck[:, None].to(logits.dtype))

    return Fault(GraphRunner, "replay", lift_runner_up)


LATE_FROM_POSITION = 48  # the fourth block at the scenarios' block size, 16
LATE_FAULTS = {"fourth_block_runner_up_boosted": runner_up_lifted(3.0, from_position=LATE_FROM_POSITION)}
RUNNER_UP_LIFTED_EVERY_STEP = runner_up_lifted(1.0)
PLANTED_DRIFT = runner_up_lifted(0.5)  # for the precision baseline (check --drift-baseline)


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


def stops_itself(parallel) -> None:
    """Rank 1 stops (SIGSTOP) once it has joined, as under a stray Ctrl-Z; its peers wait in their first collective."""
    if parallel.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)


RANK_FAULTS = {f.__name__: f"{__name__}:{f.__name__}" for f in (
    all_reduce_missing_in_graph, pads_to_its_own_bucket, raises_mid_run, raises_at_start, hangs_outside_collectives,
    every_rank_hangs, stops_itself)}


# --- a target's worker process (WorkerJob.setup) -------------------------------------------------

def worker_raises(job) -> None:
    raise RuntimeError("injected")


def worker_is_killed(job) -> None:
    """The worker dies of SIGKILL, as under the kernel's OOM killer, having printed one line."""
    print("about to be killed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def worker_hangs(job) -> None:
    """The worker hangs after starting a process of its own (as engines start theirs): both must be ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    print(f"worker {os.getpid()} started process {child.pid}", flush=True)
    time.sleep(3600)


PERTURBED_REQUEST, PERTURBED_STEP = "r1", 4


def vllm_compiled_logits_perturbed(job) -> None:
    """vLLM in compile mode: at step 4 of request r1, the runner-up token's logit is lifted above the top one, as a
    miscompiled kernel that misranks one token would; every other step and request, and the other modes, are left
    alone. A logits processor selected per request (`SamplingParams.extra_args`), vLLM's public hook."""
    if job.engine.mode != "compile":
        return
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    from harness.targets import vllm as target

    class LiftRunnerUp(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False  # else vLLM skips it for greedy requests

        def new_req_logits_processor(self, params):
            if not (params.extra_args or {}).get("perturbed"):
                return None

            def lift(output_ids, logits):
                if len(output_ids) == PERTURBED_STEP:
                    top = torch.topk(logits, 2)
                    logits[top.indices[1]] = top.values[0] + 1.0
                return logits

            return lift

    llm_args, sampling_params = target.llm_args, target.sampling_params

    def with_processor(job, config):
        args = llm_args(job, config)
        return {**args, "logits_processors": [*args["logits_processors"], LiftRunnerUp]}

    target.llm_args = with_processor
    target.sampling_params = lambda requests, top_k: [
        {**params, "extra_args": {**params.get("extra_args", {}), "perturbed": True}}
        if request.rid == PERTURBED_REQUEST else params
        for request, params in zip(requests, sampling_params(requests, top_k))]


# A fault that goes wrong late: from the step after each request's first near-tie (its top-2 logit margin below the
# tie margin of bfloat16 across kernels), the runner-up's logit lifted by LATE_LIFT at every step. A comparison that
# stops at the first near-tie of each request never sees it; one carried past near-ties does.
LATE_TIE_MARGIN, LATE_LIFT = 1.5, 3.0


def _lift_after_first_near_tie(logits: torch.Tensor, tied: list[bool]) -> None:
    """On one request's logits (a row): lift the runner-up if `tied[0]` (its first near-tie is behind it), else note
    a near-tie."""
    top = logits.topk(2)
    if tied[0]:
        logits[top.indices[1]] += LATE_LIFT
    elif top.values[0] - top.values[1] < LATE_TIE_MARGIN:
        tied[0] = True


def vllm_compiled_runner_up_lifted_after_first_near_tie(job) -> None:
    """vLLM in compile mode, LATE_LIFT after each request's first near-tie: on the logits the sampler takes its
    logprobs from, as a kernel miscompiled for long sequences would compute them. Every other mode is left alone."""
    if job.engine.mode != "compile":
        return
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.sampler import Sampler

    from harness.targets import vllm as target
    from harness.targets.vllm_forcing import follow_batch

    class Rows(LogitsProcessor):
        """Per row of the batch, whether its request has met its first near-tie (the logits are left alone here)."""

        def __init__(self, vllm_config, device, is_pin_memory) -> None:
            self.tied: dict[int, list[bool]] = {}

        def is_argmax_invariant(self) -> bool:
            return True

        def update_state(self, batch_update) -> None:
            follow_batch(self.tied, batch_update, lambda params, output: [False])

        def apply(self, logits):
            return logits

    forward, llm_args = Sampler.forward, target.llm_args

    def lifted(self, logits, sampling_metadata, *args, **kwargs):
        for rows in (p for p in sampling_metadata.logitsprocs.all if isinstance(p, Rows)):
            for index, tied in rows.tied.items():
                _lift_after_first_near_tie(logits[index], tied)
        return forward(self, logits, sampling_metadata, *args, **kwargs)

    def with_rows(job, config):
        args = llm_args(job, config)
        return {**args, "logits_processors": [*args["logits_processors"], Rows]}

    Sampler.forward, target.llm_args = lifted, with_rows


def sglang_runner_up_lifted_after_first_near_tie(job) -> None:
    """SGLang, LATE_LIFT after each request's first near-tie (each continuation is a request of its own to SGLang):
    through a custom logit processor on every request, whose changes SGLang's logprobs show."""
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


    class AfterFirstNearTie(CustomLogitProcessor):
        tied: ClassVar[dict[str, list[bool]]] = {}  # by SGLang's own request id

        def __call__(self, logits, custom_param_list=None):
            for row, params in enumerate(custom_param_list):
                _lift_after_first_near_tie(logits[row], AfterFirstNearTie.tied.setdefault(params["__req__"].rid, [False]))
            return logits

    _with_sglang_processor(AfterFirstNearTie, lambda request: True)


def sglang_logits_perturbed(job) -> None:
    """SGLang: at step 4 of request r1, the runner-up token's logit is lifted above the top one, as a kernel that
    misranks one token would; every other step and request is left alone. SGLang returns the logprobs it leaves."""

    def lift_runner_up(logits):
        top = torch.topk(logits, 2)
        logits[top.indices[1]] = top.values[0] + 1.0

    _at_sglang_step(PERTURBED_STEP, lift_runner_up)


def sglang_scheduler_crashes(job) -> None:
    """SGLang's scheduler process raises at step 2 of request r1, mid-run, as an engine crash would."""

    def crash(logits):
        raise RuntimeError("injected scheduler crash")

    _at_sglang_step(2, crash)


def sglang_scheduler_hangs(job) -> None:
    """SGLang's scheduler process hangs at step 2 of request r1, mid-run, as a stuck kernel would."""

    def hang(logits):
        time.sleep(3600)

    _at_sglang_step(2, hang)


def _at_sglang_step(step: int, fault) -> None:
    """`fault(logits)` on request r1's logits at decode `step`, in SGLang's scheduler: through a custom logit processor
    (SGLang's public hook, `enable_custom_logit_processor`) given to r1 alone."""
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


    class AtStep(CustomLogitProcessor):
        # Per request, the steps sampled so far: called once per step, the prefill's first. (Its output_ids cannot
        # say which step: the overlap scheduler appends each token a step late.)
        sampled: ClassVar[dict[str, int]] = {}

        def __call__(self, logits, custom_param_list=None):
            # Each row's custom_params, with its request under "__req__" (SGLang adds it where custom_params is a dict).
            for row, params in enumerate(custom_param_list):
                rid = params["__req__"].rid
                AtStep.sampled[rid] = AtStep.sampled.get(rid, -1) + 1
                if AtStep.sampled[rid] == step:
                    fault(logits[row])
            return logits

    _with_sglang_processor(AtStep, lambda request: request.rid == PERTURBED_REQUEST)


def _with_sglang_processor(processor, chosen) -> None:
    """SGLang's engine started with custom logit processors enabled, and `processor` (a CustomLogitProcessor class)
    given to the requests `chosen(request)` picks, each with a dict of custom params (SGLang then adds the request)."""
    from harness.targets import sglang as target

    engine_args, generate_args = target.engine_args, target.generate_args

    def with_processor(requests, top_k):
        args = generate_args(requests, top_k)
        picked = [chosen(request) for request in requests]
        args["sampling_params"] = [{**params, "custom_params": {}} if pick else params
                                   for params, pick in zip(args["sampling_params"], picked)]
        args["custom_logit_processor"] = [processor.to_str() if pick else None for pick in picked]
        return args

    target.engine_args = lambda *args: {**engine_args(*args), "enable_custom_logit_processor": True}
    target.generate_args = with_processor


WORKER_FAULTS = {f.__name__: f"{__name__}:{f.__name__}" for f in (
    worker_raises, worker_is_killed, worker_hangs, vllm_compiled_logits_perturbed,
    vllm_compiled_runner_up_lifted_after_first_near_tie, sglang_logits_perturbed, sglang_runner_up_lifted_after_first_near_tie,
    sglang_scheduler_crashes, sglang_scheduler_hangs)}
