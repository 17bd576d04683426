"""What a SimNPUGraph capture records: a typed program of calls over named values.

Capture intercepts every torch call of the captured region at the torch-function level (the level the
model code is written at: `F.linear`, `Tensor.view`, the paged attention op) and appends one `Op` per
call. Each value an op touches is a `Ref`: a host constant deep-copied at capture, a tensor that existed
before capture (replay reads its current contents), a tensor produced by an earlier op, the host
arguments of a task group (what `update()` replaces), or an output buffer in the graph's pool.

A `Program` renders to straight-line Python, which is what replay runs; compiled mode
(`sim/piecewise.py`) reads the same typed ops to cut the program into pieces and compile them.
"""
from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class Kind(enum.Enum):
    """What a name in replay code stands for; the value is its prefix."""

    CONST = "c"  # a host value (or a function) frozen at capture
    EXTERNAL = "x"  # a tensor from before capture: replay reads and writes it in place
    VALUE = "v"  # a tensor produced during capture
    TASK = "T"  # a task group's host arguments: `update()` replaces them
    OUTPUT = "o"  # an output buffer, placed in the graph's pool
    LIFTED = "L"  # compiled mode: a task group's host list as a tensor, rebuilt before each replay


@dataclass(frozen=True)
class Ref:
    kind: Kind
    index: int

    @property
    def name(self) -> str:
        return f"{self.kind.value}{self.index}"


# An argument: a Ref, or a list, tuple or dict of arguments (tensor lists, e.g. torch.cat's input).
Arg = Any


def _refs(arg: Arg) -> Iterator[Ref]:
    if isinstance(arg, Ref):
        yield arg
    elif isinstance(arg, (list, tuple)):
        for item in arg:
            yield from _refs(item)
    elif isinstance(arg, dict):
        for item in arg.values():
            yield from _refs(item)


def ref_name(ref: Ref) -> str:
    return ref.name


def _source(arg: Arg, name: Callable[[Ref], str]) -> str:
    if isinstance(arg, Ref):
        return name(arg)
    if isinstance(arg, list):
        return f"[{', '.join(_source(a, name) for a in arg)}]"
    if isinstance(arg, tuple):
        return f"({''.join(_source(a, name) + ', ' for a in arg)})"
    return "{" + ", ".join(f"{k!r}: {_source(v, name)}" for k, v in arg.items()) + "}"


@dataclass(frozen=True)
class Op:
    """`binds = fn(*args, **kwargs, **task)`.

    `binds` is None when the result is not used (an in-place op returning a tensor from before capture),
    a one-item tuple for a tensor result, or one entry per item of a tuple result (None: not a tensor).
    """

    fn: Ref
    args: tuple[Arg, ...] = ()
    kwargs: dict[str, Arg] = field(default_factory=dict)
    task: Ref | None = None  # the task group whose host arguments this call takes
    binds: tuple[Ref | None, ...] | None = None
    unpack: bool = False  # the result is a tuple, bound item by item

    def reads(self) -> list[Ref]:
        """Every value the call reads, in order, without repeats."""
        refs = [self.fn, *_refs(self.args), *_refs(self.kwargs), *([self.task] if self.task else [])]
        return list(dict.fromkeys(refs))

    def bound(self) -> list[Ref]:
        return [r for r in self.binds or () if r is not None]

    def source(self, name: Callable[[Ref], str] = ref_name) -> str:
        """The call as a line of Python, each ref written as `name(ref)` (its own name by default)."""
        params = [_source(a, name) for a in self.args] + [f"{k}={_source(v, name)}" for k, v in self.kwargs.items()]
        if self.task is not None:
            params.append(f"**{name(self.task)}")
        call = f"{name(self.fn)}({', '.join(params)})"
        if self.binds is None:
            return call
        if not self.unpack:
            return f"{name(self.binds[0])} = {call}"
        targets = "".join(f"{name(r) if r else '_'}, " for r in self.binds)
        return f"{targets}= {call}"


