"""`torch.npu.NPUGraph` (ACL graph) through torch_npu, imported only on Ascend hosts."""
from __future__ import annotations

import torch
import torch_npu  # noqa: F401  registers torch.npu

from reference_runner.graphs import GraphBackend


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
    """Capture with auto dispatch so the FIA calls become updatable task groups (NPU_NOTES.md)."""
    if compile:
        # torchair's npugraph_ex captures its own ACL graphs, which cannot nest in this runner's
        # NPUGraph capture; wiring it as a runner of its own is not done yet.
        raise NotImplementedError("mode 'compile' on npu (torchair npugraph_ex) is not implemented yet")
    return GraphBackend(
        device="npu",
        new_graph=OrderedNPUGraph,
        capture=lambda g, pool: torch.npu.graph(g, pool=pool, auto_dispatch_capture=True),
        graph_pool_handle=torch.npu.graph_pool_handle,
        updates_host_lists=True,
    )
