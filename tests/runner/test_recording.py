"""The typed program a SimNPUGraph capture records: what each op reads and binds, and the replay code."""
import torch

from reference_runner.graphs.updatable import register_updatable_op
from reference_runner.sim.graph import SimNPUGraph, graph
from reference_runner.sim.recording import Kind, Ref


@torch.library.custom_op("rectest::scaled", mutates_args=())
def scaled(x: torch.Tensor, *, lengths: list[int]) -> torch.Tensor:
    return x * sum(lengths)


scaled.register_fake(lambda x, *, lengths: torch.empty_like(x))
register_updatable_op(torch.ops.rectest.scaled, "lengths")


def test_a_capture_records_typed_ops_whose_source_is_the_replay():
    x = torch.ones(2, 2)
    g = SimNPUGraph()
    with graph(g, auto_dispatch_capture=True):
        out = torch.ops.rectest.scaled(x + 1, lengths=[1, 2])
    add, task, copy_out = g.program.ops
    assert [op.source() for op in g.program.ops] == ["v0 = c0(x0, c1)", "v1 = c2(v0, **T0)", "c3(o0, v1)"]
    assert [r.kind for r in add.reads()] == [Kind.CONST, Kind.EXTERNAL, Kind.CONST]
    assert (task.task, task.bound()) == (Ref(Kind.TASK, 0), [Ref(Kind.VALUE, 1)])
    assert g.program.value(task.task) == {"lengths": [1, 2]}  # the host arguments update() replaces
    assert copy_out.bound() == [] and g.program.value(Ref(Kind.OUTPUT, 0)) is out  # the output buffer
