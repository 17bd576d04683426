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
    # Compile-then-capture: warmup and capture run this wrapping of the forward (None: run it as is).
    compile_forward: Callable[[Callable], Callable] | None = None


def _sim_backend(compile: bool) -> GraphBackend:
    if compile:  # capture first, then compile the captured step piece by piece
        from reference_runner.graphs.piecewise import piecewise_graph

        capture = piecewise_graph
    else:
        capture = lambda g, pool: graph(g, pool=pool, auto_dispatch_capture=True)  # noqa: E731
    return GraphBackend(
        device="cpu",
        new_graph=SimNPUGraph,
        capture=capture,
        graph_pool_handle=graph_pool_handle,
        updates_host_lists=True,
    )


def get_graph_backend(device: str, compile: bool = False) -> GraphBackend:
    """The graph backend of `device` (`cpu` runs SimNPUGraph, the emulation of NPUGraph); `compile`
    captures compiled steps: piecewise inductor on cpu, compile-then-capture on cuda and npu."""
    if device == "npu":
        from reference_runner.graphs.npu import npu_backend

        return npu_backend(compile)
    if device == "cuda":
        from reference_runner.graphs.cuda import cuda_backend

        return cuda_backend(compile)
    return _sim_backend(compile)
