"""Piecewise compilation of a captured SimNPUGraph with inductor: host lists kept updatable, and identical
decoder layers compiled once.

A captured graph replays a `Program` of ops. `split_graph` cuts it at each task-group op (an updatable op,
whose host arguments `update()` replaces), as vLLM's `split_graph` cuts at its splitting ops, and at the
decoder-layer boundaries the model code marks (`graphs/markers.py`). Every piece is traced with `make_fx`
over fake tensors and compiled by inductor at capture; the task groups stay plain calls reading their
task's host arguments.

Identical work compiles once. A piece is written as a function with canonical names (parameters,
constants and values numbered in order of use: `PieceCode`), and everything a decoder layer reads (its
weights, its KV cache, the hidden states of the layer before) is a parameter, never a constant; so the
layers of a step are pieces with one code, equal constants and equal parameter shapes (`PieceCode.key`),
and one compiled function serves them all. A layer boundary is kept only next to a piece that shares its
key: in a shallow model, whose layers all differ (the first has no residual yet), the step stays one
piece, since on the CPU each call out of compiled code costs as much as the arithmetic of a tiny model.
Compile cost then grows with the distinct pieces (for a deep model: embedding and first layer, the other
layers, final norm and LM head), not with depth.

An updatable op with a static form (`graphs/updatable.py`: the same result from a tensor of its host
list, at shapes fixed at capture) is not a cut: its host list is lifted into a tensor input that replay
rebuilds from the task group each time, so `update()` still drives it.

Pieces have no guards: their shapes were fixed at capture, so changing lengths never recompiles
(`compilations` counts every compile). Writes to tensors from before capture (the KV cache, the output
buffers) are graph-input mutations that inductor performs in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from reference_runner.graphs.compiled import dynamic_dims, mark_dynamic_batch
from reference_runner.graphs.markers import layer_boundary
from reference_runner.graphs.updatable import updatable_op
from reference_runner.sim.graph import SimNPUGraph, graph
from reference_runner.sim.pool import SimGraphPool
from reference_runner.sim.recording import Kind, Op, Program, Ref, render

# The C++ wrapper runs a piece's kernels with no Python between them: a third off a tiny model's step.
_INDUCTOR_CONFIG = {"cpp_wrapper": True}

compilations = 0  # inductor compiles of pieces in this process
_isa_probe: threading.Thread | None = None  # `probe_cpu_isa`'s, once per process


def probe_cpu_isa() -> None:
    """Start inductor's probe of this CPU's vector ISAs in the background, once per process. From an empty inductor
    cache it builds and loads a test program per ISA the CPU reports (about 10 s of gcc on a 2-core Xeon), which would
    otherwise open the first compile; started when compile mode is planned, it runs beside the eager baseline."""
    global _isa_probe
    if _isa_probe is None:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        # A daemon: a stopped run does not wait for it (its gcc, if one is running, ends on its own).
        _isa_probe = threading.Thread(target=pick_vec_isa, name="inductor ISA probe", daemon=True)
        _isa_probe.start()


@dataclass
class Piece:
    """Consecutive ops with no task group: compiled into one function."""

    ops: list[Op] = field(default_factory=list)
    inputs: list[Ref] = field(default_factory=list)  # tensors read before the piece binds them
    outputs: list[Ref] = field(default_factory=list)  # values that later ops read
    boundary: int | None = None  # the index of the layer-boundary op that starts the piece, if one does


def _is_tensor(ref: Ref, namespace: dict[str, Any]) -> bool:
    """Values made by the graph, and tensors of the namespace (from before capture, lifted lists)."""
    return ref.kind is Kind.VALUE or isinstance(namespace.get(ref.name), torch.Tensor)


def is_layer_boundary(op: Op, program: Program) -> bool:
    """Whether `op` is the mark the model code records between decoder layers (the identity)."""
    return program.value(op.fn) is layer_boundary


def split_graph(program: Program, boundaries: set[int] | None = None) -> list[Piece | Op]:
    """The program as pieces and, between them, the task-group ops (kept as they are). A piece also ends at
    each layer-boundary op whose index is in `boundaries` (None: at every one); the marks are dropped."""
    parts: list[Piece | Op] = []
    start: int | None = None  # a piece starts at the next op: after this boundary, or after a task group
    for i, op in enumerate(program.ops):
        if op.task is not None:
            parts.append(op)
            start = None
        elif is_layer_boundary(op, program):
            if boundaries is None or i in boundaries:
                start = i
        else:
            if not parts or isinstance(parts[-1], Op) or start is not None:
                parts.append(Piece(boundary=start))
                start = None
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


@dataclass(frozen=True)
class PieceCode:
    """A piece as a function of its parameters, written with canonical names: `a0, a1...` its parameters,
    `k0, k1...` its constants, `t0, t1...` its values, each numbered in order of use. Pieces that do the
    same work on other tensors (two decoder layers) have equal keys."""

    source: str
    consts: list[Any]  # the values of k0, k1, ...
    params: list[Ref]  # what replay passes as a0, a1, ...
    key: Hashable  # the source, the constants and each parameter's dtype, shape, strides and aliasing
    symbols: list[Any] = field(default_factory=list)  # the sizes' symbols, as `key` numbers them (b0, b1, ...)

    def function(self) -> Callable:
        scope = {f"k{i}": value for i, value in enumerate(self.consts)}
        exec(compile(self.source, "<SimNPUGraph piece>", "exec"), scope)
        return scope["piece"]


def const_key(value: Any) -> Hashable:
    """A hashable stand-in for a constant of a piece, equal only for constants that trace the same: by value
    for plain data, by themselves for callables; a fresh object (equal to nothing) for anything else."""
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str, torch.dtype, torch.device,
                                                                 torch.layout, torch.memory_format)):
        return type(value), repr(value)  # repr: 1, 1.0 and True, or 0.0 and -0.0, are different constants
    if isinstance(value, slice):
        return slice, const_key(value.start), const_key(value.stop), const_key(value.step)
    if isinstance(value, (list, tuple)):
        return type(value), tuple(map(const_key, value))
    if isinstance(value, dict):
        return dict, tuple((k, const_key(v)) for k, v in value.items())
    if isinstance(value, functools.partial):
        return functools.partial, const_key(value.func), const_key(value.args), const_key(value.keywords)
    if callable(value):  # the same function, op or bound method: equal callables (by identity or by their object)
        with contextlib.suppress(TypeError):
            hash(value)
            return value
    return object()


def _tensor_key(t: torch.Tensor, symbols: list[Any]) -> Hashable:
    """`t`'s dtype, shape, strides, offset and device, each symbolic size written with the symbols numbered in order
    of first appearance in `symbols` (extended): the same key in any shape env."""
    import sympy

    def size(value: Any) -> Hashable:
        if isinstance(value, int):
            return value
        expr = value.node.expr
        for symbol in sorted(expr.free_symbols, key=str):
            if symbol not in symbols:
                symbols.append(symbol)
        return str(expr.xreplace({s: sympy.Symbol(f"b{symbols.index(s)}") for s in expr.free_symbols}))

    return t.dtype, tuple(map(size, t.shape)), tuple(map(size, t.stride())), size(t.storage_offset()), t.device.type


@dataclass
class CompiledPiece:
    """A piece's compiled function, and the guards its compile assumed of the batch size (`symbols`, in the order
    of the piece's parameters): another graph's piece of the same key reuses it where its sizes pass them."""

    function: Callable
    symbols: list[Any]  # sympy symbols of the compile's shape env
    ranges: list[Any]  # the values it assumed each can take (from 0: sizes 0 and 1 are not specialised)
    guards: list[Any]  # sympy booleans over them

    def holds_for(self, sizes: list[int]) -> bool:
        import sympy

        values = {symbol: sympy.Integer(size) for symbol, size in zip(self.symbols, sizes)}
        return (all(r.lower <= size <= r.upper for r, size in zip(self.ranges, sizes))
                and all(guard.xreplace(values) is sympy.true for guard in self.guards))


@dataclass
class PoolPieces:
    """What the graphs of one pool (one engine: all its families and sizes) share: the compiled pieces by key, and
    per program signature the compilers that traced it, whose symbolic fake values serve the same step at another
    batch size (tracing a 30-layer step symbolically costs as much as compiling a piece)."""

    pieces: dict[Hashable, list[CompiledPiece]] = field(default_factory=dict)
    traced: dict[Hashable, list[PiecewiseCompiler]] = field(default_factory=dict)


_SHARED: weakref.WeakKeyDictionary[SimGraphPool, PoolPieces] = weakref.WeakKeyDictionary()


class PiecewiseCompiler:
    """Compiles one captured program: fake values for every ref, pieces cut where identical work repeats,
    one inductor compile per distinct piece, shared with the other graphs of the pool where it holds for them.

    Inputs whose dims the graph runner marked dynamic (`graphs/compiled.py`: the batch dim of its static inputs)
    get one symbol per size, as do the host lists lifted into tensors (one entry per row) and the outputs; the
    fake values of the whole program are then symbolic in the batch size, and so is each piece's compile."""

    def __init__(self, program: Program, shared: PoolPieces | None = None) -> None:
        # Imported here: with sympy they cost a second, which only compiled mode should pay.
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.program, self.lifts = lift_host_lists(program)
        self.scope = self.program.namespace  # the replay's globals: the recording's, lifted lists, bases, pieces
        externals = [Ref(Kind.EXTERNAL, i) for i in range(self.program.counts[Kind.EXTERNAL])]
        # id(tensor from before capture) -> its EXTERNAL ref: how pieces receive a view input's base
        self.externals = {id(self.program.value(r)): r for r in externals}
        # The inputs whose size is the batch: those the graph runner marked, and the host lists lifted into tensors.
        self.batch_inputs = {r: dims for r in externals if (dims := dynamic_dims(self.program.value(r)))}
        self.symbolic = bool(self.batch_inputs)
        if self.symbolic:
            self.batch_inputs.update((Ref(Kind.LIFTED, i), {0}) for i in range(self.program.counts[Kind.LIFTED]))
        # Each output buffer and the value replay copies into it: the output takes that value's (symbolic) shape.
        self.output_values = {op.args[0]: op.args[1] for op in self.program.ops
                              if op.args and isinstance(op.args[0], Ref) and op.args[0].kind is Kind.OUTPUT}
        self.shared = PoolPieces() if shared is None else shared
        self.compiled: dict[Hashable, Ref] = {}  # piece key -> the CONST ref of its compiled function in this program
        self.storages: dict[int, int] = {}  # data_ptr -> the number of the storage, in order of first use
        signature = self.signature() if self.symbolic else None
        traced = self.shared.traced.setdefault(signature, []) if signature is not None else []
        same_step = next(((t, sizes) for t in traced if t.admits(sizes := self.sizes(t.fakes))), None)
        if same_step is not None:
            (step, self.symbol_values) = same_step
            self.fake_mode, self.fakes = step.fake_mode, dict(step.fakes)  # the same step, traced symbolically
        else:
            self.fake_mode = FakeTensorMode(shape_env=ShapeEnv())  # a shape env lets inductor's FX graph cache serve
            self.fakes: dict[Ref, torch.Tensor] = {}
            self._propagate_fakes()
            self.symbol_values = dict(self.fake_mode.shape_env.backed_var_to_val)  # traced at this graph's sizes
            traced.append(self)

    def signature(self) -> Hashable:
        """The program with its batch size left out: per op its callable and constants (by `const_key`), the storage
        (numbered: which tensors share one), offset, dtype, strides and unmarked sizes of each tensor from before
        capture, and the host arguments of each task group but its lists. Two captures of one step at other batch
        sizes, or from other tensors of the same layout (`CompiledStep`), have equal signatures."""

        def arg(a: Any) -> Hashable:
            if isinstance(a, Ref):
                return self._ref_signature(a)
            if isinstance(a, (list, tuple)):
                return type(a), tuple(map(arg, a))
            if isinstance(a, dict):
                return dict, tuple((k, arg(v)) for k, v in a.items())
            return const_key(a)

        return tuple((arg(op.fn), arg(op.args), arg(op.kwargs), op.task and arg(op.task), op.binds, op.unpack)
                     for op in self.program.ops)

    def _ref_signature(self, ref: Ref) -> Hashable:
        value = self.program.namespace.get(ref.name)
        if ref.kind is Kind.CONST:
            return ref, const_key(value)
        if ref.kind is Kind.EXTERNAL:
            dims = self.batch_inputs.get(ref, ())
            storage = self.storages.setdefault(value.untyped_storage().data_ptr(), len(self.storages))
            return (ref, storage, value.storage_offset(), value.dtype, value.stride(),
                    tuple(size for d, size in enumerate(value.shape) if d not in dims))
        if ref.kind is Kind.TASK:  # its lists are the host lists update() replaces, one entry per row
            return ref, tuple((k, "list" if isinstance(v, list) else const_key(v)) for k, v in value.items())
        return ref  # values, outputs and lifted lists: shaped by the ops that make them

    def sizes(self, fakes: dict[Ref, torch.Tensor]) -> dict[Any, int] | None:
        """This graph's value of each symbol that `fakes` give its batch inputs, or None where two disagree."""
        values: dict[Any, int] = {}
        for ref, dims in self.batch_inputs.items():
            if ref not in fakes:  # read by no op
                continue
            for d in dims:
                size, real = fakes[ref].shape[d], self.program.value(ref).shape[d]
                expr = size.node.expr if isinstance(size, torch.SymInt) else size
                if not isinstance(size, torch.SymInt) or len(expr.free_symbols) != 1 or expr != next(iter(expr.free_symbols)):
                    if expr != real:  # specialised, or not a lone symbol: must be this very size
                        return None
                    continue
                if values.setdefault(expr, real) != real:
                    return None
        return values

    def admits(self, sizes: dict[Any, int] | None) -> bool:
        """Whether this compiler's symbolic trace holds for batch `sizes`: each within its symbol's range, and
        every guard of the shape env true of them."""
        import sympy

        if sizes is None:
            return False
        shape_env = self.fake_mode.shape_env
        values = {symbol: sympy.Integer(size) for symbol, size in sizes.items()}
        return (all(shape_env.var_to_range[s].lower <= v <= shape_env.var_to_range[s].upper for s, v in sizes.items())
                and all(g.expr.xreplace(values) is sympy.true for g in shape_env.guards))

    def fake(self, ref: Ref) -> torch.Tensor:
        if ref not in self.fakes:
            self.fakes[ref] = self._make_fake(ref)
        return self.fakes[ref]

    def _make_fake(self, ref: Ref) -> torch.Tensor:
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        value = self.program.value(ref)
        if ref.kind is Kind.OUTPUT and self.symbolic:  # shaped like the value replay writes into it
            source = self.fake(self.output_values[ref])
            with self.fake_mode:
                return torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device=source.device)
        dims = dynamic_dims(value) if ref.kind is Kind.EXTERNAL else {0} if ref.kind is Kind.LIFTED and self.symbolic else ()
        if not dims:
            return self.fake_mode.from_tensor(value, static_shapes=True)  # no symbols
        # DUCK: dims of one size share one symbol, the batch size.
        dynamic = [DimDynamic.DUCK if d in dims else DimDynamic.STATIC for d in range(value.dim())]
        return self.fake_mode.from_tensor(value, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))

    def _propagate_fakes(self) -> None:
        """Run the program over fake tensors once: the example inputs of every piece, before any is traced."""
        with torch.inference_mode():  # as replay: the pool's outputs and the KV cache are inference tensors
            for op in self.program.ops:
                if is_layer_boundary(op, self.program):
                    continue
                env = {r.name: self.fake(r) for r in op.reads() if _is_tensor(r, self.scope)}
                with self.fake_mode:
                    exec(op.source(), self.scope, env)
                self.fakes.update((r, env[r.name]) for r in op.bound())

    def parameters(self, inputs: list[Ref]) -> tuple[list[Ref], list[tuple[Ref, Ref, str]]]:
        """A piece's parameters, and (view, base, how) for each view input of fixed shape that the piece rebuilds
        from its base, which is passed instead (as an EXTERNAL ref): an in-place write to a view input would become
        a copy of the whole base. Rows of a static buffer marked dynamic (the batch, such as the routing rows MoE
        layers write) are passed as they are: their base is the buffer of the largest size, a few rows."""
        params: dict[Ref, None] = {}  # ordered, without repeats
        views = []
        for ref in inputs:
            t = self.program.namespace.get(ref.name)
            if not isinstance(t, torch.Tensor) or t._base is None or dynamic_dims(t):
                params[ref] = None
                continue
            if id(t._base) not in self.externals:
                self.externals[id(t._base)] = self.program.new_ref(Kind.EXTERNAL, t._base)
            base = self.externals[id(t._base)]
            views.append((ref, base, _view(t)))
            params[base] = None
        return list(params), views

    def code(self, piece: Piece) -> PieceCode:
        """`piece` as a function with canonical names, and its key."""
        params, views = self.parameters(piece.inputs)
        names = {r: f"a{i}" for i, r in enumerate(params)}
        consts: list[Any] = []
        values = 0

        def name(ref: Ref) -> str:
            nonlocal values
            if ref not in names:
                if ref.kind is Kind.CONST:
                    names[ref] = f"k{len(consts)}"
                    consts.append(self.program.value(ref))
                else:
                    names[ref], values = f"t{values}", values + 1
            return names[ref]

        lines = [f"{name(view)} = {name(base)}.{how}" for view, base, how in views]
        lines += [op.source(name) for op in piece.ops]
        lines.append(f"return ({''.join(name(r) + ', ' for r in piece.outputs)})")
        source = f"def piece({', '.join(names[r] for r in params)}):\n" + "".join(f"    {line}\n" for line in lines)
        fakes = [self.fake(r) for r in params]
        storages = [t.untyped_storage()._cdata for t in fakes]
        aliasing = tuple(storages.index(s) for s in storages)  # the first parameter sharing each one's memory
        symbols: list[Any] = []  # the free symbols of the parameters' sizes, in order of appearance
        tensors = tuple(_tensor_key(t, symbols) for t in fakes)
        key = (source, tuple(map(const_key, consts)), tensors, aliasing)
        return PieceCode(source, consts, params, key, symbols)

    def boundaries(self) -> set[int]:
        """The layer boundaries worth a cut: those next to a piece whose key another piece shares."""
        pieces = [p for p in split_graph(self.program) if isinstance(p, Piece)]
        keys = [self.code(p).key for p in pieces]
        counts = Counter(keys)
        return {p.boundary for p, before, key, key_before in zip(pieces[1:], pieces, keys[1:], keys)
                if p.boundary is not None and max(counts[key], counts[key_before]) > 1}

    def compile_piece(self, code: PieceCode) -> Ref:
        """The CONST ref of `code`'s compiled function: a function of the pool compiled for the same key whose guards
        hold for this graph's sizes, else compiled now."""
        if code.key not in self.compiled:
            shape_env = self.fake_mode.shape_env
            sizes = [int(self.symbol_values[s]) for s in code.symbols]
            candidates = self.shared.pieces.setdefault(code.key, [])
            piece = next((p for p in candidates if p.holds_for(sizes)), None)
            if piece is None:
                function = self._compile(code)  # its guards and ranges are those of the shape env after the compile
                piece = CompiledPiece(function, code.symbols, [shape_env.var_to_range[s] for s in code.symbols],
                                      [g.expr for g in shape_env.guards])
                candidates.append(piece)
            self.compiled[code.key] = self.program.new_ref(Kind.CONST, piece.function)
        return self.compiled[code.key]

    def _compile(self, code: PieceCode) -> Callable:
        from torch._inductor.compile_fx import compile_fx
        from torch.fx.experimental.proxy_tensor import make_fx

        global compilations
        if _isa_probe is not None:
            _isa_probe.join()  # its result is cached without a lock: a second probe would build everything again
        args = [self.fake(r) for r in code.params]
        # Traced at a batch of 0 or 1, inductor may guard that size (qwen2_moe at 1 does). A compile its FX graph cache
        # serves does not put those guards back, and the piece would then be offered to other sizes: made every time.
        # The sizes the trace was made at, which inductor compiles for; not this graph's, where it reuses a trace.
        special = any(int(value) < 2 for value in self.fake_mode.shape_env.backed_var_to_val.values())
        patches = {**_INDUCTOR_CONFIG, "fx_graph_cache": False} if special else _INDUCTOR_CONFIG
        with torch.inference_mode():
            gm = make_fx(code.function(), _DECOMPOSITIONS, tracing_mode="fake")(*args)
            compiled = compile_fx(gm, args, config_patches=patches)
        compilations += 1
        return compiled

    def replay(self) -> Callable[[], None]:
        """A replay function running the compiled pieces and the task groups between them."""
        replay_ops = list(self.lifts)
        for part in split_graph(self.program, self.boundaries()):
            if isinstance(part, Op):
                replay_ops.append(part)
                continue
            code = self.code(part)
            binds = tuple(part.outputs) or None
            replay_ops.append(Op(self.compile_piece(code), tuple(code.params), binds=binds, unpack=binds is not None))
        return render(replay_ops, self.scope, "compiled_replay")


