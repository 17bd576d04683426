"""`torch.cuda.CUDAGraph`: no host-argument update exists, so attention reads device-side lengths."""
from __future__ import annotations

import functools

import torch

from reference_runner.graphs.base import GraphBackend, allocator_pool_bytes
from reference_runner.graphs.compiled import compile_forward, compiled_step
from reference_runner.graphs.runner import GraphRunner
from reference_runner.graphs.tree import GraphTreeRunner, cuda_graph_trees


def cuda_backend(mode: str = "graph") -> GraphBackend:
    """Plain capture: `CudaAttnBackend` reads `seq_lens` on the device, so replay needs no update.
    Mode `compile`: inductor compiles the forward during warmup, once for every size the marked batch dim covers,
    and our pool captures it at each size.
    Mode `tree`: inductor's reduce-overhead mode, whose CUDA graph trees capture and replay (`tree.py`).
    Mode `compile_nograph`: compile mode's compiled forward, called on each batch without a CUDA graph."""
    compile = mode in ("compile", "compile_nograph")
    tree = mode == "tree"
    return GraphBackend(
        device="cuda",
        new_graph=lambda name: torch.cuda.CUDAGraph(),
        capture=lambda g, pool: torch.cuda.graph(g, pool=pool),
        graph_pool_handle=torch.cuda.graph_pool_handle,
        pool_bytes=functools.partial(allocator_pool_bytes, "cuda"),
        runner_cls=GraphTreeRunner if tree else GraphRunner,
        compile_forward=functools.partial(compile_forward, backend=inductor) if compile else None,
        dynamic_batch=compile,
        trees=cuda_graph_trees() if tree else None,
        compiled_step=functools.partial(compiled_step, backend=inductor) if mode == "compile_nograph" else None,
    )


def inductor(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
    """Inductor's default mode: max-autotune's kernel search costs minutes per size and buys nothing on
    a launch-bound decode step, and reduce-overhead's own CUDA graphs would nest in our capture."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
