"""Device graphs: one protocol, three implementations selected by device.

| device | graph class                 | host lengths refreshed by      |
|--------|-----------------------------|--------------------------------|
| cpu    | `SimNPUGraph` (emulation)   | `graph.update(cpu_update_input)` |
| npu    | `torch.npu.NPUGraph`        | `graph.update(cpu_update_input)` |
| cuda   | `torch.cuda.CUDAGraph`      | none: attention reads device-side seq lens |
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol

from reference_runner.graphs.sim import (
    CaptureError,
    SimGraphPool,
    SimNPUGraph,
    graph,
    graph_pool_handle,
    register_updatable_op,
)

__all__ = [
    "CaptureError",
    "DeviceGraph",
    "GraphBackend",
    "SimGraphPool",
    "SimNPUGraph",
    "get_graph_backend",
    "graph",
    "graph_pool_handle",
    "register_updatable_op",
]


class DeviceGraph(Protocol):
    """What the graph runner needs of a captured graph."""

    def replay(self) -> None: ...

    def reset(self) -> None: ...

    def pool(self) -> Any: ...


@dataclass(frozen=True)
class GraphBackend:
    """How one device captures: a graph factory, a capture context and a pool handle."""

    device: str
    new_graph: Callable[[], DeviceGraph]
    capture: Callable[[DeviceGraph, Any], ContextManager]  # capture(graph, pool)
    graph_pool_handle: Callable[[], Any]
    updates_host_lists: bool  # attention reads host lists that graph.update() refreshes


def _sim_backend() -> GraphBackend:
    return GraphBackend(
        device="cpu",
        new_graph=SimNPUGraph,
        capture=lambda g, pool: graph(g, pool=pool, auto_dispatch_capture=True),
        graph_pool_handle=graph_pool_handle,
        updates_host_lists=True,
    )


def get_graph_backend(device: str) -> GraphBackend:
    """The graph backend of `device` (`cpu` runs SimNPUGraph, the emulation of NPUGraph)."""
    if device == "npu":
        from reference_runner.graphs.npu import npu_backend

        return npu_backend()
    if device == "cuda":
        from reference_runner.graphs.cuda import cuda_backend

        return cuda_backend()
    return _sim_backend()
