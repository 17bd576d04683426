"""`torch.npu.NPUGraph` (ACL graph) through torch_npu, imported only on Ascend hosts."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ContextManager

import torch
import torch_npu  # noqa: F401  registers torch.npu

from reference_runner.graphs.base import GraphBackend, allocator_pool_bytes
from reference_runner.graphs.compiled import compile_forward
from reference_runner.graphs.runner import NPUGraphRunner


class OrderedNPUGraph(torch.npu.NPUGraph):
    """An NPUGraph whose `update()` first waits for its own previous replay to finish."""

    # update() re-issues each recorded FIA task on torch_npu's update stream, and the captured task
    # waits only for that update to land: nothing orders it after a replay of the same graph still
    # queued or running, which would then read the next step's lengths (SGLang #16498). vLLM-Ascend
    # synchronises before each replay; SGLang overlaps update and replay in a thread. We wait on the
    # host for this graph's last replay only, not for the prefill or copies queued since: simple, cheap.

    def __init__(self) -> None:
        super().__init__()
        self.last_replay: torch.npu.Event | None = None

    def replay(self) -> None:
        super().replay()
        self.last_replay = torch.npu.Event()
        self.last_replay.record()

    def update(self, cpu_update_input: list[dict]) -> None:
        if self.last_replay is not None:
            self.last_replay.synchronize()
        super().update(cpu_update_input)


def npu_backend(compile: bool = False) -> GraphBackend:
    """Capture with auto dispatch so the FIA calls become updatable task groups (docs/npu.md).

    `compile`: torchair compiles the forward per batch size during warmup and NPUGraph captures it,
    as SGLang's npu graph runner does; `update()` then refreshes the host lengths of its FIA calls.
    """
    return GraphBackend(
        device="npu",
        new_graph=OrderedNPUGraph,
        capture=_capture_compiled if compile else _capture,
        graph_pool_handle=torch.npu.graph_pool_handle,
        pool_bytes=functools.partial(allocator_pool_bytes, "npu"),
        runner_cls=NPUGraphRunner,
        compile_forward=functools.partial(compile_forward, backend=torchair_backend()) if compile else None,
    )


def _capture(graph: OrderedNPUGraph, pool) -> ContextManager:
    return torch.npu.graph(graph, pool=pool, auto_dispatch_capture=True)


@contextmanager
def _capture_compiled(graph: OrderedNPUGraph, pool) -> Iterator[None]:
    # The warmup just ran these guards on the same batch; SGLang skips them in capture
    # (npu_graph_runner._capture_graph), where nothing may run that the graph should not record.
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True), _capture(graph, pool):
        yield


def torchair_backend():
    """torchair's aclgraph lowering (`mode="reduce-overhead"`), returning its FX graph uncaptured.

    Its passes turn each FIA call into the `.out` form on a max-size workspace, which auto dispatch
    records as an updatable task group. `run_eagerly` keeps torchair from capturing ACL graphs of its
    own: those would nest in ours, and it would update only lengths it traced as symbols.
    """
    import torchair

    config = torchair.CompilerConfig()
    config.mode = "reduce-overhead"
    config.debug.run_eagerly = True
    return torchair.get_npu_backend(compiler_config=config)
