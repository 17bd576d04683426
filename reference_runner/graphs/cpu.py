"""The CPU's graphs: SimNPUGraph, the emulation of `torch.npu.NPUGraph`, driven by the real NPUGraphRunner."""
from __future__ import annotations

import functools

from reference_runner.errors import GraphTreesUnsupported
from reference_runner.graphs.base import GraphBackend
from reference_runner.graphs.releases import TORCH_NPU_FLOOR
from reference_runner.graphs.runner import NPUGraphRunner
from reference_runner.sim.graph import SimEvent, SimNPUGraph, graph, graph_pool_handle
from reference_runner.sim.pool import SimGraphPool

# The torch_npu release SimNPUGraph behaves as: the floor the `ascend` extra pins (tests emulate the others).
EMULATED_RELEASE = TORCH_NPU_FLOOR


def sim_backend(mode: str = "graph") -> GraphBackend:
    """Capture with auto dispatch, as on an NPU; mode `compile` then compiles the captured step piece by piece, once
    for every captured size (the runner marks the batch dim dynamic).
    Mode `compile_nograph` runs the same compiled pieces without a kept graph: each step recorded from its own batch and
    run once (`sim/piecewise.py`, `CompiledStep`). Both warm up by starting inductor's probe of the CPU.
    Mode `tree` is refused: the CPU has no graph trees (SimNPUGraph emulates plain NPUGraphs only)."""
    if mode == "tree":
        raise GraphTreesUnsupported("the CPU has no graph trees (mode 'tree' runs the step through torch's CUDA graph trees "
                                    "or torch_npu's NPU graph trees): use --device cuda or npu")
    compiled_step = warm_up = None
    if mode in ("compile", "compile_nograph"):
        from reference_runner.sim.piecewise import CompiledStep, piecewise_graph, probe_cpu_isa

        warm_up = probe_cpu_isa
        capture = piecewise_graph
        compiled_step = CompiledStep if mode == "compile_nograph" else None
    else:
        capture = lambda g, pool: graph(g, pool=pool, auto_dispatch_capture=True)  # noqa: E731
    return GraphBackend(
        device="cpu",
        new_graph=functools.partial(SimNPUGraph, release=EMULATED_RELEASE),
        capture=capture,
        graph_pool_handle=graph_pool_handle,
        pool_bytes=SimGraphPool.nbytes,
        runner_cls=NPUGraphRunner,
        new_event=SimEvent,
        task_groups=lambda g: g.num_task_groups,
        release=f"{EMULATED_RELEASE} (emulated by SimNPUGraph)",
        dynamic_batch=mode == "compile",
        compiled_step=compiled_step,
        warm_up=warm_up,
    )
