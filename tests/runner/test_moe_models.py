"""MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral): routing as transformers does it (ties included), both checkpoint
layouts, TP shards, layer kinds."""
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from harness.inputs.checkpoints import ensure_checkpoint, tiny_config
from harness.inputs.oracle import oracle_generate
from harness.inputs.workloads import make_requests
from harness.verdicts.compare import compare_generations
from harness.verdicts.tolerances import Tolerance
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.errors import CheckpointError, UnsupportedModel
from reference_runner.models.loader import load_model
from reference_runner.models.moe import select_experts
from reference_runner.parallel.state import ParallelState

# --- routing -------------------------------------------------------------------------------------

ROUTERS = {  # name -> (transformers router, its config for 4 experts and top_k, renormalize)
    "qwen2_moe": (Qwen2MoeTopKRouter, lambda k: Qwen2MoeConfig(hidden_size=4, num_experts=4, num_experts_per_tok=k,
                                                                norm_topk_prob=False), False),
    "qwen2_moe-norm_topk_prob": (Qwen2MoeTopKRouter, lambda k: Qwen2MoeConfig(
        hidden_size=4, num_experts=4, num_experts_per_tok=k, norm_topk_prob=True), True),
    "qwen3_moe": (Qwen3MoeTopKRouter, lambda k: Qwen3MoeConfig(hidden_size=4, num_experts=4, num_experts_per_tok=k,
                                                                norm_topk_prob=True), True),
    "qwen3_moe-no-norm_topk_prob": (Qwen3MoeTopKRouter, lambda k: Qwen3MoeConfig(
        hidden_size=4, num_experts=4, num_experts_per_tok=k, norm_topk_prob=False), False),
    "mixtral": (MixtralTopKRouter, lambda k: MixtralConfig(hidden_size=4, num_local_experts=4,
                                                           num_experts_per_tok=k), True),
}
TIES = {
    "tie-at-the-kth-place": [3.0, 1.0, 1.0, 0.0],
    "all-equal": [1.0, 1.0, 1.0, 1.0],
    # Distinct logits whose probabilities round to the same float32: a tie only after the softmax.
    "tie-made-by-the-softmax": [1e-8, 0.0, -1.0, -2.0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("router", ROUTERS)
def test_top_k_ties_break_as_in_transformers(router, tie, top_k, dtype):
    router_cls, make_config, renormalize = ROUTERS[router]
    hf_router = router_cls(make_config(top_k)).to(dtype)
    with torch.no_grad():
        hf_router.weight.copy_(torch.eye(4))  # router logits = the hidden states, exactly
    logits = torch.tensor([TIES[tie]], dtype=dtype)
    _, hf_weights, hf_ids = hf_router(logits)
    weights, ids = select_experts(logits, top_k, renormalize)
    assert torch.equal(ids, hf_ids)
    assert torch.equal(weights.to(hf_weights.dtype), hf_weights)


def test_the_softmax_tie_is_not_a_tie_of_the_logits():
    # What makes the case above worth having: topk on the logits would pick another expert.
    logits = torch.tensor([TIES["tie-made-by-the-softmax"]])
    probs = torch.softmax(logits, dim=-1)
    assert probs[0, 0] == probs[0, 1] and logits[0, 0] != logits[0, 1]
    assert not torch.equal(select_experts(logits, 1, False)[1], logits.topk(1).indices)


# --- loading -------------------------------------------------------------------------------------

# An expert intermediate size unlike the hidden size (64), so that a transposed expert tensor cannot load.
NARROW_EXPERTS = {"qwen2_moe": {"moe_intermediate_size": 32}, "qwen3_moe": {"moe_intermediate_size": 32},
                  "mixtral": {"intermediate_size": 32}}


@pytest.fixture(scope="module", params=NARROW_EXPERTS)
def checkpoints(request, tmp_path_factory):
    """(per-expert layout, fused layout): transformers writes its in-memory fused layout
    (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) with `save_original_format=False`."""
    name = request.param
    legacy = ensure_checkpoint(name, **NARROW_EXPERTS[name])
    fused = tmp_path_factory.mktemp(f"{name}-fused")
    AutoModelForCausalLM.from_pretrained(legacy).save_pretrained(fused, save_original_format=False)
    return legacy, fused


def load(path, tp_rank=0, tp_size=1):
    return load_model(path, device="cpu", dtype=torch.float32, parallel=ParallelState(tp_rank=tp_rank, tp_size=tp_size))


def test_fused_checkpoint_layout_loads_the_same_weights(checkpoints):
    legacy, fused = checkpoints
    expected = load(legacy).state_dict()
    got = load(fused).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_each_tp_rank_loads_its_slice_of_every_experts_intermediate_dim(checkpoints, layout, rank):
    legacy, fused = checkpoints
    full = load(legacy).model.layers[1].mlp.experts
    shard = load(legacy if layout == "legacy" else fused, tp_rank=rank, tp_size=2).model.layers[1].mlp.experts
    size = full.intermediate_size // 2
    gate, up = full.gate_up_proj.chunk(2, dim=1)
    rows = slice(rank * size, (rank + 1) * size)
    assert torch.equal(shard.gate_up_proj, torch.cat([gate[:, rows], up[:, rows]], dim=1))
    assert torch.equal(shard.down_proj, full.down_proj[:, :, rows])


def test_a_missing_expert_tensor_is_named(tmp_path):
    path = shutil.copytree(ensure_checkpoint("mixtral"), tmp_path / "mixtral")
    (weights,) = path.glob("*.safetensors")
    missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    tensors = load_file(weights)
    del tensors[missing]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) {re.escape(missing)}$"):
        load(path)


# --- Qwen MoE layer kinds, Mixtral's sliding window ----------------------------------------------

VARIANTS = {  # name -> (overrides of a model's tiny config, the kind of each layer's MLP)
    "mlp_only_layers": (lambda config: {"mlp_only_layers": [0]}, ["LlamaMLP", "SparseMoeBlock"]),
    "decoder_sparse_step": (lambda config: {"decoder_sparse_step": 2}, ["LlamaMLP", "SparseMoeBlock"]),
    "norm_topk_prob-flipped": (lambda config: {"norm_topk_prob": not config.norm_topk_prob},
                               ["SparseMoeBlock", "SparseMoeBlock"]),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", ["qwen2_moe", "qwen3_moe"])
def test_qwen_moe_variants_match_the_oracle(model, variant):
    overrides, layer_kinds = VARIANTS[variant]
    checkpoint = ensure_checkpoint(model, **overrides(tiny_config(model)))
    engine = Engine(checkpoint, EngineArgs(max_context=128))
    assert [type(layer.mlp).__name__ for layer in engine.model_runner.model.model.layers] == layer_kinds
    requests = make_requests("mixed", 512, 16)[:4]
    verdicts = compare_generations(oracle_generate(checkpoint, requests), engine.generate(requests),
                                   Tolerance.for_pair(torch.float32, "cpu", across_kernels=True))
    assert [v.status for v in verdicts] == ["match"] * 4


def test_mixtral_sliding_window_shorter_than_the_context_is_refused():
    checkpoint = ensure_checkpoint("mixtral", sliding_window=64)
    with pytest.raises(UnsupportedModel, match="sliding_window 64 is shorter than the context"):
        Engine(checkpoint, EngineArgs(max_context=128))
    Engine(checkpoint, EngineArgs(max_context=64))  # a window covering the whole context changes nothing
