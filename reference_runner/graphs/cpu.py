"""The CPU's graphs: SimNPUGraph, the emulation of `torch.npu.NPUGraph`, driven by the real NPUGraphRunner."""
from __future__ import annotations

from reference_runner.graphs.base import GraphBackend
from reference_runner.graphs.runner import NPUGraphRunner
from reference_runner.sim.graph import SimNPUGraph, graph, graph_pool_handle
from reference_runner.sim.pool import SimGraphPool


def sim_backend(compile: bool = False) -> GraphBackend:
    """Capture with auto dispatch, as on an NPU; `compile` then compiles the captured step piece by piece."""
    if compile:
        from reference_runner.sim.piecewise import piecewise_graph

        capture = piecewise_graph
    else:
        capture = lambda g, pool: graph(g, pool=pool, auto_dispatch_capture=True)  # noqa: E731
    return GraphBackend(
        device="cpu",
        new_graph=SimNPUGraph,
        capture=capture,
        graph_pool_handle=graph_pool_handle,
        pool_bytes=SimGraphPool.nbytes,
        runner_cls=NPUGraphRunner,
    )
