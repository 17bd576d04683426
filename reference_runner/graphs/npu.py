"""`torch.npu.NPUGraph` (ACL graph) through torch_npu, imported only on Ascend hosts.

Plain NPUGraphs: `NPUGraphRunner` waits for each replay before the next update, and counts the task groups
torch_npu recorded (its dispatch records), naming the installed release when they are not the step's
attention calls. Written from torch_npu's `graphs.py` (docs/npu.md); not run on a device here.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ContextManager

import torch
import torch_npu  # registers torch.npu

from reference_runner.errors import GraphTreesUnsupported, ModeUnsupported
from reference_runner.graphs.base import GraphBackend, allocator_pool_bytes
from reference_runner.graphs.compiled import compile_forward
from reference_runner.graphs.releases import release_of
from reference_runner.graphs.runner import NPUGraphRunner
from reference_runner.graphs.tree import GraphTreeRunner, GraphTrees, compile_into_trees


def npu_backend(mode: str = "graph") -> GraphBackend:
    """Capture with auto dispatch so the FIA calls become updatable task groups (docs/npu.md).

    Mode `compile`: torchair compiles the forward during warmup and NPUGraph captures it, as SGLang's npu graph
    runner does; `update()` then refreshes the host lengths of its FIA calls. The batch dim is marked dynamic as on
    every device, but FIA's host list has one entry per row and dynamo specialises a list's length: each size
    compiles its own graph (`compiled.py`).
    Mode `tree`: inductor's reduce-overhead mode on torch_npu's NPU graph trees, where they can update FIA.
    Mode `compile_nograph` is refused: the compiled step reads FIA's host list as Python ints, which dynamo
    (`dynamic=False`) specialises, so without a graph's `update()` every step's lengths would compile anew.
    """
    if mode == "compile_nograph":
        raise ModeUnsupported("mode 'compile_nograph' on npu: the compiled step reads FIA's host list "
                              "actual_seq_lengths_kv as Python ints, which dynamo specialises, so every step's lengths "
                              "would compile anew without an NPUGraph's update(); compile is judged against eager there")
    compile = mode == "compile"
    if mode == "tree":
        return dataclasses.replace(npu_backend(), runner_cls=GraphTreeRunner, trees=npu_graph_trees())
    return GraphBackend(
        device="npu",
        new_graph=lambda name: torch.npu.NPUGraph(),
        capture=_capture_compiled if compile else _capture,
        graph_pool_handle=torch.npu.graph_pool_handle,
        pool_bytes=functools.partial(allocator_pool_bytes, "npu"),
        runner_cls=NPUGraphRunner,
        compile_forward=functools.partial(compile_forward, backend=torchair_backend()) if compile else None,
        dynamic_batch=compile,
        new_event=torch.npu.Event,
        task_groups=task_groups,
        release=installed_release(),
        unblock=record_external_events,
    )


# torch_npu versions whose NPU graph trees capture each node with auto dispatch and update its FIA calls from the
# ACLGraph update plan inductor's codegen emits (`_graph_tree.py` at v26.1.0-pytorch2.11.0; the 2.9.0 tag of 26.1
# has the plan module but captures without auto dispatch). Earlier trees freeze FIA's host list at capture.
TREES_UPDATE_FIA = ("2.11.0",)


def npu_graph_trees() -> GraphTrees:
    """torch_npu's NPU graph trees behind inductor's reduce-overhead mode, or GraphTreesUnsupported in one line where
    the installed torch_npu would freeze FIA's host lengths inside them."""
    version = torch_npu.__version__.split("+")[0]
    if version not in TREES_UPDATE_FIA:
        raise GraphTreesUnsupported(
            f"{installed_release()} records NPU graph tree nodes without auto dispatch capture, so "
            f"FIA's host list actual_seq_lengths_kv would stay frozen at capture; NPU graph trees update FIA only from "
            f"torch_npu {', '.join(TREES_UPDATE_FIA)} (release 26.1, ACLGraph update plans)")
    from torch._dynamo.utils import counters
    from torch_npu.npu import _graph_tree

    return GraphTrees(
        name="NPU graph trees",
        compile=functools.partial(compile_into_trees, mode="reduce-overhead"),  # torch_npu routes it to npugraphify
        manager=lambda: _graph_tree.get_manager(torch.npu.current_device(), create_if_none_exists=False),
        mark_step_begin=torch.compiler.npugraph_mark_step_begin,
        pool_attribute="npu_graphs_thread_pool",
        skip_count=lambda: counters["inductor"]["cudagraph_skips"],
        refusal=update_plan_refusal,
    )


def update_plan_refusal(error: BaseException) -> str | None:
    """torch_npu's refusal of FIA inside a tree without an update plan (`_aclgraph_update_plan/resolver.py`)."""
    message = str(error)
    if "ACLGraph update plan" not in message:
        return None
    return f"{installed_release()} refuses FIA inside NPU graph trees: {message.splitlines()[0]}"


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
