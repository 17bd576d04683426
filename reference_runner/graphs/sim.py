"""SimNPUGraph: the observable semantics of `torch_npu.npu.NPUGraph`, reproduced on the CPU.

Capture records every torch call of the captured region at the torch-function level (the level
the model code is written at: `F.linear`, `Tensor.view`, the paged attention op), which keeps
replay about as cheap as eager. Replay runs the recording as generated straight-line Python over
the very tensors seen at capture, so it reproduces what matters for correctness on an NPU:

1. static addresses: replay reads the current contents of the tensors used at capture and writes
   into the output tensors allocated once at capture (in the graph's memory pool);
2. capture does not compute: outputs are poisoned (NaN) and side effects on pre-existing tensors
   (KV cache writes) are undone at `capture_end`;
3. frozen host values: every non-tensor argument is deep-copied at capture; Python control flow
   is resolved at capture; host reads of device values (`.item()`, data-dependent shapes) refuse;
4. task groups: each updatable op (the paged attention op) is recorded with its host arguments,
   which `update(cpu_update_input=...)` replaces under NPUGraph's broadcast/per-op rules;
5. lifecycle errors: replay/pool/update before capture, capturing twice.
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

_UPDATABLE_OPS: set[Any] = set()

# Reading a device value on the host syncs the stream: NPU graph capture refuses it.
_HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
_ALIGN = 64


class CaptureError(RuntimeError):
    """An operation that an NPU graph cannot capture was called during capture."""


def register_updatable_op(op: Any) -> None:
    """Mark `op` (an OpOverloadPacket) as a task group whose host arguments `update` can replace."""
    _UPDATABLE_OPS.add(op)
    _UPDATABLE_OPS.update(getattr(op, overload) for overload in op.overloads())


class SimGraphPool:
    """A memory pool shared by graphs: every graph in it places its outputs from offset 0.

    Only one graph of a pool replays at a time, so engines share one pool across all capture
    sizes; the price, as on the device, is that replaying any graph of the pool may overwrite the
    outputs of the others: callers copy outputs out before the next replay.
    """

    def __init__(self) -> None:
        self.arena = torch.UntypedStorage(0)
        self._placed: list[tuple[weakref.ref, int, tuple, tuple]] = []

    def nbytes(self) -> int:
        return self.arena.nbytes()

    def place(self, outputs: list[torch.Tensor]) -> None:
        """Move `outputs` (grouped by storage) into the arena, laid out from offset 0."""
        regions: dict[int, int] = {}
        end = 0
        for t in outputs:
            key = t.untyped_storage().data_ptr()
            if key not in regions:
                regions[key] = end
                end += -(-t.untyped_storage().nbytes() // _ALIGN) * _ALIGN
        if end > self.arena.nbytes():
            self._grow(end)
        for t in outputs:
            region = regions[t.untyped_storage().data_ptr()]
            offset = region // t.element_size() + t.storage_offset()
            self._placed.append((weakref.ref(t), offset, tuple(t.shape), tuple(t.stride())))
            t.set_(self.arena, offset, t.shape, t.stride())

    def _grow(self, nbytes: int) -> None:
        arena = torch.UntypedStorage(nbytes)
        arena[: self.arena.nbytes()].copy_(self.arena)
        self.arena = arena
        self._placed = [p for p in self._placed if p[0]() is not None]
        for ref, offset, shape, stride in self._placed:
            ref().set_(arena, offset, shape, stride)


def graph_pool_handle() -> SimGraphPool:
    """A pool to share between graphs, like `torch.npu.graph_pool_handle()`."""
    return SimGraphPool()


class _Recording:
    """What capture saw: calls, the tensors that existed before capture, and host arguments."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.globals: dict[str, Any] = {}
        self.slots: dict[int, int] = {}  # id(tensor produced in capture) -> slot
        self.produced: list[torch.Tensor] = []  # keeps ids unique while capturing
        self.externals: dict[int, str] = {}  # id(tensor from before capture) -> global name
        self.external_storages: set[int] = set()
        self.snapshots: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}
        self.tasks: list[dict[str, Any]] = []

    def constant(self, value: Any) -> str:
        name = f"c{len(self.globals)}"
        self.globals[name] = copy.deepcopy(value)
        return name

    def expr(self, value: Any) -> str:
        if isinstance(value, torch.Tensor):
            if id(value) in self.slots:
                return f"v{self.slots[id(value)]}"
            if id(value) not in self.externals:
                name = f"x{len(self.externals)}"
                self.externals[id(value)] = name
                self.globals[name] = value
                self.external_storages.add(value.untyped_storage().data_ptr())
            return self.externals[id(value)]
        if isinstance(value, (list, tuple)) and _has_tensor(value):
            inner = ", ".join(self.expr(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner},)"
        if isinstance(value, dict) and _has_tensor(value):
            return "{" + ", ".join(f"{k!r}: {self.expr(v)}" for k, v in value.items()) + "}"
        return self.constant(value)

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any, updatable: bool) -> None:
        fn = f"f{len(self.globals)}"
        self.globals[fn] = func
        params = [self.expr(a) for a in args]
        if updatable:
            task = {k: copy.deepcopy(v) for k, v in kwargs.items() if not _has_tensor(v)}
            name = f"T{len(self.tasks)}"
            self.tasks.append(task)
            self.globals[name] = task
            params += [f"{k}={self.expr(v)}" for k, v in kwargs.items() if k not in task]
            params.append(f"**{name}")
        else:
            params += [f"{k}={self.expr(v)}" for k, v in kwargs.items()]
        call = f"{fn}({', '.join(params)})"
        if isinstance(out, torch.Tensor):
            self.lines.append(f"{self.bind(out)} = {call}")
        elif isinstance(out, (tuple, list)) and _has_tensor(out):
            self.lines.append(f"_out = {call}")
            for i, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    self.lines.append(f"{self.bind(item)} = _out[{i}]")
        else:
            self.lines.append(call)

    def bind(self, t: torch.Tensor) -> str:
        if id(t) in self.externals:  # an in-place op returned a pre-existing tensor
            return "_"
        if id(t) not in self.slots:
            self.slots[id(t)] = len(self.produced)
            self.produced.append(t)
        return f"v{self.slots[id(t)]}"


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _op_name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


