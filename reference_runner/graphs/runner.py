"""Graph runners: capture the decode step once per batch size, replay it with padded batches.

Shaped like SGLang's `CudaGraphRunner` / `NPUGraphRunner`: static buffers sized `max_bs` shared by
every captured size, graphs captured largest first into one memory pool, and a replay that pads
the batch to the next captured size, refreshes every static input, replays and copies the real
rows of the output out before anything can replay again. MoE models add the routing buffers
(`ExpertRouting`): the experts replayed in, the routers' own choices out, copied out like the logits.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from reference_runner.engine.args import EngineArgs
from reference_runner.engine.forward_batch import ExpertRouting, ForwardBatch, ForwardMode
from reference_runner.errors import ReplayHang, TaskGroupMismatch
from reference_runner.graphs import get_graph_backend
from reference_runner.graphs.base import DeviceGraph, GraphBackend
from reference_runner.graphs.compiled import mark_dynamic_batch
from reference_runner.parallel.dp_attention import dp_buffer_len


def get_capture_bs(max_bs: int, graph_bs: tuple[int, ...] | None = None) -> list[int]:
    """Batch sizes to capture: `[1, 2, 4, 8] + range(16, max_bs + 1, 8)` (plus `max_bs`), or `graph_bs`."""
    if graph_bs is not None:
        sizes = sorted(set(graph_bs))
        if not sizes or sizes[0] < 1 or sizes[-1] > max_bs:
            raise ValueError(f"graph_bs {graph_bs} must be non-empty batch sizes in 1..max_bs={max_bs}")
        return sizes
    sizes = [bs for bs in [1, 2, 4, 8, *range(16, max_bs + 1, 8)] if bs <= max_bs]
    return sizes if sizes[-1] == max_bs else [*sizes, max_bs]


@dataclass
class GraphStats:
    """How decode and prefill steps ran: replayed graphs, eager steps, and why each eager step fell back
    (prefill steps are counted where prefill graphs are on)."""

    graph_steps: int = 0
    eager_steps: int = 0
    prefill_graph_steps: int = 0
    prefill_eager_steps: int = 0
    fallback_reasons: Counter = field(default_factory=Counter)


class GraphRunner:
    """Captures `model_runner.forward_eager` for each size in `capture_bs` and replays it.

    The attention backend supplies the graph policy: the length of a padded row, and what (if anything)
    must be refreshed on the host before a replay. This class replays as CUDA graphs do, with no update:
    attention must read device lengths; `NPUGraphRunner` refreshes host lists.

    A runner captures one family of graphs: decode (a row per request) by default, or another `forward`
    over decode-shaped rows (prefill: a row per token, `graphs/prefill.py`) named by `name`, into `pool`
    when families share one. Graphs hold the KV cache's addresses: once it is reallocated, the next
    replay captures every graph of the runner again (`recaptures`) instead of reading the old pools.
    """

    num_warmup = 2
    refreshes_host_lists: ClassVar[bool] = False

    def __init__(self, model_runner, backend: GraphBackend, max_bs: int, graph_bs: tuple[int, ...] | None = None,
                 replay_timeout_s: float = EngineArgs.replay_timeout_s, *, forward: Callable | None = None,
                 name: str = "graph bs", pool: Any = None) -> None:
        self.model_runner = model_runner
        self.forward = forward or model_runner.forward_eager
        self.name = name
        self.pool = pool
        self.recaptures = 0
        # Why the last replay() ran no captured graph (graph trees may record or run eagerly); None: it replayed one.
        self.replay_fallback: str | None = None
        self.replay_timeout_s = replay_timeout_s
        self.attn_backend = model_runner.attn_backend
        if self.attn_backend.host_list is not None and not self.refreshes_host_lists:
            raise ValueError(f"{type(self.attn_backend).__name__} reads the host list {self.attn_backend.host_list!r}, "
                             f"which {type(self).__name__} cannot refresh between replays")
        self.device = model_runner.device
        self.backend = backend
        self.capture_bs = get_capture_bs(max_bs, graph_bs)
        self.max_bs = self.capture_bs[-1]
        self.seq_len_fill_value = self.attn_backend.seq_len_fill_value
        self.bucket_hits: Counter = Counter()  # captured size -> replays
        max_blocks = model_runner.kv_cache.max_blocks_per_seq
        with torch.device(self.device):
            self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64)
            self.positions = torch.zeros(self.max_bs, dtype=torch.int64)
            self.out_cache_loc = torch.zeros(self.max_bs, dtype=model_runner.kv_cache.slot_dtype)
            self.seq_lens = torch.full((self.max_bs,), self.seq_len_fill_value, dtype=torch.int32)
            self.block_tables = torch.zeros(self.max_bs, max_blocks, dtype=torch.int32)
        self.routing: ExpertRouting | None = model_runner.own_routing(self.max_bs)
        self.graphs: dict[int, DeviceGraph] = {}
        self.output_buffers: dict[int, torch.Tensor] = {}
        self.capture()

    def memory_report(self) -> dict[str, int]:
        """Bytes held by the graphs and static buffers: the largest size alone (measured right after it
        was captured, first) and all sizes; sharing one pool keeps the two close."""
        return {"largest_bucket_bytes": self.largest_bucket_bytes, "all_buckets_bytes": self.graph_memory_bytes()}

    def graph_memory_bytes(self) -> int:
        """Bytes held by every captured graph plus the static buffers they share."""
        return self.pool_bytes() + self.static_bytes()

    def pool_bytes(self) -> int:
        """Bytes the graphs hold in their pool (shared with the other families of graphs in it)."""
        return self.backend.pool_bytes(self.pool)

    def static_bytes(self) -> int:
        """Bytes of this runner's static input buffers."""
        buffers = (self.input_ids, self.positions, self.out_cache_loc, self.seq_lens, self.block_tables)
        routing = () if self.routing is None else (self.routing.replay_ids, self.routing.topk_ids, self.routing.gaps)
        return sum(b.untyped_storage().nbytes() for b in (*buffers, *routing))

    def fallback_reason(self, forward_batch: ForwardBatch) -> str | None:
        """Why this batch cannot replay a graph, or None when it can."""
        if forward_batch.forward_mode is not ForwardMode.DECODE:
            return "not a decode batch"
        if forward_batch.batch_size > self.max_bs:
            return f"batch size {forward_batch.batch_size} above max_bs {self.max_bs}"
        if dp_buffer_len(forward_batch) > self.max_bs:  # every DP rank falls back together
            return f"another DP rank's batch size {dp_buffer_len(forward_batch)} above max_bs {self.max_bs}"
        return None

    def can_run(self, forward_batch: ForwardBatch) -> bool:
        """Whether this batch replays a graph (SGLang's `can_run`)."""
        return self.fallback_reason(forward_batch) is None

    def capture(self) -> None:
        """Capture every size of the family, largest first (smaller graphs reuse its pool memory), on the KV cache
        where it is now."""
        self.prepare_capture()
        self.captured_on = self.model_runner.kv_cache.data_ptrs()
        self.pad_static_inputs(0, self.max_bs)  # warmups write dummy slot 0, never a live slot of the last replay
        for bs in reversed(self.capture_bs):
            self.capture_size(bs)
            if bs == self.max_bs:
                self.largest_bucket_bytes = self.graph_memory_bytes()
        self.family_bytes = self.graph_memory_bytes()  # with the families captured before into the same pool

    def prepare_capture(self) -> None:
        """The pool the graphs go into and the forward they capture (compiled first in compile-then-capture)."""
        if self.pool is None:
            self.pool = self.backend.graph_pool_handle()
        self.captured_forward = self.forward
        if self.backend.compile_forward is not None:
            self.captured_forward = self.backend.compile_forward(self.forward)

    def capture_size(self, bs: int) -> None:
        """Warm up the forward of size `bs` and capture it into the pool."""
        forward_batch = self.static_batch(bs, [self.seq_len_fill_value] * bs)
        if self.backend.dynamic_batch:
            mark_dynamic_batch(forward_batch)
        for _ in range(self.num_warmup):
            self.captured_forward(forward_batch)
        graph = self.backend.new_graph(f"{self.name}={bs}")
        with self.backend.capture(graph, self.pool):
            output = self.captured_forward(forward_batch)
        self.graphs[bs], self.output_buffers[bs] = graph, output

    def recapture_if_kv_cache_moved(self) -> None:
        """Capture every graph again, into the same pool, when the KV cache no longer lives where they were
        captured: a replay would read and write the old, freed pools (on the CPU: stale ones)."""
        if self.model_runner.kv_cache.data_ptrs() != self.captured_on:
            self.graphs.clear()
            self.output_buffers.clear()
            self.capture()
            self.recaptures += 1

    def static_batch(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        """A decode batch made of views of the static buffers: what the graphs were captured on."""
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=seq_lens_cpu,
            block_tables=self.block_tables[:bs],
            routing=None if self.routing is None else self.routing.rows(bs),
        )

    def replay(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Run the decode batch in the graph of the next captured size; returns caller-owned logits."""
        raw_bs = forward_batch.batch_size
        # Under DP attention every rank pads to the bucket of the largest rank's batch: one graph shape.
        bs = self.capture_bs[bisect.bisect_left(self.capture_bs, dp_buffer_len(forward_batch))]
        self.recapture_if_kv_cache_moved()
        self.prepare_static_inputs(forward_batch, bs)
        seq_lens_cpu = forward_batch.seq_lens_cpu + [self.seq_len_fill_value] * (bs - raw_bs)
        self.replay_graph(bs, seq_lens_cpu)
        self.bucket_hits[bs] += 1
        if forward_batch.routing is not None:
            forward_batch.routing.topk_ids.copy_(self.routing.topk_ids[:raw_bs])
            forward_batch.routing.gaps.copy_(self.routing.gaps[:raw_bs])
        # The pool is shared: the next replay of any size may overwrite this buffer.
        return self.output_buffers[bs][:raw_bs].clone()

    def pad_static_inputs(self, start: int, end: int) -> None:
        """Rows `start:end` become padding: they write the dummy slot 0 and read no live block."""
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.out_cache_loc[start:end].zero_()
        self.seq_lens[start:end].fill_(self.seq_len_fill_value)
        self.block_tables[start:end].zero_()

    def prepare_static_inputs(self, forward_batch: ForwardBatch, bs: int) -> None:
        raw_bs = forward_batch.batch_size
        if bs != raw_bs:
            self.pad_static_inputs(raw_bs, bs)
        self.input_ids[:raw_bs].copy_(forward_batch.input_ids)
        self.positions[:raw_bs].copy_(forward_batch.positions)
        self.out_cache_loc[:raw_bs].copy_(forward_batch.out_cache_loc)
        self.seq_lens[:raw_bs].copy_(forward_batch.seq_lens)
        self.block_tables[:raw_bs].copy_(forward_batch.block_tables)
        if self.routing is not None:  # rows without replayed experts (padding, callers without routing) route themselves
            replay_ids = self.routing.replay_ids
            if forward_batch.routing is None:
                replay_ids[:bs].fill_(-1)
            else:
                replay_ids[raw_bs:bs].fill_(-1)
                replay_ids[:raw_bs].copy_(forward_batch.routing.replay_ids)

    def replay_graph(self, bs: int, seq_lens_cpu: list[int]) -> None:
        """CUDA graphs read the device-side `seq_lens`; nothing on the host to refresh."""
        self.graphs[bs].replay()


class NPUGraphRunner(GraphRunner):
    """NPUGraph replay: the host list the attention backend names was frozen at capture, so each replay
    first refreshes it with `graph.update(cpu_update_input=...)`, and each replay consumes its update.

    After capture it counts each graph's task groups: one per attention call, or `update()` would leave the
    others frozen. After each replay it waits for the replay to finish, under a timeout: a replay whose
    task groups were not all updated waits forever on the device, and the next `update()` must not land
    while this replay still runs (it would read the next step's lengths: SGLang #16498).
    """

    refreshes_host_lists = True

    def capture(self) -> None:
        super().capture()
        expected = self.attn_backend.graph_task_groups()
        for bs, graph in self.graphs.items():
            found = self.backend.task_groups(graph)
            if found != expected:
                raise TaskGroupMismatch(
                    f"{self.name}={bs}: {found} updatable task groups captured for the step's {expected} attention calls: "
                    f"{self.backend.release} did not capture FIA (npu_fused_infer_attention_score) as one updatable "
                    "task group per call, so update() would change nothing and the lengths would stay frozen at capture")

    def replay_graph(self, bs: int, seq_lens_cpu: list[int]) -> None:
        self.update_graph(bs, seq_lens_cpu)
        self.graphs[bs].replay()
        self.wait_for_replay(bs)

    def update_graph(self, bs: int, seq_lens_cpu: list[int]) -> None:
        """Refresh the host list of every task group of this graph (one dict, broadcast)."""
        update = self.attn_backend.graph_update_input(seq_lens_cpu)
        if update is not None:
            self.graphs[bs].update(cpu_update_input=update)

    def wait_for_replay(self, bs: int) -> None:
        """Poll an event recorded after the replay until it completes; past `replay_timeout_s` raise ReplayHang
        (the process never blocks on a device that waits forever). Also orders the next `update()` after it."""
        # vLLM-Ascend synchronises before each replay for the same ordering; a poll rather than a blocking
        # synchronize is what lets a hang be turned into an error.
        done = self.backend.new_event()
        done.record()
        deadline, pause = time.monotonic() + self.replay_timeout_s, 1e-5
        while not done.query():
            if time.monotonic() > deadline:
                if self.backend.unblock is not None:
                    self.backend.unblock(self.graphs[bs])
                raise ReplayHang(
                    f"{self.name}={bs}: replay not finished after {self.replay_timeout_s:g} s: it would wait forever, "
                    "for a task group's ExternalEvent that no update() recorded since the previous replay")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)


def make_graph_runner(model_runner, max_bs: int, graph_bs: tuple[int, ...] | None = None, mode: str = "graph",
                      replay_timeout_s: float = EngineArgs.replay_timeout_s, **family: Any) -> GraphRunner:
    """The runner of the device's graph backend for engine `mode` (`NPUGraphRunner` on npu and on the CPU's
    SimNPUGraph, `GraphRunner` on cuda, `GraphTreeRunner` in mode "tree"); `family`: its `forward`, `name`, `pool`."""
    backend = get_graph_backend(model_runner.device, mode)
    return backend.runner_cls(model_runner, backend, max_bs, graph_bs, replay_timeout_s, **family)
