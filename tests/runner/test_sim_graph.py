"""SimNPUGraph reproduces NPUGraph's observable semantics (docs/design.md, five rules)."""
import math

import pytest
import torch
import torch.nn.functional as F

from reference_runner.graphs.updatable import register_updatable_op
from reference_runner.sim.graph import CaptureError, SimNPUGraph, graph, graph_pool_handle


@torch.library.custom_op("simtest::scaled_by_lengths", mutates_args=())
def scaled_by_lengths(x: torch.Tensor, *, lengths: list[int], bias: float = 0.0) -> torch.Tensor:
    """A stand-in for the paged attention op: its result depends on a host list."""
    return x * sum(lengths) + bias


register_updatable_op(torch.ops.simtest.scaled_by_lengths, "lengths")


@pytest.fixture
def weight():
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(0))


def capture(step, auto_dispatch_capture=True, pool=None):
    g = SimNPUGraph()
    with graph(g, pool=pool, auto_dispatch_capture=auto_dispatch_capture):
        out = step()
    return g, out


# 1. Static addresses


def test_replay_reads_current_contents_of_captured_inputs(weight):
    static_x = torch.zeros(2, 8)
    g, out = capture(lambda: F.linear(static_x, weight))
    new_x = torch.randn(2, 8)
    static_x.copy_(new_x)
    g.replay()
    torch.testing.assert_close(out, F.linear(new_x, weight))


def test_replay_writes_into_the_output_tensor_allocated_at_capture(weight):
    static_x = torch.randn(2, 8)
    g, out = capture(lambda: F.linear(static_x, weight))
    out_id, out_ptr = id(out), out.data_ptr()
    g.replay()
    assert (id(g.outputs[0]), g.outputs[0].data_ptr()) == (out_id, out_ptr)


def test_rebinding_a_python_name_does_not_change_replay(weight):
    state = {"x": torch.ones(2, 8)}
    g, out = capture(lambda: F.linear(state["x"], weight))
    state["x"] = torch.full((2, 8), 5.0)
    g.replay()
    torch.testing.assert_close(out, F.linear(torch.ones(2, 8), weight))


def test_in_place_writes_to_captured_tensors_happen_on_replay():
    cache = torch.zeros(4, 3)
    loc = torch.tensor([2])
    value = torch.ones(1, 3)
    g, _ = capture(lambda: cache.index_copy_(0, loc, value * 2))
    g.replay()
    assert cache[2].tolist() == [2.0, 2.0, 2.0]


# 2. Capture does not compute


def test_outputs_returned_by_capture_are_poisoned(weight):
    _g, out = capture(lambda: F.linear(torch.ones(2, 8), weight))
    assert torch.isnan(out).all()


def test_integer_outputs_returned_by_capture_are_poisoned():
    x = torch.randn(3, 5)
    _g, out = capture(lambda: x.argmax(dim=-1))
    assert out.tolist() == [torch.iinfo(torch.int64).min] * 3


def test_capture_leaves_preexisting_tensors_unwritten():
    cache = torch.zeros(4, 3)
    loc = torch.tensor([1])
    capture(lambda: cache.index_copy_(0, loc, torch.ones(1, 3)))
    assert cache.abs().sum().item() == 0


# 3. Frozen host values


def test_host_list_is_frozen_at_capture():
    x = torch.ones(2)
    lengths = [1, 2]
    g, out = capture(lambda: torch.ops.simtest.scaled_by_lengths(x, lengths=lengths), auto_dispatch_capture=False)
    lengths.append(100)
    g.replay()
    assert out.tolist() == [3.0, 3.0]


def test_python_scalars_and_control_flow_are_resolved_at_capture():
    x = torch.ones(2)
    config = {"scale": 2.0}

    def step():
        return x * config["scale"] if config["scale"] > 1 else x - 1

    g, out = capture(step)
    config["scale"] = 0.0
    g.replay()
    assert out.tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    "step, op_name",
    [
        (lambda x: x.sum().item(), "item"),
        (lambda x: x.tolist(), "tolist"),
        (lambda x: x * 2 if x.sum() > 0 else x, "__bool__"),
        (lambda x: x.nonzero(), "aten.nonzero"),
        (lambda x: x[x > 0], "aten.index.Tensor"),
        (lambda x: torch.unique(x), "unique"),
        (lambda x: torch.where(x > 0), "aten.nonzero"),
        (lambda x: torch.repeat_interleave(x, (x > 0).long()), "aten.repeat_interleave"),
        (lambda x: x.__setitem__(x > 0, torch.ones(4)), "aten.index_put_"),
    ],
)
def test_host_reads_and_data_dependent_shapes_are_refused_at_capture(step, op_name):
    x = torch.randn(4)
    with pytest.raises(CaptureError, match=op_name):
        capture(lambda: step(x))


