"""Compile-then-capture (cuda, npu): the forward compiled once per batch size, then captured as is.

As SGLang's `--enable-torch-compile`: dynamo traces the whole step (`fullgraph=True`) at static
shapes (`dynamic=False`) during the graph runner's warmup, and the runner's own device graph
captures the compiled code, so replay, pools and host-list updates stay those of plain graph mode.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

compilations = 0  # graphs the compile backend received in this process: one per captured size

CompilerBackend = Callable[[torch.fx.GraphModule, list[torch.Tensor]], Callable]


def compile_forward(forward: Callable, backend: CompilerBackend) -> Callable:
    """`forward` compiled by `backend`, once per batch size; `compilations` counts each compile."""

    def counted(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        global compilations
        compilations += 1
        return backend(gm, example_inputs)

    compiled = torch.compile(forward, backend=counted, fullgraph=True, dynamic=False)

    def run(forward_batch):
        # Each captured size (of each engine in the process) is one more guarded entry of the same code:
        # lift dynamo's limits (8 per code, 256 in all), past which it would run eager unnoticed.
        with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=65536):
            return compiled(forward_batch)

    return run