class _Recorder(TorchFunctionMode):
    def __init__(self, recording: _Recording, auto_dispatch: bool) -> None:
        super().__init__()
        self.recording = recording
        self.auto_dispatch = auto_dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _HOST_READS:
            raise CaptureError(
                f"Tensor.{name}() reads a device value on the host during graph capture; "
                "NPU graph capture cannot record a host synchronisation"
            )
        for value in (*args, *kwargs.values()):  # register pre-existing tensors before they run
            if isinstance(value, torch.Tensor) and id(value) not in self.recording.slots:
                self.recording.expr(value)
        out = func(*args, **kwargs)
        mutates = name == "__setitem__" or name.endswith("_")
        if _has_tensor(out) or mutates:
            self.recording.record(func, args, kwargs, out, self.auto_dispatch and func in _UPDATABLE_OPS)
        return out


class _CaptureGuard(TorchDispatchMode):
    """Refuses data-dependent ops and snapshots pre-existing storages before capture writes them."""

    def __init__(self, recording: _Recording) -> None:
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
    """NPUGraph semantics on the CPU: `capture_begin/capture_end`, `replay`, `update`, `pool`, `reset`."""

    def __init__(self) -> None:
        self._recording: _Recording | None = None
        self._modes: contextlib.ExitStack | None = None
        self._replay_fn = None
        self._pool: SimGraphPool | None = None
        self._auto_dispatch = False
        self.outputs: list[torch.Tensor] = []

    def capture_begin(self, pool: SimGraphPool | None = None, auto_dispatch_capture: bool = False) -> None:
        if self._replay_fn is not None or self._recording is not None:
            raise RuntimeError("This graph instance already holds a capture; call reset() before capturing again.")
        self._pool = pool if pool is not None else SimGraphPool()
        self._auto_dispatch = auto_dispatch_capture
        self._recording = _Recording()
        self._modes = contextlib.ExitStack()
        self._modes.enter_context(torch.inference_mode())
        self._modes.enter_context(_CaptureGuard(self._recording))
        self._modes.enter_context(_Recorder(self._recording, auto_dispatch_capture))

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
            slots = dict(recording.slots)
            recording.produced.clear()
            recording.slots.clear()
            # Whatever outlived the captured region is an output: it lives in the pool.
            self.outputs = [t for t in (r() for r in refs) if t is not None]
            self._pool.place(self.outputs)
            for t in self.outputs:
                t.fill_(_poison(t.dtype))
        lines = list(recording.lines)
        for k, t in enumerate(self.outputs):
            recording.globals[f"o{k}"] = t
            lines.append(f"o{k}.copy_(v{slots[id(t)]})")
        self._tasks = recording.tasks
        self._lines, self._namespace = lines, recording.globals
        self._replay_fn = _compile(lines, recording.globals)

    def recompile(self, make_replay: Callable[[list[str], dict[str, Any]], Callable[[], None]]) -> None:
        """Swap the replay function for `make_replay(lines, namespace)` built from the recording's
        straight-line code, e.g. the piecewise-compiled one of `graphs/piecewise.py`."""
        if self._replay_fn is None:
            raise RuntimeError("recompile() needs a preceding successful capture.")
        self._replay_fn = make_replay(self._lines, self._namespace)

    def abort_capture(self) -> None:
        """Leave capture after an error in the captured region; the graph stays empty."""
        if self._modes is not None:
            self._modes.close()
        self._modes = None
        self._recording = None

    def replay(self) -> None:
        if self._replay_fn is None:
            raise RuntimeError("Called NPUGraph::replay without a preceding successful capture.")
        with torch.inference_mode():
            self._replay_fn()

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        """Replace host arguments of the recorded task groups; the change persists across replays."""
        if self._replay_fn is None:
            raise RuntimeError("Called NPUGraph::update without a preceding successful capture.")
        if not self._auto_dispatch:
            raise RuntimeError("update() needs a graph captured with auto_dispatch_capture=True")
        if len(cpu_update_input) == 1:
            cpu_update_input = cpu_update_input * len(self._tasks)
        if len(cpu_update_input) != len(self._tasks):
            raise RuntimeError(
                f"The length of cpu_update_input does not match the captured graph: there are "
                f"{len(self._tasks)} operators to update, but cpu_update_input has "
                f"{len(cpu_update_input)} elements"
            )
        for task, new_args in zip(self._tasks, cpu_update_input):
            for key, value in new_args.items():
                if key in task:
                    task[key] = copy.deepcopy(value)

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
        self._lines, self._namespace = [], {}
        self.outputs = []
        self._pool = None


def _poison(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point:
        return float("nan")
    return True if dtype is torch.bool else torch.iinfo(dtype).min


def _compile(lines: list[str], namespace: dict[str, Any]):
    source = "def replay():\n" + "".join(f"    {line}\n" for line in lines or ["pass"])
    exec(compile(source, "<SimNPUGraph replay>", "exec"), namespace)
    return namespace["replay"]


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
