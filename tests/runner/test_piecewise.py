"""Piecewise compilation of a SimNPUGraph: cuts at updatable ops without a static form, lifts the
host list of those with one, and keeps `update()` driving both after compilation; cuts between
decoder layers where identical layers repeat, and compiles each distinct piece once for every captured
size of a pool (the batch dim marked dynamic, size 1 included), sizes its guards leave out apart."""
import copy
import functools

import pytest
import torch

from harness.inputs.checkpoints import ensure_checkpoint
from harness.inputs.workloads import make_requests
from harness.verdicts.compare import compare_generations
from harness.verdicts.tolerances import Tolerance
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.graphs.compiled import mark_dynamic_batch
from reference_runner.graphs.cpu import sim_backend
from reference_runner.graphs.updatable import register_updatable_op
from reference_runner.sim import piecewise
from reference_runner.sim.graph import SimNPUGraph, graph, graph_pool_handle
from reference_runner.sim.piecewise import Piece, PiecewiseCompiler, const_key, piecewise_graph, split_graph
from reference_runner.sim.recording import Kind, Program


@torch.library.custom_op("pwtest::scaled", mutates_args=())
def scaled(x: torch.Tensor, *, lengths: list[int]) -> torch.Tensor:
    """An updatable op with a static form: its result depends on a host list."""
    return x * sum(lengths)


@torch.library.custom_op("pwtest::shifted", mutates_args=())
def shifted(x: torch.Tensor, *, lengths: list[int]) -> torch.Tensor:
    """An updatable op without a static form: compiled graphs are cut around it."""
    return x + max(lengths)


for op in (scaled, shifted):
    op.register_fake(lambda x, *, lengths: torch.empty_like(x))
register_updatable_op(torch.ops.pwtest.scaled, "lengths", static_form=lambda x, lengths: x * lengths.sum())
register_updatable_op(torch.ops.pwtest.shifted, "lengths")


class Step:
    """Static input, a cache written in place at `slot`, and both kinds of updatable op."""

    def __init__(self) -> None:
        self.x = torch.arange(8.0).view(2, 4)
        self.cache = torch.zeros(4, 2, 4)
        self.slots = self.cache.view(8, 4)  # written through a view, as the KV cache is
        self.slot = torch.tensor([5, 2])

    def __call__(self, lengths: list[int]) -> torch.Tensor:
        h = torch.ops.pwtest.shifted(self.x.relu() * 2, lengths=lengths)
        self.slots.index_copy_(0, self.slot, h)
        return torch.ops.pwtest.scaled(h + 1, lengths=lengths).sum(-1)


def eager(lengths: list[int]) -> torch.Tensor:
    h = torch.arange(8.0).view(2, 4) * 2 + max(lengths)
    return ((h + 1) * sum(lengths)).sum(-1)


def capture(step: Step, compiled: bool) -> tuple[SimNPUGraph, torch.Tensor]:
    g = SimNPUGraph()
    with piecewise_graph(g) if compiled else graph(g, auto_dispatch_capture=True):
        out = step([1, 2])
    return g, out


def test_split_cuts_at_ops_without_static_form_and_lifts_the_others():
    g, _ = capture(Step(), compiled=False)
    program, lifts = piecewise.lift_host_lists(g.program)
    parts = split_graph(program)
    assert [type(p).__name__ for p in parts] == ["Piece", "Op", "Piece"]
    first, cut, second = parts
    assert cut.task.name == "T0" and all(op.task is None for op in first.ops + second.ops)
    (lift,) = lifts
    assert ([r.name for r in lift.args], [r.kind for r in lift.bound()]) == (["T1"], [Kind.LIFTED])
    assert isinstance(first, Piece) and len(first.outputs) == 1  # relu * 2 feeds the cut
    assert cut.bound()[0] in second.inputs  # the cut's output feeds the second piece
    assert lift.bound()[0] in second.inputs


@pytest.mark.parametrize("lengths", [[1, 2], [7, 3], [0, 0]])  # a host list keeps its capture-time length
def test_compiled_replay_follows_update_and_writes_the_cache_in_place(lengths):
    step = Step()
    before = piecewise.compilations
    g, out = capture(step, compiled=True)
    assert piecewise.compilations - before == 2  # the two pieces around the cut
    g.update(cpu_update_input=[{"lengths": lengths}])
    g.replay()
    torch.testing.assert_close(out, eager(lengths))
    expected_rows = torch.arange(8.0).view(2, 4) * 2 + max(lengths)
    torch.testing.assert_close(step.slots[[5, 2]], expected_rows)
    assert step.slots[[0, 1, 3, 4, 6, 7]].count_nonzero() == 0  # rows 5 and 2 only


