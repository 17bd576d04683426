"""Compiled graph mode: one compile for every captured batch size, then a device graph captured per size.

As vLLM's piecewise compile: the graph runner marks the batch dimension of the static inputs dynamic
(`mark_dynamic_batch`, dim 0: a row per request, or per token for prefill graphs), so the step is traced with a
symbolic batch size, compiled once, and that code is captured at every size. On cuda and npu (compile-then-capture,
as SGLang's `--enable-torch-compile`) dynamo traces the whole step (`fullgraph=True`) during the graph runner's
warmup and the runner's own device graph captures the compiled code, so replay, pools and host-list updates stay
those of plain graph mode. On the CPU the captured SimNPUGraph is compiled piece by piece (`sim/piecewise.py`),
which reads the same marks.

Mode `compile_nograph` runs the same compiled step without graphs (`compiled_step`): each batch as it comes, at its
own size, from its own tensors. Compile mode is judged against it with the tolerance of graph against eager, and it
against eager across kernels: the graph's own faults are then judged exactly, inductor's noise apart.

What the symbolic batch cannot cover compiles apart, as dynamo decides: batch size 1 on cuda and npu (0/1
specialisation; the CPU's piecewise compile traces size-obliviously and serves size 1 too), and on npu every size,
since FIA's host list `actual_seq_lengths_kv` holds one length per row and dynamo specialises the length of a list
it reads. Changing lengths never recompile: they are tensor contents, or host lists refreshed by
`update()` after capture.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from reference_runner.engine.forward_batch import ForwardBatch

compilations = 0  # graphs the compile backend received in this process

CompilerBackend = Callable[[torch.fx.GraphModule, list[torch.Tensor]], Callable]


def mark_dynamic_batch(forward_batch: ForwardBatch) -> None:
    """Mark dim 0 of every row-indexed tensor of `forward_batch` (a static batch of the graph runner) dynamic:
    compiling it at one size then serves the others. Where a trace specialises it anyway (size 1), it compiles
    apart rather than failing (`maybe_mark_dynamic`)."""
    from torch._dynamo import maybe_mark_dynamic

    routing = forward_batch.routing
    rows = [forward_batch.input_ids, forward_batch.positions, forward_batch.out_cache_loc, forward_batch.seq_lens,
            forward_batch.block_tables, *(() if routing is None else (routing.replay_ids, routing.topk_ids, routing.gaps))]
    for t in rows:
        maybe_mark_dynamic(t, 0)


def dynamic_dims(t: torch.Tensor) -> set[int]:
    """The dims of `t` marked dynamic (`mark_dynamic_batch`, or dynamo's `mark_dynamic`)."""
    return set(getattr(t, "_dynamo_weak_dynamic_indices", ())) | set(getattr(t, "_dynamo_dynamic_indices", ()))


def compile_forward(forward: Callable, backend: CompilerBackend) -> Callable:
    """`forward` compiled by `backend`, once for the sizes its marked dims cover; `compilations` counts each
    compile."""

    def counted(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        global compilations
        compilations += 1
        return backend(gm, example_inputs)

    # dynamic=False: nothing is dynamic but the marked batch dims (no automatic dynamic shapes on a recompile).
    compiled = torch.compile(forward, backend=counted, fullgraph=True, dynamic=False)

    def run(forward_batch):
        # Each size the symbolic batch does not cover (of each engine in the process) is one more guarded entry of
        # the same code: lift dynamo's limits (8 per code, 256 in all), past which it would run eager unnoticed.
        with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=65536):
            return compiled(forward_batch)

    return run


def compiled_step(forward: Callable, backend: CompilerBackend) -> Callable:
    """`forward` compiled as compile mode compiles it, called on each batch as it comes (no device graph, no
    padding): mode compile_nograph on cuda."""
    compiled = compile_forward(forward, backend)

    def run(forward_batch):
        mark_dynamic_batch(forward_batch)  # as the graph runner marks its static batch: the same compiled code
        return compiled(forward_batch)

    return run
