"""`torch.cuda.CUDAGraph`: no host-argument update exists, so attention reads device-side lengths."""
from __future__ import annotations

import torch

from reference_runner.graphs import GraphBackend


def cuda_backend(compile: bool = False) -> GraphBackend:
    """Plain capture: `CudaAttnBackend` reads `seq_lens` on the device, so replay needs no update.

    `compile`: compile-then-capture, as SGLang's `--enable-torch-compile`: inductor without its own
    CUDA graphs compiles the forward once per batch size during warmup, and our pool captures it.
    """
    return GraphBackend(
        device="cuda",
        new_graph=torch.cuda.CUDAGraph,
        capture=lambda g, pool: torch.cuda.graph(g, pool=pool),
        graph_pool_handle=torch.cuda.graph_pool_handle,
        updates_host_lists=False,
        compile_forward=_compile_forward if compile else None,
    )


def _compile_forward(forward):
    return torch.compile(forward, mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=False)
