"""Piecewise compilation of a captured SimNPUGraph with inductor, host lists kept updatable.

A captured graph replays straight-line code. `split_graph` cuts it at each task-group call (an
updatable op, whose host arguments `update()` replaces), as vLLM's `split_graph` cuts at its
splitting ops; every piece between two task groups is traced with `make_fx` over fake tensors and
compiled by inductor once, at capture, and the task groups stay plain calls reading `T{i}`.

An updatable op with a static form (`register_static_form`: the same result from a tensor of its
host list, at shapes fixed at capture) is not a cut: its host list is lifted into a tensor input
that replay builds from `T{i}` each time, so `update()` still drives it, and the whole step
becomes one piece. That matters on the CPU, where each call out of compiled code costs as much as
the arithmetic of a tiny model.

Pieces have no guards: their shapes were fixed at capture, so changing lengths never recompiles
(`compilations` counts every compile). Writes to tensors from before capture (the KV cache, the
output buffers) are graph-input mutations that inductor performs in place.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from reference_runner.graphs.sim import SimGraphPool, SimNPUGraph, graph

_TASK_CALL = re.compile(r"^(?P<out>\w+) = (?P<fn>\w+)\((?P<args>.*)\*\*(?P<task>T\d+)\)$")
_TEMPORARIES = {"_"}  # in-place results bound to no value


@dataclass(frozen=True)
class StaticForm:
    """`fn(*tensor_args, host_list=tensor, **other_host_args)` computes the updatable op at fixed shapes.

    The host list keeps its capture-time length (one entry per batch row): the compiled piece
    asserts the size of the tensor built from it.
    """

    fn: Callable[..., torch.Tensor]
    host_list: str  # the argument `update()` changes; the op's other host arguments are frozen


_STATIC_FORMS: dict[Any, StaticForm] = {}

# The C++ wrapper runs a piece's kernels with no Python between them: a third off a tiny model's step.
_INDUCTOR_CONFIG = {"cpp_wrapper": True}

compilations = 0  # inductor compiles of pieces in this process


def register_static_form(op: Any, fn: Callable[..., torch.Tensor], host_list: str) -> None:
    """Let compiled graphs run `op` (an OpOverloadPacket) as `fn`, with `host_list` as a tensor input."""
    form = StaticForm(fn, host_list)
    _STATIC_FORMS[op] = form
    _STATIC_FORMS.update((getattr(op, overload), form) for overload in op.overloads())


@dataclass
class Piece:
    """Consecutive recorded lines with no task group: compiled into one function."""

    lines: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # tensors read before the piece binds them
    outputs: list[str] = field(default_factory=list)  # values that later lines read


def _names(line: str) -> tuple[list[str], list[str]]:
    """Names `line` reads and names it binds, in order."""
    loads, stores = [], []
    for node in ast.walk(ast.parse(line)):
        if isinstance(node, ast.Name):
            (stores if isinstance(node.ctx, ast.Store) else loads).append(node.id)
    return loads, stores


def _is_tensor(name: str, namespace: dict[str, Any]) -> bool:
    """Values made by the graph (`v*`), and tensors of the namespace (from before capture, lifted lists)."""
    return name.startswith("v") or isinstance(namespace.get(name), torch.Tensor)


def split_graph(lines: list[str], namespace: dict[str, Any]) -> list[Piece | str]:
    """The recording as pieces and, between them, the task-group lines (kept as they are)."""
    parts: list[Piece | str] = []
    for line in lines:
        if _TASK_CALL.match(line):
            parts.append(line)
            continue
        if not parts or isinstance(parts[-1], str):
            parts.append(Piece())
        parts[-1].lines.append(line)
    later_reads: set[str] = set()
    for part in reversed(parts):  # a piece returns the values that later lines read before binding them
        free: list[str] = []
        bound: set[str] = set()
        for line in [part] if isinstance(part, str) else part.lines:
            loads, stores = _names(line)
            free += [n for n in loads if n not in bound and n not in free]
            bound.update(stores)
        if isinstance(part, Piece):
            part.inputs = [n for n in free if _is_tensor(n, namespace)]
            part.outputs = sorted(bound & later_reads - _TEMPORARIES, key=lambda n: int(n[1:]))
        later_reads |= set(free)
    return parts


def lift_host_lists(lines: list[str], namespace: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Rewrite task-group calls of ops with a static form into plain calls of it, on a lifted tensor.

    Returns the rewritten lines and the replay lines that build each lifted tensor `L{i}` from its
    task's current host list. Adds the static forms (`S{i}`) and capture-time examples of `L{i}` to
    `namespace`.
    """
    rewritten, lifts = [], []
    for line in lines:
        call = _TASK_CALL.match(line)
        form = call and _STATIC_FORMS.get(namespace[call["fn"]])
        if not form:
            rewritten.append(line)
            continue
        i, task = len(lifts), namespace[call["task"]]
        frozen = {k: v for k, v in task.items() if k != form.host_list}
        namespace[f"S{i}"] = functools.partial(form.fn, **frozen)
        namespace[f"L{i}"] = torch.tensor(task[form.host_list])
        rewritten.append(f"{call['out']} = S{i}({call['args']}{form.host_list}=L{i})")
        lifts.append(f"L{i} = tensor({call['task']}[{form.host_list!r}])")
    namespace["tensor"] = torch.tensor
    return rewritten, lifts