@dataclass
class Program:
    """The ops of a capture, the values their refs name, and how many refs of each kind exist."""

    ops: list[Op] = field(default_factory=list)
    namespace: dict[str, Any] = field(default_factory=dict)
    counts: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))

    def next_ref(self, kind: Kind) -> Ref:
        ref = Ref(kind, self.counts[kind])
        self.counts[kind] += 1
        return ref

    def new_ref(self, kind: Kind, value: Any) -> Ref:
        """A new ref naming `value` in the namespace."""
        ref = self.next_ref(kind)
        self.namespace[ref.name] = value
        return ref

    def value(self, ref: Ref) -> Any:
        return self.namespace[ref.name]

    def copy(self, ops: list[Op] | None = None) -> Program:
        """The same values (a new namespace and counts, so new refs stay private to the copy), with `ops`."""
        return Program(list(self.ops if ops is None else ops), dict(self.namespace), dict(self.counts))

    def compile(self, name: str = "replay") -> Callable[[], None]:
        """The ops as one straight-line Python function over the namespace."""
        return render(self.ops, self.namespace, name)


def render(ops: list[Op], namespace: dict[str, Any], name: str) -> Callable[[], None]:
    body = [op.source() for op in ops] or ["pass"]
    source = f"def {name}():\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(source, f"<SimNPUGraph {name}>", "exec"), namespace)
    return namespace[name]


class Recording:
    """A program being captured: refs handed out per kind, tensors seen, and the task groups."""

    def __init__(self) -> None:
        self.program = Program()
        self.values: dict[int, Ref] = {}  # id(tensor produced in capture) -> its VALUE ref
        self.produced: list[torch.Tensor] = []  # keeps those ids unique while capturing
        self.externals: dict[int, Ref] = {}  # id(tensor from before capture) -> its EXTERNAL ref
        self.external_storages: set[int] = set()
        self.snapshots: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}
        self.tasks: list[dict[str, Any]] = []

    def arg(self, value: Any) -> Arg:
        """The ref of `value` (registering a tensor from before capture on first sight); host values are
        deep-copied: frozen at capture."""
        if isinstance(value, torch.Tensor):
            if id(value) in self.values:
                return self.values[id(value)]
            if id(value) not in self.externals:
                self.externals[id(value)] = self.program.new_ref(Kind.EXTERNAL, value)
                self.external_storages.add(value.untyped_storage().data_ptr())
            return self.externals[id(value)]
        if isinstance(value, (list, tuple)) and has_tensor(value):
            return type(value)(self.arg(v) for v in value)
        if isinstance(value, dict) and has_tensor(value):
            return {k: self.arg(v) for k, v in value.items()}
        return self.program.new_ref(Kind.CONST, copy.deepcopy(value))

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any, updatable: bool) -> None:
        fn = self.program.new_ref(Kind.CONST, func)
        op_args = tuple(self.arg(a) for a in args)
        task = None
        if updatable:  # host arguments go to the task group, tensors stay arguments
            host = {k: copy.deepcopy(v) for k, v in kwargs.items() if not has_tensor(v)}
            self.tasks.append(host)
            task = self.program.new_ref(Kind.TASK, host)
            kwargs = {k: v for k, v in kwargs.items() if k not in host}
        op_kwargs = {k: self.arg(v) for k, v in kwargs.items()}
        if isinstance(out, torch.Tensor):
            bound = self.bind(out)
            binds, unpack = (None, False) if bound is None else ((bound,), False)
        elif isinstance(out, (tuple, list)) and has_tensor(out):
            binds, unpack = tuple(self.bind(t) if isinstance(t, torch.Tensor) else None for t in out), True
        else:
            binds, unpack = None, False
        self.program.ops.append(Op(fn, op_args, op_kwargs, task, binds, unpack))

    def bind(self, t: torch.Tensor) -> Ref | None:
        """The VALUE ref a result binds, or None for an in-place op returning a tensor from before capture."""
        if id(t) in self.externals:
            return None
        if id(t) not in self.values:
            self.values[id(t)] = self.program.next_ref(Kind.VALUE)  # a local of replay, not in the namespace
            self.produced.append(t)
        return self.values[id(t)]


def has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(has_tensor(v) for v in value.values())
    return False