# --- captured sizes: one compile for all of a pool -------------------------------------------------

class Rows:
    """A static buffer of 4 rows, of which the graph of size n reads the first n (its batch dim marked dynamic, as
    the graph runner marks it in compiled mode), and a host list of one length per row. With `asks_for_1`, the graph
    first copies its rows through a transpose: `reshape` of the transposed rows asks whether there is one row."""

    def __init__(self, asks_for_1: bool = False) -> None:
        self.buffer = torch.arange(-8.0, 8.0).view(4, 4)
        self.asks_for_1 = asks_for_1

    def capture(self, n: int, pool) -> tuple[SimNPUGraph, torch.Tensor]:
        rows = self.buffer[:n]
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        g = SimNPUGraph(f"rows={n}")
        with piecewise_graph(g, pool):
            x = rows.t().reshape(-1).unflatten(0, (4, -1)).t() if self.asks_for_1 else rows
            out = torch.ops.pwtest.scaled(x.relu() * 2, lengths=[0] * n).sum(-1)
        return g, out

    def expected(self, n: int, lengths: list[int]) -> torch.Tensor:
        return (self.buffer[:n].relu() * 2 * sum(lengths)).sum(-1)


@pytest.mark.parametrize(("asks_for_1", "compiles"), [(False, 1), (True, 2)])
def test_one_trace_and_compile_serve_every_size_of_a_pool_but_a_size_its_trace_guards_against(monkeypatch, asks_for_1,
                                                                                              compiles):
    traced = []
    propagate = PiecewiseCompiler._propagate_fakes
    monkeypatch.setattr(PiecewiseCompiler, "_propagate_fakes", lambda self: traced.append(self) or propagate(self))
    rows, pool, before = Rows(asks_for_1), graph_pool_handle(), piecewise.compilations
    graphs = {n: rows.capture(n, pool) for n in (4, 3, 2, 1)}
    # Traced at 4 with sizes 0 and 1 not specialised (size-oblivious): 1 is admitted like 3 and 2, unless the trace
    # guarded that the batch is not 1; then 1 traces and compiles apart.
    assert (piecewise.compilations - before, len(traced)) == (compiles, compiles)
    for n, (g, out) in graphs.items():
        lengths = list(range(1, n + 1))
        g.update(cpu_update_input=[{"lengths": lengths}])
        g.replay()
        torch.testing.assert_close(out, rows.expected(n, lengths))


