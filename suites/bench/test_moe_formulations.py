"""Cost of the MoE expert formulations on the same stacked weights, per step shape: the measurement behind
the choice in `reference_runner/models/moe.py`, run on demand (`pytest suites/bench/test_moe_formulations.py`)
and not by `npugraph-harness bench`, whose comparisons gate the engine only.

- dense: the runner's `FusedMoE`, every expert for every token, routing weights masked (static shapes);
- gathered: each (token, slot)'s expert weights gathered, then a batched matmul (transformers'
  `batched_mm`; gpt-fast's `w[expert_indices]`), static shapes;
- grouped: tokens sorted by expert, `torch._grouped_mm` over device-side offsets (transformers'
  `grouped_mm`), static shapes, but no kernel on CPU before torch 2.9 nor on CUDA below SM80;
- loop: transformers' eager loop over the experts hit (`nonzero`): data-dependent, never captured.

Shapes: the builtin tiny checkpoints, and Qwen1.5-MoE's 60 experts top-4 with hidden and
intermediate sizes divided by 4 (same experts-per-token ratio, CPU-sized weights).
"""
import time

import pytest
import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from reference_runner.models.moe import FusedMoE, select_experts
from reference_runner.parallel.state import ParallelState

SHAPES = {  # name -> (experts, top_k, hidden, intermediate)
    "tiny": (4, 2, 64, 64),
    "qwen1.5-moe-div4": (60, 4, 512, 352),
}
SECONDS_PER_BENCHMARK = 0.5  # rounds fill this, between 5 (gathered prefill: ~1 s a round) and 200
STEPS = {"decode-bs1": 1, "decode-bs8": 8, "prefill-64": 64}
TRANSFORMERS = {"gathered": "batched_mm", "grouped": "grouped_mm", "loop": "eager"}


@pytest.fixture(scope="module", params=SHAPES)
def shape(request):
    experts, top_k, hidden, intermediate = SHAPES[request.param]
    moe = FusedMoE(experts, hidden, intermediate, ParallelState())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.gate_up_proj.normal_(0, hidden ** -0.5, generator=g)
        moe.down_proj.normal_(0, intermediate ** -0.5, generator=g)
    return moe, top_k


def formulation(name: str, moe: FusedMoE):
    """`forward(x, weights, ids)` of formulation `name` over the weights of `moe`."""
    if name == "dense":
        return moe
    config = Qwen2MoeConfig(hidden_size=moe.gate_up_proj.shape[2], num_experts=moe.num_experts,
                            moe_intermediate_size=moe.intermediate_size, experts_implementation=TRANSFORMERS[name])
    experts = Qwen2MoeExperts(config)
    experts.gate_up_proj, experts.down_proj = moe.gate_up_proj, moe.down_proj
    return lambda x, weights, ids: experts(x, ids, weights)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("name", ["dense", *TRANSFORMERS])
def test_moe_formulation(benchmark, shape, name, step):
    moe, top_k = shape
    num_tokens, hidden = STEPS[step], moe.gate_up_proj.shape[2]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, hidden, generator=g)
    weights, ids = select_experts(torch.randn(num_tokens, moe.num_experts, generator=g), top_k, renormalize=False)
    forward = formulation(name, moe)
    benchmark.extra_info.update(tokens=num_tokens, experts=moe.num_experts, top_k=top_k)
    with torch.inference_mode():
        start = time.perf_counter()
        forward(x, weights, ids)  # also the warm-up
        rounds = min(200, max(5, int(SECONDS_PER_BENCHMARK / (time.perf_counter() - start))))
        out = benchmark.pedantic(forward, args=(x, weights, ids), rounds=rounds)
        torch.testing.assert_close(out, moe(x, weights, ids), rtol=1e-4, atol=1e-5)
