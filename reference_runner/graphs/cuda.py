"""`torch.cuda.CUDAGraph`: no host-argument update exists, so attention reads device-side lengths."""
from __future__ import annotations

import torch

from reference_runner.graphs import GraphBackend


def cuda_backend() -> GraphBackend:
    """Plain capture: `CudaAttnBackend` reads `seq_lens` on the device, so replay needs no update."""
    return GraphBackend(
        device="cuda",
        new_graph=torch.cuda.CUDAGraph,
        capture=lambda g, pool: torch.cuda.graph(g, pool=pool),
        graph_pool_handle=torch.cuda.graph_pool_handle,
        updates_host_lists=False,
    )
