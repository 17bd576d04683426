"""Process groups and collectives: the TP-major rank layout, and collectives that a device graph records
and replays (communicating again at every replay)."""
import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks

from reference_runner.parallel.collectives import all_reduce, dp_gather_host
from reference_runner.parallel.state import ParallelState, init_parallel
from reference_runner.sim.graph import SimNPUGraph, graph


def group_ranks(tp: int, dp: int):
    parallel = init_parallel(tp, dp, "cpu", timeout_s=30)
    return (parallel.tp_rank, parallel.dp_rank, dist.get_process_group_ranks(parallel.tp_group),
            dist.get_process_group_ranks(parallel.dp_group))


def replayed_all_reduce():
    parallel = init_parallel(2, 1, "cpu", timeout_s=30)
    x = torch.zeros(3)
    g = SimNPUGraph()
    with graph(g, auto_dispatch_capture=True):
        out = all_reduce(x * 2, parallel)
    sums = []
    for step in (1, 2):
        x.copy_(torch.tensor([1.0, 2.0, 3.0]) * (parallel.tp_rank + 1) * step)
        g.replay()
        sums.append(out.tolist())
    return sums


def gathered_counts():
    parallel = init_parallel(1, 2, "cpu", timeout_s=30)
    return dp_gather_host([parallel.dp_rank + 5, 1], parallel, "cpu")


@pytest.mark.multirank
@pytest.mark.parametrize(("tp", "dp", "expected"), [
    (2, 1, [(0, 0, [0, 1], [0]), (1, 0, [0, 1], [1])]),
    (1, 2, [(0, 0, [0], [0, 1]), (0, 1, [1], [0, 1])]),
])
def test_ranks_are_laid_out_tp_major(tp, dp, expected):
    assert run_ranks(group_ranks, 2, tp, dp) == expected


@pytest.mark.multirank
def test_captured_all_reduce_communicates_at_every_replay():
    # Rank r holds [1, 2, 3] * (r + 1) * step; doubled and summed over both ranks: [6, 12, 18] * step.
    expected = [[6.0, 12.0, 18.0], [12.0, 24.0, 36.0]]
    assert run_ranks(replayed_all_reduce, 2) == [expected, expected]


@pytest.mark.multirank
def test_dp_gather_host_gives_every_dp_rank_its_peers_values():
    assert run_ranks(gathered_counts, 2) == [[[5, 6], [1, 1]]] * 2


def test_moe_state_spans_every_rank_under_dp():
    state = ParallelState(tp_rank=1, tp_size=2, dp_rank=1, dp_size=2).moe_state()
    assert (state.tp_rank, state.tp_size, state.dp_size) == (3, 4, 1)


def test_moe_state_is_the_tp_layout_without_dp():
    state = ParallelState(tp_rank=1, tp_size=2)
    assert state.moe_state() is state
