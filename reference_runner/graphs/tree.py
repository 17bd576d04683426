"""Mode `tree`: the step runs through torch's graph trees instead of graphs this runner captures itself.

`torch.compile(mode="reduce-overhead")` hands each compiled step to a graph-tree manager (torch's CUDA graph
trees, `torch/_inductor/cudagraph_trees.py`; torch_npu's NPU graph trees, `torch_npu/npu/_graph_tree.py`, its
port), which warms a function up eagerly, records it into the one pool of the device, then replays it. The
runner keeps what it does in every mode: static buffers, batches padded to the captured sizes (one tree node
per size), outputs copied out before the next step. What the trees add, and this runner counts per step:

- a recorded graph reads its static inputs where they were: the KV cache and the static buffers are marked
  static (`mark_static_address`, unguarded), or the in-place KV writes make the trees skip the step
  ("skipping cudagraphs due to mutated inputs") and run it eagerly; when one moves (the KV cache reallocated)
  the trees re-record;
- a function the trees skipped runs eagerly (`counters["inductor"]["cudagraph_skips"]`), as does one past the
  re-record limit, or a shape past dynamo's recompile limit.

Every step that did not replay a recorded graph is an eager step with its reason (`replay_fallback`): a
warm-up, a (re-)recording, a skip. Written from torch's and torch_npu's sources (docs/npu.md); the tests
drive it with a stand-in manager on the CPU, which has no graph trees.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from reference_runner.errors import GraphTreesUnsupported
from reference_runner.graphs.runner import GraphRunner

# Where `log_cudagraph_skip_and_bump_counter` (torch/_inductor/cudagraph_utils.py) writes each skip's reason;
# torch_npu's trees call the same function.
SKIP_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
# The manager's methods, one per path a call takes (replay a recorded graph, record one, warm up eagerly).
PATHS = {"execute_node": "replay", "record_function": "record", "run_eager": "warm-up"}


@dataclass(frozen=True)
class GraphTrees:
    """A device's graph trees: how to compile a step into them, and the manager that runs it."""

    name: str  # "CUDA graph trees", "NPU graph trees"
    compile: Callable[[Callable], Callable]  # forward -> the same forward, run through the trees
    manager: Callable[[], Any]  # the device's tree manager, None before the first recording
    mark_step_begin: Callable[[], None]  # a new step: outputs of the previous one may be overwritten
    pool_attribute: str  # the manager's attribute holding its pool id
    skip_count: Callable[[], int]  # torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    # Turns an error the trees raise while recording into the one-line reason the mode cannot run (None: a crash).
    refusal: Callable[[BaseException], str | None] = lambda error: None


