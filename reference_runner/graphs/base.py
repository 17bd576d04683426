"""What the graph runner needs of a device's graphs: a graph class and how to capture into a pool."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

if TYPE_CHECKING:
    from reference_runner.graphs.runner import GraphRunner
    from reference_runner.graphs.tree import GraphTrees


class DeviceGraph(Protocol):
    """A captured graph: `torch.npu.NPUGraph`, `torch.cuda.CUDAGraph` or `SimNPUGraph`."""

    def replay(self) -> None: ...

    def pool(self) -> Any: ...


class DeviceEvent(Protocol):
    """`torch.npu.Event` or `SimEvent`: recorded on the current stream, complete once the work queued before is."""

    def record(self) -> None: ...

    def query(self) -> bool: ...


@dataclass(frozen=True)
class GraphBackend:
    """How one device captures: a graph factory, a capture context, a pool, and the runner that drives them."""

    device: str
    new_graph: Callable[[str], DeviceGraph]  # new_graph(name): the name errors about the graph use
    capture: Callable[[DeviceGraph, Any], ContextManager]  # capture(graph, pool)
    graph_pool_handle: Callable[[], Any]
    pool_bytes: Callable[[Any], int]  # bytes the graphs hold in a pool
    runner_cls: type[GraphRunner]  # NPUGraphRunner where graphs take update(cpu_update_input), else GraphRunner
    # Compile-then-capture: warmup and capture run this wrapping of the forward (None: run it as is).
    compile_forward: Callable[[Callable], Callable] | None = None
    # Mode compile_nograph: the compiled step of compile mode, run on each batch as it comes, without a device graph
    # (compiled_step(forward) -> forward); None where the device cannot.
    compiled_step: Callable[[Callable], Callable] | None = None
    # Compiled mode: the runner marks the batch dim of its static inputs dynamic, so that one compile serves every
    # captured size (`compiled.mark_dynamic_batch`).
    dynamic_batch: bool = False
    # What NPUGraphRunner needs besides (graphs with task groups):
    new_event: Callable[[], DeviceEvent] | None = None  # to learn that a replay finished, polled under a timeout
    task_groups: Callable[[DeviceGraph], int] | None = None  # updatable task groups a captured graph holds
    release: str = ""  # the torch_npu release whose NPUGraph this is (named in errors)
    # Let a replay that timed out waiting for its task groups' events run to its end (None: it cannot hang).
    unblock: Callable[[DeviceGraph], None] | None = None
    # Mode "tree": the device's graph trees, which capture and replay instead (GraphTreeRunner).
    trees: GraphTrees | None = None
    # Start, in the background and once per process, the one-time work of the mode's first compile, for a caller that
    # knows a run in this mode is coming (None: there is none).
    warm_up: Callable[[], None] | None = None


def allocator_pool_bytes(device: str, pool: Any) -> int:
    """Bytes of the caching allocator's segments carved for `pool`: the graphs' own memory, not the eager
    warmups or another engine in the same process (cuda and npu)."""
    import torch

    segments = getattr(torch, device).memory_snapshot()
    return sum(s["total_size"] for s in segments if tuple(s["segment_pool_id"]) == tuple(pool))
