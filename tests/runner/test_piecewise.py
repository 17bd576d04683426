"""Piecewise compilation of a SimNPUGraph: cuts at updatable ops without a static form, lifts the
host list of those with one, and keeps `update()` driving both after compilation."""
import pytest
import torch

from reference_runner.graphs.updatable import register_updatable_op
from reference_runner.sim import piecewise
from reference_runner.sim.graph import SimNPUGraph, graph
from reference_runner.sim.piecewise import Piece, piecewise_graph, split_graph
from reference_runner.sim.recording import Kind


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