class TreeProbe:
    """Which path the tree manager took for each call: the manager's `execute_node`, `record_function` and
    `run_eager` are wrapped on the instance; a call that took none of them ran eagerly outside the trees."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._manager: Any = None

    def attach(self, manager: Any) -> None:
        if manager is None or manager is self._manager:
            return
        for method, path in PATHS.items():
            setattr(manager, method, self._counted(getattr(manager, method), path))
        self._manager = manager

    def _counted(self, method: Callable, path: str) -> Callable:
        def counted(*args, **kwargs):
            self.paths.append(path)
            return method(*args, **kwargs)

        return counted


class _SkipReasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage().split("\n")[0])


@dataclass
class TreeCall:
    """How one call went: the paths the manager took, cudagraph skips counted meanwhile and their logged reasons."""

    bs: int
    paths: list[str]
    skips: int
    skip_reasons: list[str]

    @property
    def replayed(self) -> bool:
        return self.paths == ["replay"]


class GraphTreeRunner(GraphRunner):
    """Pads and copies as every runner does, and runs each step through the device's graph trees (`trees`)."""

    # The step reads the host list the attention backend names from its batch, which the runner refreshes each
    # step: whether the trees then bake it in (a re-record per list) or update it is theirs to do, and counted.
    refreshes_host_lists = True
    max_calls_to_replay = 4  # warm-up, record, replay, and one more for a tree that warms up twice

    def prepare_capture(self) -> None:
        """The step compiled into the trees, a static batch per size, and what it writes marked static."""
        self.trees = self.backend.trees
        self.probe = TreeProbe()
        self.compiled = self.trees.compile(self.forward)
        self.batches = {bs: self.static_batch(bs, [self.seq_len_fill_value] * bs) for bs in self.capture_bs}
        self.mark_static()
        self.skipped: dict[int, str] = {}  # size -> why the trees never replayed it

    def capture_size(self, bs: int) -> None:
        """Call the step of size `bs` until the trees replay it; a size they never replay is named, with why."""
        calls = [self.call(bs) for _ in range(self.max_calls_to_replay)]
        if not calls[-1].replayed:  # a skip is logged and counted once, at the call that decided it
            skips = TreeCall(bs, calls[-1].paths, sum(c.skips for c in calls), [r for c in calls for r in c.skip_reasons])
            self.skipped[bs] = self.describe(skips, at_capture=True)

    def mark_static(self) -> None:
        """Mark what the step reads and writes in place as static: the trees then record it at its address
        (re-recording when it moves) instead of skipping a step that writes a non-static input."""
        kv = self.model_runner.kv_cache
        tensors = [*kv.key_caches, *kv.value_caches]
        for batch in self.batches.values():  # MoE routing buffers too: the routers write their choices in place
            fields = [*vars(batch).values(), *(vars(batch.routing).values() if batch.routing is not None else ())]
            tensors += [t for t in fields if isinstance(t, torch.Tensor)]
        for t in tensors:
            torch._dynamo.mark_static_address(t, guard=False)

    def call(self, bs: int) -> TreeCall:
        """Run the step of size `bs` once through the trees; its output stays in their pool until copied out."""
        trees, handler = self.trees, _SkipReasons()
        logger = logging.getLogger(SKIP_LOGGER)
        skips, self.probe.paths = trees.skip_count(), []
        trees.mark_step_begin()  # the previous step's outputs were copied out: the trees may reuse them
        logger.addHandler(handler)
        try:
            with self.refused():
                self.output_buffers[bs] = self.compiled(self.batches[bs])
        finally:
            logger.removeHandler(handler)
        self.probe.attach(trees.manager())
        return TreeCall(bs, self.probe.paths, trees.skip_count() - skips, handler.reasons)

    @contextlib.contextmanager
    def refused(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            reason = self.trees.refusal(error)
            if reason is None:
                raise
            raise GraphTreesUnsupported(f"mode 'tree' on {self.device}: {reason}") from None

    def describe(self, call: TreeCall, at_capture: bool = False) -> str:
        """The fallback reason of a call that replayed no recorded graph."""
        what = f"{self.name}={call.bs}"
        if call.skip_reasons or call.skips:
            why = "; ".join(call.skip_reasons) or f"cudagraph_skips +{call.skips}"
            return f"{what}: {self.trees.name} skipped it, run eagerly ({why})"
        if "record" in call.paths and not at_capture:
            moved = self.model_runner.kv_cache.data_ptrs() != self.captured_on
            why = "the KV cache was reallocated" if moved else "a static input moved or an output is still alive"
            return f"{what}: re-recorded by the {self.trees.name} ({why})"
        if call.paths:
            return f"{what}: {self.trees.name} ran a {call.paths[-1]}, not a replay"
        return f"{what}: run eagerly outside the {self.trees.name} (skipped, past a re-record or recompile limit)"

    def recapture_if_kv_cache_moved(self) -> None:
        """The trees re-record a graph whose static input moved: mark the new pools static, count the re-record."""
        if self.model_runner.kv_cache.data_ptrs() != self.captured_on:
            self.mark_static()

    def replay_graph(self, bs: int, seq_lens_cpu: list[int]) -> None:
        self.batches[bs].seq_lens_cpu = seq_lens_cpu
        call = self.call(bs)
        self.replay_fallback = None if call.replayed else self.skipped.get(bs) or self.describe(call)
        if "record" in call.paths:
            self.captured_on = self.model_runner.kv_cache.data_ptrs()
            self.recaptures += 1

    def pool_bytes(self) -> int:
        manager = self.trees.manager()
        pool = getattr(manager, self.trees.pool_attribute, None) if manager is not None else None
        return 0 if pool is None else self.backend.pool_bytes(pool)


def cuda_graph_trees() -> GraphTrees:
    """torch's CUDA graph trees, behind `torch.compile(mode="reduce-overhead")` (torch 2.11 to 2.13)."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    return GraphTrees(
        name="CUDA graph trees",
        compile=lambda forward: compile_into_trees(forward, mode="reduce-overhead"),
        manager=lambda: cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False),
        mark_step_begin=torch.compiler.cudagraph_mark_step_begin,
        pool_attribute="cuda_graphs_thread_pool",
        skip_count=lambda: counters["inductor"]["cudagraph_skips"],
    )


def compile_into_trees(forward: Callable, **options: Any) -> Callable:
    """`torch.compile(forward, **options)` at static shapes, one entry per captured size (`mode="reduce-overhead"`:
    inductor wraps each in the device's graph trees)."""
    compiled = torch.compile(forward, fullgraph=True, dynamic=False, **options)

    def run(forward_batch):
        # One entry per captured size of each family: lift dynamo's limits (8 per code object), past which a
        # new size would run eagerly (counted by the probe: no tree path taken).
        with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=65536):
            return compiled(forward_batch)

    return run
