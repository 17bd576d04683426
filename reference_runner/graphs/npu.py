"""`torch.npu.NPUGraph` (ACL graph) through torch_npu, imported only on Ascend hosts.

Plain NPUGraphs: `NPUGraphRunner` waits for each replay before the next update, and counts the task groups
torch_npu recorded (its dispatch records), naming the installed release when they are not the step's
attention calls. Written from torch_npu's `graphs.py` (docs/npu.md); not run on a device here.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ContextManager

import torch
import torch_npu  # registers torch.npu

from reference_runner.graphs.base import GraphBackend, allocator_pool_bytes
from reference_runner.graphs.compiled import compile_forward
from reference_runner.graphs.releases import release_of
from reference_runner.graphs.runner import NPUGraphRunner


def npu_backend(compile: bool = False) -> GraphBackend:
    """Capture with auto dispatch so the FIA calls become updatable task groups (docs/npu.md).

    `compile`: torchair compiles the forward per batch size during warmup and NPUGraph captures it,
    as SGLang's npu graph runner does; `update()` then refreshes the host lengths of its FIA calls.
    """
    return GraphBackend(
        device="npu",
        new_graph=lambda name: torch.npu.NPUGraph(),
        capture=_capture_compiled if compile else _capture,
        graph_pool_handle=torch.npu.graph_pool_handle,
        pool_bytes=functools.partial(allocator_pool_bytes, "npu"),
        runner_cls=NPUGraphRunner,
        compile_forward=functools.partial(compile_forward, backend=torchair_backend()) if compile else None,
        new_event=torch.npu.Event,
        task_groups=task_groups,
        release=installed_release(),
        unblock=record_external_events,
    )


def installed_release() -> str:
    """The installed torch_npu, with the release line it was built from where `graphs/releases.py` knows it."""
    version = torch_npu.__version__
    release = release_of(version)
    return f"torch_npu {version} ({f'release {release.name}' if release else 'a release this project has not read'})"


def task_groups(graph: torch.npu.NPUGraph) -> int:
    """The updatable task groups auto dispatch capture recorded: one dispatch record each."""
    return len(graph.graph_dispatch_mode.graph_dispatch_records)


def record_external_events(graph: torch.npu.NPUGraph) -> None:
    """Record every task group's ExternalEvent on the update stream, as `update()` does after re-issuing the
    task (`update_capture_record`): a replay stuck waiting for them runs to its end, so the device does not
    stay stuck behind it (its lengths are stale: the scenario has failed already). Inferred from torch_npu's
    code, not run on a device."""
    mode = graph.graph_dispatch_mode
    for record in mode.graph_dispatch_records:
        record.event.record(mode.update_stream)


def _capture(graph: torch.npu.NPUGraph, pool) -> ContextManager:
    return torch.npu.graph(graph, pool=pool, auto_dispatch_capture=True)


@contextmanager
def _capture_compiled(graph: torch.npu.NPUGraph, pool) -> Iterator[None]:
    # The warmup just ran these guards on the same batch; SGLang skips them in capture
    # (npu_graph_runner._capture_graph), where nothing may run that the graph should not record.
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True), _capture(graph, pool):
        yield


def torchair_backend():
    """torchair's aclgraph lowering (`mode="reduce-overhead"`), returning its FX graph uncaptured.

    Its passes turn each FIA call into the `.out` form on a max-size workspace, which auto dispatch
    records as an updatable task group. `run_eagerly` keeps torchair from capturing ACL graphs of its
    own: those would nest in ours, and it would update only lengths it traced as symbols.
    """
    import torchair

    config = torchair.CompilerConfig()
    config.mode = "reduce-overhead"
    config.debug.run_eagerly = True
    return torchair.get_npu_backend(compiler_config=config)