# Inductor lowers index_copy_ to a pass over the whole destination (the whole KV cache, every step),
# index_put_ to a store of the written rows only.
def _index_copy_as_index_put(self: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return self.index_put_((slice(None),) * dim + (index,), source)


_DECOMPOSITIONS = {torch.ops.aten.index_copy_.default: _index_copy_as_index_put}


def _view(t: torch.Tensor) -> str:
    """How `t` is viewed from its base: a reshape where it is one, since inductor performs a write
    through a reshaped input in place, but one through as_strided as a copy of the whole base."""
    if t.is_contiguous() and t._base.is_contiguous() and t.numel() == t._base.numel():
        return f"view({tuple(t.shape)})"
    return f"as_strided({tuple(t.shape)}, {t.stride()}, {t.storage_offset()})"


def _parameters(inputs: list[str], scope: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A piece's parameters, and the lines that rebuild its view inputs (the KV cache's slot view)
    from their bases, which are passed instead: an in-place write to a view input would become a
    copy of the whole base."""
    names = {id(t): n for n in inputs if isinstance(t := scope.get(n), torch.Tensor) and t._base is None}
    params: dict[str, None] = {}  # ordered, without repeats
    prelude = []
    for n in inputs:
        t = scope.get(n)
        if not isinstance(t, torch.Tensor) or t._base is None:
            params[n] = None
            continue
        base = names.setdefault(id(t._base), f"{n}_base")
        scope[base] = t._base
        prelude.append(f"{n} = {base}.{_view(t)}")
        params[base] = None
    return list(params), prelude


def _piece_function(piece: Piece, params: list[str], prelude: list[str], namespace: dict[str, Any]) -> Callable:
    body = [*prelude, *piece.lines, f"return ({''.join(f'{n}, ' for n in piece.outputs)})"]
    source = f"def piece({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body)
    scope = dict(namespace)
    exec(compile(source, "<SimNPUGraph piece>", "exec"), scope)
    return scope["piece"]


def compile_pieces(lines: list[str], namespace: dict[str, Any]) -> Callable[[], None]:
    """A replay function running inductor-compiled pieces and the task groups between them."""
    # Imported here: with sympy and inductor they cost a second, which only compiled mode should pay.
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    global compilations
    scope = dict(namespace)  # the replay's globals: the recording's, lifted lists, bases and pieces
    lines, replay_lines = lift_host_lists(lines, scope)
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())  # a shape env lets inductor's FX graph cache serve the pieces
    fakes: dict[str, torch.Tensor] = {}

    def fake(name: str) -> torch.Tensor:
        if name not in fakes:
            fakes[name] = fake_mode.from_tensor(scope[name], static_shapes=True)  # no symbolic sizes
        return fakes[name]

    with torch.inference_mode():  # as replay: the pool's outputs and the KV cache are inference tensors
        for i, part in enumerate(split_graph(lines, scope)):
            if isinstance(part, str):  # a task group: its fake kernel gives the shapes of what follows
                loads, stores = _names(part)
                env = {**scope, **{n: fake(n) for n in loads if _is_tensor(n, scope)}}
                with fake_mode:
                    exec(part, env)
                fakes.update((n, env[n]) for n in stores if n not in _TEMPORARIES)
                replay_lines.append(part)
                continue
            params, prelude = _parameters(part.inputs, scope)
            args = [fake(n) for n in params]
            gm = make_fx(_piece_function(part, params, prelude, scope), _DECOMPOSITIONS, tracing_mode="fake")(*args)
            with fake_mode:
                fakes.update(zip(part.outputs, gm(*args)))
            scope[f"P{i}"] = compile_fx(gm, args, config_patches=_INDUCTOR_CONFIG)
            compilations += 1
            bind = "".join(f"{n}, " for n in part.outputs)
            replay_lines.append(f"{bind + '= ' if bind else ''}P{i}({', '.join(params)})")
    source = "def replay():\n" + "".join(f"    {line}\n" for line in replay_lines or ["pass"])
    exec(compile(source, "<SimNPUGraph compiled replay>", "exec"), scope)
    return scope["replay"]


@contextlib.contextmanager
def piecewise_graph(npu_graph: SimNPUGraph, pool: SimGraphPool | None = None) -> Iterator[SimNPUGraph]:
    """Capture like `graph(..., auto_dispatch_capture=True)`, then compile the capture piecewise."""
    with graph(npu_graph, pool=pool, auto_dispatch_capture=True):
        yield npu_graph
    npu_graph.recompile(compile_pieces)
