"""SimNPUGraph reproduces NPUGraph's observable semantics (docs/design.md, seven rules), as each torch_npu
release line behaves (docs/npu.md, "Differences by release")."""
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from reference_runner.errors import ReplayHang
from reference_runner.graphs.releases import FIA, FIA_V2, RELEASES, TORCH_NPU_FLOOR
from reference_runner.graphs.updatable import register_updatable_op
from reference_runner.sim.graph import CaptureError, SimEvent, SimNPUGraph, UpdateRace, graph, graph_pool_handle


@torch.library.custom_op("simtest::scaled_by_lengths", mutates_args=())
def scaled_by_lengths(x: torch.Tensor, *, lengths: list[int], bias: float = 0.0) -> torch.Tensor:
    """A stand-in for the paged attention op: its result depends on a host list."""
    return x * sum(lengths) + bias


register_updatable_op(torch.ops.simtest.scaled_by_lengths, "lengths")

# The releases that record a plain call of FIA (`.default`), as the stand-in above is called.
RECORD_DEFAULT = [name for name, release in RELEASES.items() if release.intercepts(f"{FIA}.default")]

# Stand-ins for FIA and FIA v2 with an explicit `.out` overload, as torch_npu registers them.
_lib = torch.library.Library("simtest", "FRAGMENT")
for _name, _stands_for in (("fia", FIA), ("fia_v2", FIA_V2)):
    _lib.define(f"{_name}(Tensor x, *, int[] lengths) -> Tensor")
    _lib.define(f"{_name}.out(Tensor x, *, int[] lengths, Tensor(a!) out) -> Tensor(a!)")
    _lib.impl(_name, lambda x, *, lengths: x * sum(lengths), "CompositeExplicitAutograd")
    _lib.impl(f"{_name}.out", lambda x, *, lengths, out: out.copy_(x * sum(lengths)), "CompositeExplicitAutograd")
    register_updatable_op(getattr(torch.ops.simtest, _name), "lengths", torch_npu_op=_stands_for)


@pytest.fixture
def weight():
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(0))


def capture(step, auto_dispatch_capture=True, pool=None, release=TORCH_NPU_FLOOR, name="graph bs=2"):
    g = SimNPUGraph(name, release)
    with graph(g, pool=pool, auto_dispatch_capture=auto_dispatch_capture):
        out = step()
    return g, out


def replayed(g):
    """`g` replayed, and the replay seen finished (an event recorded after it completed), as the runner does."""
    g.replay()
    done = SimEvent()
    done.record()
    assert done.query()


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


def two_task_graph(auto_dispatch_capture=True, release=TORCH_NPU_FLOOR):
    x = torch.ones(2)

    def step():
        y = torch.ops.simtest.scaled_by_lengths(x, lengths=[1])
        return torch.ops.simtest.scaled_by_lengths(y, lengths=[1])

    return capture(step, auto_dispatch_capture, release=release)


def test_each_updatable_call_is_one_task_group():
    g, _ = two_task_graph()
    assert g.num_task_groups == 2


def test_update_with_one_element_is_broadcast_to_every_task():
    g, out = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [2, 1]}])
    replayed(g)
    assert out.tolist() == [9.0, 9.0]


def test_update_with_one_element_per_task_applies_in_capture_order():
    g, out = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [2]}, {"lengths": [5]}])
    replayed(g)
    assert out.tolist() == [10.0, 10.0]


def test_update_needs_auto_dispatch_capture():
    g, _ = two_task_graph(auto_dispatch_capture=False)
    with pytest.raises(RuntimeError, match="auto_dispatch_capture=True"):
        g.update(cpu_update_input=[{"lengths": [3]}])


def test_update_copies_the_new_host_list():
    g, out = two_task_graph()
    lengths = [2]
    g.update(cpu_update_input=[{"lengths": lengths}])
    lengths.append(10)
    replayed(g)
    assert out.tolist() == [4.0, 4.0]


def test_updated_host_arguments_persist_until_an_update_replaces_them():
    g, out = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [3]}])
    replayed(g)
    g.update(cpu_update_input=[{}])  # records every task group's event, replaces nothing
    replayed(g)
    assert out.tolist() == [9.0, 9.0]


# 5. Each replay consumes its update


def test_replay_right_after_capture_would_wait_forever():
    g, _ = two_task_graph()
    with pytest.raises(ReplayHang, match=r"^graph bs=2: replayed with no update\(\) since its capture: task group 1 waits "
                                         r"for an ExternalEvent that only update\(\) records, so on an NPU this replay "
                                         r"would wait forever$"):
        g.replay()


def test_second_replay_without_update_would_wait_forever():
    g, _ = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [3]}])
    replayed(g)
    with pytest.raises(ReplayHang, match=r"^graph bs=2: replayed with no update\(\) since its previous replay"):
        g.replay()


def test_a_graph_without_task_groups_replays_without_update():
    x = torch.ones(2)
    g, out = capture(lambda: x * 3)
    replayed(g)
    replayed(g)
    assert out.tolist() == [3.0, 3.0]


# 6. Replays in flight and the update stream


def test_update_while_the_previous_replay_is_in_flight_raises():
    g, _ = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [3]}])
    g.replay()  # queued: no event after it seen complete
    with pytest.raises(UpdateRace, match=r"^graph bs=2: update\(\) issued while this graph's previous replay may still be in "
                                         r"flight .* \(SGLang #16498\)"):
        g.update(cpu_update_input=[{"lengths": [4]}])


def test_an_event_recorded_before_the_replay_does_not_end_its_flight():
    g, _ = two_task_graph()
    g.update(cpu_update_input=[{"lengths": [3]}])
    early = SimEvent()
    early.record()
    g.replay()
    early.synchronize()
    with pytest.raises(UpdateRace, match="may still be in flight"):
        g.update(cpu_update_input=[{"lengths": [4]}])


