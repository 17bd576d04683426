"""SimNPUGraph: the observable semantics of `torch_npu.npu.NPUGraph`, reproduced on the CPU.

Capture records every torch call of the captured region (`sim/recording.py`), which keeps replay
about as cheap as eager. Replay runs the recording as straight-line Python over the very tensors seen
at capture, so it reproduces what matters for correctness on an NPU:

1. static addresses: replay reads the current contents of the tensors used at capture and writes
   into the output tensors allocated once at capture (in the graph's memory pool, which graphs of every
   family share: a replay silently overwrites the others' outputs, and the pool knows which graph last wrote
   each output);
2. capture does not compute: outputs are poisoned (NaN) and side effects on pre-existing tensors
   (KV cache writes) are undone at `capture_end`;
3. frozen host values: every non-tensor argument is deep-copied at capture; Python control flow
   is resolved at capture; host reads of device values (`.item()`, data-dependent shapes) refuse;
4. task groups: each call of an updatable op (`graphs/updatable.py`) that the emulated torch_npu release
   (`graphs/releases.py`) intercepts is recorded with its host arguments, which
   `update(cpu_update_input=...)` replaces under that release's rules;
5. each replay consumes its update: a task group waits for an ExternalEvent that only `update()` records,
   so a replay with a task group not updated since the previous replay (or capture) would wait forever on
   an NPU: here it raises `ReplayHang`;
6. replays are in flight until the host observes an event recorded after them (`SimEvent`): an `update()`
   of a graph whose replay may still run raises `UpdateRace`, as does an update that interleaves with
   another graph's on a shared update stream;
7. lifecycle errors: replay/pool/update before capture, capturing twice.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from reference_runner.errors import ReplayHang
from reference_runner.graphs.releases import TORCH_NPU_FLOOR, TorchNpuRelease
from reference_runner.graphs.updatable import updatable_op
from reference_runner.sim.pool import SimGraphPool
from reference_runner.sim.recording import Kind, Op, Program, Recording, has_tensor

# Reading a device value on the host syncs the stream: NPU graph capture refuses it.
_HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class CaptureError(RuntimeError):
    """An operation that an NPU graph cannot capture was called during capture."""


class UpdateRace(RuntimeError):
    """An `update()` that races a replay of its graph still in flight, or another graph's update on the same
    update stream: on an NPU a replay would run with arguments of another step or another graph."""


class _UpdateStream:
    """torch_npu's update stream: `update()` re-issues each task group on it between `graph_task_update_begin`
    and `_end`, a bracket that takes in whatever is issued on the stream meanwhile, from any thread."""

    def __init__(self) -> None:
        self.open_for: str | None = None  # the graph whose task group is inside the bracket

    @contextlib.contextmanager
    def task_update(self, graph: str, release: TorchNpuRelease) -> Iterator[None]:
        if self.open_for is not None:
            raise UpdateRace(
                f"{graph}: update() began while {self.open_for}'s update() was still open on the same update stream "
                f"({release} has one for every graph of the process): their graph_task_update_begin/end brackets "
                "interleave and one graph's task group takes the other's arguments; update graphs one at a time")
        self.open_for = graph
        try:
            yield
        finally:
            self.open_for = None


_SHARED_UPDATE_STREAMS: dict[str, _UpdateStream] = {}  # per release that has one stream for every graph

# Replays queued on the emulated device that the host has not yet seen finish (see SimEvent).
_in_flight: weakref.WeakSet[SimNPUGraph] = weakref.WeakSet()


class SimEvent:
    """`torch.npu.Event` on the emulated device. Replay runs on the CPU as it is called, but on an NPU it is only
    queued: the host knows it is over once an event recorded after it completes (`query`, `synchronize`), and
    until then it is in flight."""

    def __init__(self) -> None:
        self._after: list[SimNPUGraph] = []

    def record(self) -> None:
        self._after = list(_in_flight)

    def query(self) -> bool:
        self.synchronize()
        return True

    def synchronize(self) -> None:
        for graph in self._after:
            _in_flight.discard(graph)


def graph_pool_handle() -> SimGraphPool:
    """A pool to share between graphs, like `torch.npu.graph_pool_handle()`."""
    return SimGraphPool()


def _op_name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


class _Recorder(TorchFunctionMode):
    def __init__(self, recording: Recording, auto_dispatch: bool, release: TorchNpuRelease) -> None:
        super().__init__()
        self.recording = recording
        self.auto_dispatch = auto_dispatch
        self.release = release

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _HOST_READS:
            raise CaptureError(
                f"Tensor.{name}() reads a device value on the host during graph capture; "
                "NPU graph capture cannot record a host synchronisation"
            )
        for value in (*args, *kwargs.values()):  # register pre-existing tensors before they run
            if isinstance(value, torch.Tensor) and id(value) not in self.recording.values:
                self.recording.arg(value)
        out = func(*args, **kwargs)
        mutates = name == "__setitem__" or name.endswith("_")
        if has_tensor(out) or mutates:
            spec = updatable_op(func) if self.auto_dispatch else None
            # torch_npu intercepts by name, per release: any other call is captured as a plain kernel.
            updatable = spec is not None and self.release.intercepts(spec.dispatched_name(func, kwargs))
            self.recording.record(func, args, kwargs, out, updatable)
        return out


class _CaptureGuard(TorchDispatchMode):
    """Refuses data-dependent ops and snapshots pre-existing storages before capture writes them."""

    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Under inference_mode composite ops arrive whole (`torch.where(cond)` is nonzero inside):
        # run their decomposition here so each op they are made of is checked.
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if _data_dependent(func, args, kwargs):
            raise CaptureError(
                f"{func} has an output shape or value that depends on tensor data; "
                "NPU graph capture cannot record it (use a static-shape formulation)"
            )
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self._snapshot(value.untyped_storage())
        return func(*args, **kwargs)

    def _snapshot(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self.recording.external_storages and key not in self.recording.snapshots:
            self.recording.snapshots[key] = (storage, storage.clone())


def _data_dependent(func: Any, args: tuple, kwargs: dict) -> bool:
    tags = func.tags
    if torch.Tag.data_dependent_output in tags:
        return True
    if func in (torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
        # x[mask] = values runs nonzero inside the kernel; x[mask] = scalar is a static masked fill.
        return _bool_index(args[1]) and args[2].numel() > 1
    if torch.Tag.dynamic_output_shape not in tags:
        return False
    if func is torch.ops.aten.index.Tensor:  # integer indexing has a static shape
        return _bool_index(args[1])
    if func is torch.ops.aten.one_hot.default:  # dynamic only when num_classes is inferred from data
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1
    if func is torch.ops.aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return True


def _bool_index(indices: list) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class SimNPUGraph:
    """NPUGraph semantics on the CPU: `capture_begin/capture_end`, `replay`, `update`, `pool`, `reset`, as the torch_npu
    `release` behaves; `name` says which graph an error is about."""

    def __init__(self, name: str = "graph", release: TorchNpuRelease = TORCH_NPU_FLOOR) -> None:
        self.name = name
        self.release = release
        self._recording: Recording | None = None
        self._modes: contextlib.ExitStack | None = None
        self._replay_fn: Callable[[], None] | None = None
        self._pool: SimGraphPool | None = None
        self._auto_dispatch = False
        self._tasks: list[dict[str, Any]] = []
        self._recorded: list[bool] = []  # per task group: its ExternalEvent recorded since its last replay
        self._replays = 0
        if release.shared_update_stream:
            self._update_stream = _SHARED_UPDATE_STREAMS.setdefault(release.name, _UpdateStream())
        else:
            self._update_stream = _UpdateStream()
        self.program: Program | None = None
        self.outputs: list[torch.Tensor] = []

    def capture_begin(self, pool: SimGraphPool | None = None, auto_dispatch_capture: bool = False) -> None:
        if self._replay_fn is not None or self._recording is not None:
            raise RuntimeError("This graph instance already holds a capture; call reset() before capturing again.")
        self._pool = pool if pool is not None else SimGraphPool()
        self._auto_dispatch = auto_dispatch_capture
        self._recording = Recording()
        self._modes = contextlib.ExitStack()
        self._modes.enter_context(torch.inference_mode())
        self._modes.enter_context(_CaptureGuard(self._recording))
        self._modes.enter_context(_Recorder(self._recording, auto_dispatch_capture, self.release))

    def capture_end(self) -> None:
        if self._recording is None:
            raise RuntimeError("capture_end() called without capture_begin()")
        recording, self._recording = self._recording, None
        self._modes.close()
        self._modes = None
        with torch.inference_mode():
            for storage, snapshot in recording.snapshots.values():
                storage.copy_(snapshot)
            refs = [weakref.ref(t) for t in recording.produced]
            values = dict(recording.values)
            recording.produced.clear()
            recording.values.clear()
            # Whatever outlived the captured region is an output: it lives in the pool.
            self.outputs = [t for t in (r() for r in refs) if t is not None]
            self._pool.place(self.outputs, self.name)
            for t in self.outputs:
                t.fill_(_poison(t.dtype))
        program = self.program = recording.program
        copy_ = program.new_ref(Kind.CONST, torch.Tensor.copy_)
        for t in self.outputs:  # replay ends by writing each output into its pool buffer
            program.ops.append(Op(copy_, (program.new_ref(Kind.OUTPUT, t), values[id(t)])))
        self._tasks = recording.tasks
        self._recorded = [False] * len(self._tasks)  # capture waits and resets each event
        self._replay_fn = program.compile()

    def recompile(self, make_replay: Callable[[Program], Callable[[], None]]) -> None:
        """Swap the replay function for `make_replay(program)`, e.g. the piecewise-compiled one of
        `sim/piecewise.py`."""
        if self._replay_fn is None:
            raise RuntimeError("recompile() needs a preceding successful capture.")
        self._replay_fn = make_replay(self.program)

    def abort_capture(self) -> None:
        """Leave capture after an error in the captured region; the graph stays empty."""
        if self._modes is not None:
            self._modes.close()
        self._modes = None
        self._recording = None

    def replay(self) -> None:
        if self._replay_fn is None:
            raise RuntimeError("Called NPUGraph::replay without a preceding successful capture.")
        if not all(self._recorded):
            raise ReplayHang(self._hang())
        self._recorded = [False] * len(self._recorded)  # each captured wait consumes its event's record
        with torch.inference_mode():
            self._replay_fn()
        self._pool.written(self.name)
        self._replays += 1
        _in_flight.add(self)

    def _hang(self) -> str:
        missing, count = self._recorded.index(False), len(self._recorded)
        if any(self._recorded):
            why = (f"task group {missing + 1} of {count} left out of the last update() ({self.release} zips a "
                   "cpu_update_input shorter than its task groups without a word)")
        else:
            why = f"no update() since its {'previous replay' if self._replays else 'capture'}"
        return (f"{self.name}: replayed with {why}: task group {missing + 1} waits for an ExternalEvent that only "
                "update() records, so on an NPU this replay would wait forever")

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        """Replace host arguments of the recorded task groups and record their events, as `release` does."""
        if self._replay_fn is None:
            raise RuntimeError("Called NPUGraph::update without a preceding successful capture.")
        if not self._auto_dispatch:
            raise RuntimeError("The current graph configuration does not support update,"
                               "Try to capture by setting auto_dispatch_capture=True during capture")
        if self in _in_flight:
            raise UpdateRace(
                f"{self.name}: update() issued while this graph's previous replay may still be in flight (queued, and "
                "no event after it seen complete): on an NPU that replay may run with this update's host lengths and "
                "its own step's block table (SGLang #16498); wait for the replay before updating")
        if len(cpu_update_input) == 1:
            cpu_update_input = [cpu_update_input[0].copy() for _ in self._tasks]
        if self.release.update_length_checked and len(cpu_update_input) != len(self._tasks):
            raise RuntimeError(
                f"Currently, there are {len(self._tasks)} operators that need to be updated by capture, and there "
                f"are only {len(cpu_update_input)} elements in the incoming cpu_update_input list")
        for i, (task, new_args) in enumerate(zip(self._tasks, cpu_update_input)):  # zip: too long or short, silently
            with self._update_stream.task_update(self.name, self.release):
                for key in new_args:
                    if key in task or not self.release.captured_keys_only:
                        task[key] = copy.deepcopy(new_args[key])
            self._recorded[i] = True

    @property
    def num_task_groups(self) -> int:
        return len(self._tasks) if self._replay_fn is not None else 0

    def pool(self) -> SimGraphPool:
        if self._replay_fn is None:
            raise RuntimeError("Called NPUGraph::pool without a preceding successful capture.")
        return self._pool

    def reset(self) -> None:
        self.abort_capture()
        self._replay_fn = None
        self._tasks = []
        self._recorded = []
        _in_flight.discard(self)
        self.program = None
        self.outputs = []
        self._pool = None


def _poison(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point:
        return float("nan")
    return True if dtype is torch.bool else torch.iinfo(dtype).min


@contextlib.contextmanager
def graph(
    npu_graph: SimNPUGraph, pool: SimGraphPool | None = None, auto_dispatch_capture: bool = False
) -> Iterator[SimNPUGraph]:
    """Capture the body into `npu_graph`, like `torch.npu.graph(...)`."""
    npu_graph.capture_begin(pool=pool, auto_dispatch_capture=auto_dispatch_capture)
    try:
        yield npu_graph
    except BaseException:
        npu_graph.abort_capture()
        raise
    npu_graph.capture_end()
