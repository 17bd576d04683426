"""Piecewise compilation of a captured SimNPUGraph with inductor, host lists kept updatable.

A captured graph replays a `Program` of ops. `split_graph` cuts it at each task-group op (an
updatable op, whose host arguments `update()` replaces), as vLLM's `split_graph` cuts at its
splitting ops; every piece between two task groups is traced with `make_fx` over fake tensors and
compiled by inductor once, at capture, and the task groups stay plain calls reading their task's
host arguments.

An updatable op with a static form (`graphs/updatable.py`: the same result from a tensor of its host
list, at shapes fixed at capture) is not a cut: its host list is lifted into a tensor input that
replay rebuilds from the task group each time, so `update()` still drives it, and the whole step
becomes one piece. That matters on the CPU, where each call out of compiled code costs as much as
the arithmetic of a tiny model.

Pieces have no guards: their shapes were fixed at capture, so changing lengths never recompiles
(`compilations` counts every compile). Writes to tensors from before capture (the KV cache, the
output buffers) are graph-input mutations that inductor performs in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from reference_runner.graphs.updatable import updatable_op
from reference_runner.sim.graph import SimNPUGraph, graph
from reference_runner.sim.pool import SimGraphPool
from reference_runner.sim.recording import Kind, Op, Program, Ref, render

# The C++ wrapper runs a piece's kernels with no Python between them: a third off a tiny model's step.
_INDUCTOR_CONFIG = {"cpp_wrapper": True}

compilations = 0  # inductor compiles of pieces in this process


@dataclass
class Piece:
    """Consecutive ops with no task group: compiled into one function."""

    ops: list[Op] = field(default_factory=list)
    inputs: list[Ref] = field(default_factory=list)  # tensors read before the piece binds them
    outputs: list[Ref] = field(default_factory=list)  # values that later ops read


def _is_tensor(ref: Ref, namespace: dict[str, Any]) -> bool:
    """Values made by the graph, and tensors of the namespace (from before capture, lifted lists)."""
    return ref.kind is Kind.VALUE or isinstance(namespace.get(ref.name), torch.Tensor)


def split_graph(program: Program) -> list[Piece | Op]:
    """The program as pieces and, between them, the task-group ops (kept as they are)."""
    parts: list[Piece | Op] = []
    for op in program.ops:
        if op.task is not None:
            parts.append(op)
            continue
        if not parts or isinstance(parts[-1], Op):
            parts.append(Piece())
        parts[-1].ops.append(op)
    later_reads: set[Ref] = set()
    for part in reversed(parts):  # a piece returns the values that later ops read before binding them
        free: dict[Ref, None] = {}
        bound: set[Ref] = set()
        for op in [part] if isinstance(part, Op) else part.ops:
            free.update((r, None) for r in op.reads() if r not in bound)
            bound.update(op.bound())
        if isinstance(part, Piece):
            part.inputs = [r for r in free if _is_tensor(r, program.namespace)]
            part.outputs = sorted(bound & later_reads, key=lambda r: r.index)
        later_reads |= set(free)
    return parts


def lift_host_lists(program: Program) -> tuple[Program, list[Op]]:
    """Rewrite task-group ops of updatable ops with a static form into plain calls of it, on a lifted tensor.

    Returns a copy of the program with those ops rewritten (its namespace extended with the static
    forms and capture-time examples of the lifted tensors) and the ops that rebuild each lifted tensor
    from its task group's current host list, to run before the program.
    """
    lifted_program = program.copy(ops=[])
    lifts = []
    for op in program.ops:
        spec = updatable_op(program.value(op.fn)) if op.task is not None else None
        if spec is None or spec.static_form is None:
            lifted_program.ops.append(op)
            continue
        task = program.value(op.task)
        frozen = {k: v for k, v in task.items() if k != spec.host_list}
        lifted = lifted_program.new_ref(Kind.LIFTED, torch.tensor(task[spec.host_list]))
        static_form = lifted_program.new_ref(Kind.CONST, functools.partial(spec.static_form, **frozen))
        kwargs = {**op.kwargs, spec.host_list: lifted}
        lifted_program.ops.append(dataclasses.replace(op, fn=static_form, task=None, kwargs=kwargs))
        read_host_list = lifted_program.new_ref(Kind.CONST, functools.partial(_host_list_tensor, key=spec.host_list))
        lifts.append(Op(read_host_list, (op.task,), binds=(lifted,)))
    return lifted_program, lifts


def _host_list_tensor(task: dict[str, Any], key: str) -> torch.Tensor:
    return torch.tensor(task[key])


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


def _parameters(inputs: list[Ref], program: Program) -> tuple[list[Ref], list[str]]:
    """A piece's parameters, and the lines that rebuild its view inputs (the KV cache's slot view)
    from their bases, which are passed instead (as new EXTERNAL refs): an in-place write to a view
    input would become a copy of the whole base."""
    bases = {id(t): r for r in inputs if isinstance(t := program.namespace.get(r.name), torch.Tensor) and t._base is None}
    params: dict[Ref, None] = {}  # ordered, without repeats
    prelude = []
    for ref in inputs:
        t = program.namespace.get(ref.name)
        if not isinstance(t, torch.Tensor) or t._base is None:
            params[ref] = None
            continue
        if id(t._base) not in bases:
            bases[id(t._base)] = program.new_ref(Kind.EXTERNAL, t._base)
        base = bases[id(t._base)]
        prelude.append(f"{ref.name} = {base.name}.{_view(t)}")
        params[base] = None
    return list(params), prelude


def _piece_function(piece: Piece, params: list[Ref], prelude: list[str], namespace: dict[str, Any]) -> Callable:
    returns = "".join(f"{r.name}, " for r in piece.outputs)
    body = [*prelude, *(op.source() for op in piece.ops), f"return ({returns})"]
    source = f"def piece({', '.join(r.name for r in params)}):\n" + "".join(f"    {line}\n" for line in body)
    scope = dict(namespace)
    exec(compile(source, "<SimNPUGraph piece>", "exec"), scope)
    return scope["piece"]


def compile_pieces(program: Program) -> Callable[[], None]:
    """A replay function running inductor-compiled pieces and the task groups between them."""
    # Imported here: with sympy and inductor they cost a second, which only compiled mode should pay.
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    global compilations
    program, replay_ops = lift_host_lists(program)
    scope = program.namespace  # the replay's globals: the recording's, lifted lists, bases and pieces
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())  # a shape env lets inductor's FX graph cache serve the pieces
    fakes: dict[Ref, torch.Tensor] = {}

    def fake(ref: Ref) -> torch.Tensor:
        if ref not in fakes:
            fakes[ref] = fake_mode.from_tensor(program.value(ref), static_shapes=True)  # no symbolic sizes
        return fakes[ref]

    with torch.inference_mode():  # as replay: the pool's outputs and the KV cache are inference tensors
        for part in split_graph(program):
            if isinstance(part, Op):  # a task group: its fake kernel gives the shapes of what follows
                env = {**scope, **{r.name: fake(r) for r in part.reads() if _is_tensor(r, scope)}}
                with fake_mode:
                    exec(part.source(), env)
                fakes.update((r, env[r.name]) for r in part.bound())
                replay_ops.append(part)
                continue
            params, prelude = _parameters(part.inputs, program)
            args = [fake(r) for r in params]
            gm = make_fx(_piece_function(part, params, prelude, scope), _DECOMPOSITIONS, tracing_mode="fake")(*args)
            with fake_mode:
                fakes.update(zip(part.outputs, gm(*args)))
            compiled = program.new_ref(Kind.CONST, compile_fx(gm, args, config_patches=_INDUCTOR_CONFIG))
            compilations += 1
            binds = tuple(part.outputs) or None
            replay_ops.append(Op(compiled, tuple(params), binds=binds, unpack=binds is not None))
    return render(replay_ops, scope, "compiled_replay")


@contextlib.contextmanager
def piecewise_graph(npu_graph: SimNPUGraph, pool: SimGraphPool | None = None) -> Iterator[SimNPUGraph]:
    """Capture like `graph(..., auto_dispatch_capture=True)`, then compile the capture piecewise."""
    with graph(npu_graph, pool=pool, auto_dispatch_capture=True):
        yield npu_graph
    npu_graph.recompile(compile_pieces)
