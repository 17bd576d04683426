"""Device graphs: one backend per device, each capturing the decode step for the graph runner (`runner`).

| device | graph class                 | runner           | host lengths refreshed by          |
|--------|-----------------------------|------------------|------------------------------------|
| cpu    | `SimNPUGraph` (emulation)   | `NPUGraphRunner` | `graph.update(cpu_update_input)`   |
| npu    | `torch.npu.NPUGraph`        | `NPUGraphRunner` | `graph.update(cpu_update_input)`   |
| cuda   | `torch.cuda.CUDAGraph`      | `GraphRunner`    | none: attention reads device lens  |

Mode `compile` captures compiled steps: piecewise inductor on cpu (`sim/piecewise.py`), compile-then-capture
on cuda and npu (`compiled.py`). Mode `tree` hands the step to torch's graph trees (`tree.py`: CUDA graph trees,
torch_npu's NPU graph trees); the CPU has none.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reference_runner.graphs.base import GraphBackend

# Imported on first use: the npu backend imports torch_npu, which breaks `import torch` without CANN.
_BACKENDS = {
    "cpu": "reference_runner.graphs.cpu:sim_backend",
    "npu": "reference_runner.graphs.npu:npu_backend",
    "cuda": "reference_runner.graphs.cuda:cuda_backend",
}


def get_graph_backend(device: str, mode: str = "graph") -> GraphBackend:
    """The graph backend of `device` for engine `mode` (graph, compile or tree)."""
    module, name = _BACKENDS[device].split(":")
    return getattr(importlib.import_module(module), name)(mode)
