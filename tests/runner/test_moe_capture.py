"""The MoE layer captures into a graph that re-routes on every replay; MoE code whose shapes depend on
the routing is refused at capture, naming the op, as ACL graph capture refuses it on the NPU."""
import re

import pytest
import torch
import torch.nn.functional as F

from reference_runner.models.moe import FusedMoE, select_experts
from reference_runner.parallel.state import ParallelState
from reference_runner.sim.graph import CaptureError, SimNPUGraph, graph

NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, TOKENS = 4, 2, 16, 8, 6


@pytest.fixture
def moe():
    experts = FusedMoE(NUM_EXPERTS, HIDDEN, INTERMEDIATE, ParallelState())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g))
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g))
    return experts


def routed_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    weights, ids = select_experts(torch.randn(TOKENS, NUM_EXPERTS, generator=g), TOP_K, renormalize=True)
    return x, weights, ids


def expert(moe, e, x):
    gate, up = F.linear(x, moe.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, moe.down_proj[e])


# The same experts computed with shapes that depend on the routing: right in eager, not capturable.

def loop_over_nonzero(moe, x, weights, ids):
    """transformers' eager experts: the tokens of each expert found with nonzero."""
    out = torch.zeros_like(x)
    for e in range(NUM_EXPERTS):
        token, slot = (ids == e).nonzero().unbind(-1)
        out.index_add_(0, token, expert(moe, e, x[token]) * weights[token, slot, None])
    return out


def boolean_mask(moe, x, weights, ids):
    """The tokens of each expert selected by a boolean mask."""
    out = torch.zeros_like(x)
    for e in range(NUM_EXPERTS):
        hit = ids == e
        rows = hit.any(dim=-1)
        out[rows] += expert(moe, e, x[rows]) * (weights * hit).sum(dim=-1)[rows, None]
    return out


def routing_on_host(moe, x, weights, ids):
    """Expert ids read back to the host and looped over in Python."""
    out = torch.zeros_like(x)
    for t, experts in enumerate(ids.tolist()):
        for slot, e in enumerate(experts):
            out[t] += expert(moe, e, x[t]) * weights[t, slot]
    return out


def grouped_by_counts(moe, x, weights, ids):
    """Tokens sorted by expert and split by per-expert counts."""
    order = ids.flatten().argsort(stable=True)
    counts = torch.bincount(ids.flatten(), minlength=NUM_EXPERTS)
    out = torch.zeros_like(x)
    for e, positions in enumerate(order.split(counts.tolist())):
        token = positions // TOP_K
        out.index_add_(0, token, expert(moe, e, x[token]) * weights.flatten()[positions, None])
    return out


DATA_DEPENDENT = "has an output shape or value that depends on tensor data"
DYNAMIC = {  # dynamic MoE -> what capture says
    "loop_over_nonzero": (loop_over_nonzero, f"aten.nonzero.default {DATA_DEPENDENT}"),
    "boolean_mask": (boolean_mask, f"aten.index.Tensor {DATA_DEPENDENT}"),
    "routing_on_host": (routing_on_host, "Tensor.tolist() reads a device value on the host during graph capture"),
    "grouped_by_counts": (grouped_by_counts, f"aten.bincount.default {DATA_DEPENDENT}"),
}


@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_dynamic_moe_computes_the_same_experts_in_eager(moe, dynamic):
    x, weights, ids = routed_inputs(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(DYNAMIC[dynamic][0](moe, x, weights, ids), moe(x, weights, ids))


@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_dynamic_moe_is_refused_at_capture_naming_the_op(moe, dynamic):
    forward, message = DYNAMIC[dynamic]
    x, weights, ids = routed_inputs(seed=1)
    with pytest.raises(CaptureError, match=re.escape(message)), graph(SimNPUGraph()):
        forward(moe, x, weights, ids)


def test_static_moe_is_captured_and_routes_anew_on_every_replay(moe):
    static = routed_inputs(seed=1)
    g = SimNPUGraph()
    with graph(g):
        out = moe(*static)
    for seed in (2, 3):
        new = routed_inputs(seed)
        assert not torch.equal(new[2], static[2])  # other experts than at capture
        for buffer, value in zip(static, new):
            buffer.copy_(value)
        g.replay()
        with torch.no_grad():
            torch.testing.assert_close(out, moe(*new), rtol=0, atol=0)
