"""`torch.npu.NPUGraph` (ACL graph) through torch_npu, imported only on Ascend hosts."""
from __future__ import annotations

from reference_runner.graphs import GraphBackend


def npu_backend() -> GraphBackend:
    """Capture with auto dispatch so the FIA calls become updatable task groups (NPU_NOTES.md)."""
    import torch
    import torch_npu  # noqa: F401  registers torch.npu

    return GraphBackend(
        device="npu",
        new_graph=torch.npu.NPUGraph,
        capture=lambda g, pool: torch.npu.graph(g, pool=pool, auto_dispatch_capture=True),
        graph_pool_handle=torch.npu.graph_pool_handle,
        updates_host_lists=True,
    )