@pytest.mark.parametrize(
    "step",
    [lambda x: x.masked_fill(x > 0, 0.0), lambda x: x.__setitem__(x > 0, 0.0), lambda x: F.one_hot(x.long().abs(), 8)],
    ids=["masked_fill", "mask_assign_scalar", "one_hot_with_num_classes"],
)
def test_static_shape_masking_is_capturable(step):
    capture(lambda: step(torch.randn(4)))


def test_integer_index_tensors_are_capturable():
    table = torch.arange(10.0)
    idx = torch.tensor([3, 1])
    g, out = capture(lambda: table[idx])
    idx.copy_(torch.tensor([7, 9]))
    g.replay()
    assert out.tolist() == [7.0, 9.0]


# 4. Task groups and update


def two_task_graph(auto_dispatch_capture=True):
    x = torch.ones(2)

    def step():
        y = torch.ops.simtest.scaled_by_lengths(x, lengths=[1])
        return torch.ops.simtest.scaled_by_lengths(y, lengths=[1])

    return capture(step, auto_dispatch_capture)


def test_each_updatable_call_is_one_task_group():
    g, _ = two_task_graph()
    assert g.num_task_groups == 2


def test_update_with_one_element_is_broadcast_to_every_task():
    g, out = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [2, 1]}])
    g.replay()
    assert out.tolist() == [9.0, 9.0]


def test_update_with_one_element_per_task_applies_in_capture_order():
    g, out = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [2]}, {"lengths": [5]}])
    g.replay()
    assert out.tolist() == [10.0, 10.0]


def test_update_with_wrong_number_of_elements_raises():
    g, _ = two_task_graph()
    with pytest.raises(RuntimeError, match="there are 2 operators to update, but cpu_update_input has 3 elements"):
        g.update(cpu_update_input=[{"lengths": [1]}] * 3)


def test_update_ignores_keys_not_passed_at_capture():
    g, out = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [2], "bias": 100.0}])
    g.replay()
    assert out.tolist() == [4.0, 4.0]


def test_updates_persist_across_replays():
    g, out = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [3]}])
    g.replay()
    g.replay()
    assert out.tolist() == [9.0, 9.0]


def test_update_needs_auto_dispatch_capture():
    g, _ = two_task_graph(auto_dispatch_capture=False)
    with pytest.raises(RuntimeError, match="auto_dispatch_capture=True"):
        g.update(cpu_update_input=[{"lengths": [3]}])


def test_update_copies_the_new_host_list():
    g, out = two_task_graph()
    lengths = [2]
    g.update(cpu_update_input=[{"lengths": lengths}])
    lengths.append(10)
    g.replay()
    assert out.tolist() == [4.0, 4.0]


# 5. Lifecycle


@pytest.mark.parametrize("call", ["replay", "pool"])
def test_replay_and_pool_before_capture_raise(call):
    with pytest.raises(RuntimeError, match=f"Called NPUGraph::{call} without a preceding successful capture"):
        getattr(SimNPUGraph(), call)()


def test_update_before_capture_raises():
    with pytest.raises(RuntimeError, match="without a preceding successful capture"):
        SimNPUGraph().update(cpu_update_input=[{}])


def test_capturing_twice_into_one_graph_raises():
    g, _ = capture(lambda: torch.ones(1) * 2)
    with pytest.raises(RuntimeError, match="already holds a capture"), graph(g):
        torch.ones(1)


def test_reset_frees_the_capture_and_allows_a_new_one():
    g, _ = capture(lambda: torch.ones(1) * 2)
    g.reset()
    with pytest.raises(RuntimeError, match="replay without a preceding successful capture"):
        g.replay()
    with graph(g):
        out = torch.ones(1) * 3
    g.replay()
    assert out.tolist() == [3.0]


def test_an_error_inside_capture_leaves_the_graph_empty():
    g = SimNPUGraph()
    with pytest.raises(ZeroDivisionError), graph(g):
        torch.ones(1) * (1 / 0)
    with pytest.raises(RuntimeError, match="replay without"):
        g.replay()


def test_graphs_in_one_pool_share_their_output_memory():
    pool = graph_pool_handle()
    x = torch.ones(4)
    big, big_out = capture(lambda: x * 2, pool=pool)
    small, _small_out = capture(lambda: x[:2] * 3, pool=big.pool())
    assert big.pool() is small.pool() is pool
    big.replay()
    small.replay()  # overwrites the shared memory the big graph's output lives in
    assert big_out.tolist()[:2] == [3.0, 3.0]
    assert pool.nbytes() == math.ceil(4 * 4 / 64) * 64