class OtherThreadInside(dict):
    """Host arguments whose reading inside update() runs `other` on a second thread first, and keeps its error."""

    def __init__(self, items, other):
        super().__init__(items)
        self.other, self.errors = other, []

    def __getitem__(self, key):
        if self.other is not None:
            other, self.other = self.other, None
            thread = threading.Thread(target=lambda: self._run(other))
            thread.start()
            thread.join()
        return super().__getitem__(key)

    def _run(self, other):
        try:
            other()
        except UpdateRace as error:
            self.errors.append(str(error))


@pytest.mark.parametrize("release", RECORD_DEFAULT)
def test_two_graphs_updated_at_once_race_only_on_the_shared_update_stream(release):
    first, _ = two_task_graph(release=RELEASES[release])
    second, _ = two_task_graph(release=RELEASES[release])
    second.name = "graph bs=4"
    inside = OtherThreadInside({"lengths": [3]}, lambda: second.update(cpu_update_input=[{"lengths": [5]}]))
    first.update(cpu_update_input=[inside, {"lengths": [3]}])
    expected = [] if not RELEASES[release].shared_update_stream else [
        f"graph bs=4: update() began while graph bs=2's update() was still open on the same update stream "
        f"(torch_npu {release} has one for every graph of the process): their graph_task_update_begin/end brackets "
        "interleave and one graph's task group takes the other's arguments; update graphs one at a time"]
    assert inside.errors == expected


# Release lines (graphs/releases.py)


@pytest.mark.parametrize("release", RECORD_DEFAULT)
def test_a_too_long_or_too_short_update_raises_only_where_the_release_checks_its_length(release):
    g, _ = two_task_graph(release=RELEASES[release])
    update = [{"lengths": [1]}] * 3
    if RELEASES[release].update_length_checked:
        with pytest.raises(RuntimeError, match=r"^Currently, there are 2 operators that need to be updated by capture, and "
                                               r"there are only 3 elements in the incoming cpu_update_input list$"):
            g.update(cpu_update_input=update)
    else:
        g.update(cpu_update_input=update)  # zipped: the third is dropped
        replayed(g)


@pytest.mark.parametrize("release", [name for name in RECORD_DEFAULT if not RELEASES[name].update_length_checked])
def test_a_too_short_update_on_a_zipping_release_leaves_a_task_group_that_would_wait_forever(release):
    g, _ = three_task_graph(RELEASES[release])
    g.update(cpu_update_input=[{"lengths": [1]}, {"lengths": [1]}])
    with pytest.raises(ReplayHang, match=rf"^graph bs=2: replayed with task group 3 of 3 left out of the last update\(\) "
                                         rf"\(torch_npu {release} zips .*would wait forever$"):
        g.replay()


def three_task_graph(release):
    x = torch.ones(2)

    def step():
        y = x
        for _ in range(3):
            y = torch.ops.simtest.scaled_by_lengths(y, lengths=[1])
        return y

    return capture(step, release=release)


@pytest.mark.parametrize("release", RECORD_DEFAULT)
def test_a_key_not_passed_at_capture_is_inserted_before_7_3_and_ignored_from_it(release):
    g, out = two_task_graph(release=RELEASES[release])
    g.update(cpu_update_input=[{"lengths": [2], "bias": 100.0}])
    replayed(g)
    assert out.tolist() == ([4.0, 4.0] if RELEASES[release].captured_keys_only else [304.0, 304.0])


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("op", ["fia", "fia_v2"])
@pytest.mark.parametrize("overload", ["default", "out"])
def test_a_call_is_a_task_group_only_where_the_release_intercepts_its_name(release, op, overload):
    x, buffer = torch.ones(2), torch.empty(2)
    call = getattr(torch.ops.simtest, op)
    if overload == "out":
        g, _ = capture(lambda: call.out(x, lengths=[1], out=buffer), release=RELEASES[release])
    else:
        g, _ = capture(lambda: call(x, lengths=[1]), release=RELEASES[release])
    name = f"{FIA if op == 'fia' else FIA_V2}.{overload}"
    assert g.num_task_groups == int(RELEASES[release].intercepts(name))


def test_fia_default_is_intercepted_from_7_2_and_fia_v2_from_7_3():
    default = {name: r.intercepts(f"{FIA}.default") for name, r in RELEASES.items()}
    assert default == {"7.1": False, "7.2": True, "7.3": True, "26.0": True, "26.1": True}
    assert {name: r.fia_v2 for name, r in RELEASES.items()} == {"7.1": False, "7.2": False, "7.3": True, "26.0": True,
                                                                 "26.1": True}


# 7. Lifecycle


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


def test_the_pool_names_the_graph_whose_replay_last_wrote_an_output():
    pool = graph_pool_handle()
    x = torch.ones(4)
    decode, decode_out = capture(lambda: x * 2, pool=pool, name="graph bs=4")
    prefill, prefill_out = capture(lambda: x[:2] * 3, pool=pool, name="prefill graph tokens=2")
    decode.replay()
    held = decode_out[2:]  # beyond the prefill graph's output: only ever written by the decode graph
    prefill.replay()  # silently overwrites decode_out[:2], as on the device
    assert (pool.last_writer(decode_out), pool.last_writer(decode_out[:2]), pool.last_writer(held)) == (
        "prefill graph tokens=2", "prefill graph tokens=2", "graph bs=4")
    decode.replay()
    assert (pool.last_writer(prefill_out), pool.last_writer(decode_out.clone())) == ("graph bs=4", None)
