"""What the graph runner needs of a device's graphs: a graph class and how to capture into a pool."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

if TYPE_CHECKING:
    from reference_runner.graphs.runner import GraphRunner


class DeviceGraph(Protocol):
    """A captured graph: `torch.npu.NPUGraph`, `torch.cuda.CUDAGraph` or `SimNPUGraph`."""

    def replay(self) -> None: ...

    def pool(self) -> Any: ...


@dataclass(frozen=True)
class GraphBackend:
    """How one device captures: a graph factory, a capture context, a pool, and the runner that drives them."""

    device: str
    new_graph: Callable[[], DeviceGraph]
    capture: Callable[[DeviceGraph, Any], ContextManager]  # capture(graph, pool)
    graph_pool_handle: Callable[[], Any]
    pool_bytes: Callable[[Any], int]  # bytes the graphs hold in a pool
    runner_cls: type[GraphRunner]  # NPUGraphRunner where graphs take update(cpu_update_input), else GraphRunner
    # Compile-then-capture: warmup and capture run this wrapping of the forward (None: run it as is).
    compile_forward: Callable[[Callable], Callable] | None = None


def allocator_pool_bytes(device: str, pool: Any) -> int:
    """Bytes of the caching allocator's segments carved for `pool`: the graphs' own memory, not the eager
    warmups or another engine in the same process (cuda and npu)."""
    import torch

    segments = getattr(torch, device).memory_snapshot()
    return sum(s["total_size"] for s in segments if tuple(s["segment_pool_id"]) == tuple(pool))