def compile_pieces(program: Program, shared: PoolPieces | None = None) -> Callable[[], None]:
    """A replay function running inductor-compiled pieces (reusing those of `shared` where they hold) and the task
    groups between them."""
    import torch.fx.experimental._config as shape_config

    # Sizes 0 and 1 not specialised (torch.export's size-oblivious tracing): one trace and compile serve a batch of 1
    # too. Where torch's code asks whether a size is 1 without guarding, it takes the branch valid for every size; a
    # guard or a runtime assert of the trace is kept, and a size it excludes compiles apart.
    with shape_config.patch(backed_size_oblivious=True):
        return PiecewiseCompiler(program, shared).replay()


@contextlib.contextmanager
def piecewise_graph(npu_graph: SimNPUGraph, pool: SimGraphPool | None = None) -> Iterator[SimNPUGraph]:
    """Capture like `graph(..., auto_dispatch_capture=True)`, then compile the capture piecewise, sharing compiled
    pieces with the other graphs of its pool."""
    with graph(npu_graph, pool=pool, auto_dispatch_capture=True):
        yield npu_graph
    shared = _SHARED.setdefault(npu_graph.pool(), PoolPieces())
    npu_graph.recompile(functools.partial(compile_pieces, shared=shared))


class CompiledStep:
    """Mode compile_nograph on the CPU: compile mode's compiled pieces without a kept graph. Each step is recorded from
    its own batch at its own size (no padding, no static buffers, its host lists as they are) and its program run once
    by the pieces compiled for its key: nothing but compiled code outlives a step, so no graph fault can."""

    def __init__(self, forward: Callable) -> None:
        self.forward = forward
        self.shared = PoolPieces()

    def __call__(self, forward_batch: Any) -> torch.Tensor:
        mark_dynamic_batch(forward_batch)  # as the graph runner marks its static batch: the same symbolic pieces
        step = SimNPUGraph("compiled step")
        with graph(step, auto_dispatch_capture=True):
            output = self.forward(forward_batch)
        run = compile_pieces(step.program, self.shared)
        with torch.inference_mode():
            run()  # the program's task groups read the host arguments they were recorded with: this step's
        return output