@pytest.mark.parametrize(("sizes", "cached"), [((4, 1), True), ((1,), False)])
def test_a_compile_traced_at_size_1_is_never_served_from_inductors_cache(monkeypatch, sizes, cached):
    import torch._inductor.compile_fx as inductor

    patches = []
    compile_fx = inductor.compile_fx

    def recording_compile(gm, args, **kwargs):
        if "config_patches" in kwargs:  # the piece's compile, not inductor's calls of itself
            patches.append(kwargs["config_patches"])
        return compile_fx(gm, args, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", recording_compile)
    rows, pool = Rows(), graph_pool_handle()
    for n in sizes:  # size 1 after 4 shares the compile made at 4
        rows.capture(n, pool)
    # a guard inductor adds is recorded only by a compile it makes: at size 1 it may guard that size
    assert [p.get("fx_graph_cache", True) for p in patches] == [cached]


def test_compiled_modes_warm_up_by_starting_the_probe_of_the_cpu_once_per_process():
    assert sim_backend("graph").warm_up is None
    sim_backend("compile").warm_up()
    probe = piecewise._isa_probe
    assert probe is not None and probe.name == "inductor ISA probe" and probe.ident is not None  # started
    sim_backend("compile_nograph").warm_up()
    assert piecewise._isa_probe is probe


def test_the_graphs_of_another_pool_compile_their_own():
    rows, before = Rows(), piecewise.compilations
    for pool in (graph_pool_handle(), graph_pool_handle()):
        rows.capture(3, pool)
    assert piecewise.compilations - before == 2


def test_a_compiled_piece_holds_for_the_sizes_its_ranges_and_guards_admit():
    import sympy
    from torch.utils._sympy.value_ranges import ValueRanges

    s = sympy.Symbol("s", integer=True, positive=True)
    piece = piecewise.CompiledPiece(lambda: None, [s], [ValueRanges(2, sympy.oo)], [sympy.Ne(s, 5)])
    assert [n for n in range(1, 8) if piece.holds_for([n])] == [2, 3, 4, 6, 7]


def test_the_graph_runner_marks_the_batch_dim_of_its_static_inputs_in_compiled_mode():
    engine = Engine(ensure_checkpoint("qwen2_moe"), EngineArgs(mode="graph", graph_bs=(2,), max_bs=2))
    batch = engine.model_runner.graph_runner.static_batch(2, [0, 0])
    mark_dynamic_batch(batch)
    rows = [batch.input_ids, batch.positions, batch.out_cache_loc, batch.seq_lens, batch.block_tables,
            batch.routing.replay_ids, batch.routing.topk_ids, batch.routing.gaps]
    assert [t._dynamo_weak_dynamic_indices for t in rows] == [{0}] * 8


# --- decoder layers: cut where identical work repeats, compiled once --------------------------------

def decode_program(model: str, **overrides) -> Program:
    """The program a plain capture of `model` records for one decode step of 2 requests."""
    engine = Engine(ensure_checkpoint(model, **overrides), EngineArgs(mode="graph", graph_bs=(2,), max_bs=2))
    return engine.model_runner.graph_runner.graphs[2].program


def piece_keys(program: Program, boundaries: set[int] | None = None) -> list:
    """The key of each piece of `program` cut at `boundaries` (None: at every layer boundary)."""
    compiler = PiecewiseCompiler(program)
    return [compiler.code(p).key for p in split_graph(compiler.program, boundaries) if isinstance(p, Piece)]


def test_every_decoder_layer_after_the_first_is_the_same_piece():
    keys = piece_keys(decode_program("llama", num_hidden_layers=5))
    # embedding, layer 0 (no residual yet), layers 1-4, final norm and LM head
    assert len(keys) == 7
    assert len(set(keys[2:6])) == 1
    assert len(set(keys)) == 4


def test_a_layer_boundary_is_kept_only_next_to_a_piece_that_shares_its_key():
    deep = PiecewiseCompiler(decode_program("llama", num_hidden_layers=5))
    keys = piece_keys(deep.program, deep.boundaries())
    assert len(keys) == 6 and len(set(keys)) == 3  # embedding with layer 0, layers 1-4, LM head
    shallow = PiecewiseCompiler(decode_program("llama"))
    assert shallow.boundaries() == set()  # two layers, both unlike any other: one piece, as fast as before


def test_layers_that_differ_do_not_share_a_piece():
    keys = piece_keys(decode_program("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1, 3]))
    dense, sparse = keys[2], keys[3]  # layers 1 (dense) and 2 (sparse)
    assert keys[4] == dense and sparse != dense and sparse not in keys[:2]


@pytest.mark.parametrize(("a", "b"), [(1, 1.0), (1, True), (0.0, -0.0), ([1, 2], (1, 2)), (slice(0, 2), slice(0, 3)),
                                      (functools.partial(max, 1), functools.partial(max, 2))])
def test_constants_that_trace_differently_have_different_keys(a, b):
    assert const_key(a) != const_key(b)
    assert const_key(a) == const_key(copy.deepcopy(a))


def test_a_constant_that_cannot_be_compared_makes_its_piece_unique():
    value = object()
    assert const_key(value) != const_key(value)


def test_identical_layers_and_captured_sizes_compile_once_and_replay_as_eager():
    checkpoint = ensure_checkpoint("llama", num_hidden_layers=5)
    before = piecewise.compilations
    engine = Engine(checkpoint, EngineArgs(mode="compile", graph_bs=(1, 2, 4), max_bs=4))
    # embedding + layer 0, a layer, LM head: once for sizes 4, 2 and 1
    assert piecewise.compilations - before == 3
    requests = make_requests("batch3", engine.model_runner.vocab_size, 16)
    verdicts = compare_generations(Engine(checkpoint).generate(requests), engine.generate(requests),
                                   Tolerance.for_pair(torch.float32, "cpu", across_kernels=True))
    assert {v.status for v in verdicts} <= {"match", "tie"}
    assert engine.stats.graph_steps > 0
