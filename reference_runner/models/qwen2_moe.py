"""Qwen2-MoE (Qwen1.5-MoE): the Qwen2 decoder with sparse MoE feed-forward blocks and a shared expert.

Qwen3-MoE (`qwen3_moe.py`) reuses its layer placement and checkpoint layout."""
from __future__ import annotations

from torch import nn

from reference_runner.models.config import ModelConfig
from reference_runner.models.llama import LlamaDecoderLayer, LlamaMLP, Qwen2ForCausalLM
from reference_runner.models.moe import SparseMoeBlock, expert_params_mapping
from reference_runner.parallel.state import ParallelState


def num_experts(config: ModelConfig) -> int:
    """Experts per sparse layer; transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`. Neither
    field is a KeyError naming `num_experts` (the loader reports it as missing)."""
    hf = config.hf
    return hf["num_local_experts"] if "num_experts" not in hf and "num_local_experts" in hf else hf["num_experts"]


def expert_params(config: ModelConfig, dense_mapping: list[tuple]) -> list[tuple]:
    """The loader mapping of a Qwen MoE model: per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj`, then
    `dense_mapping`. Expert entries come first: the dense `.gate_proj.` entry would match expert tensors too."""
    return [*expert_params_mapping(".mlp", num_experts(config), "gate_proj", "up_proj", "down_proj"),
            *dense_mapping]


def is_sparse(config: ModelConfig, layer_id: int) -> bool:
    """As transformers: a dense MLP on `mlp_only_layers` and between every `decoder_sparse_step`-th layer."""
    hf = config.hf
    return (num_experts(config) > 0 and layer_id not in hf.get("mlp_only_layers", [])
            and (layer_id + 1) % hf.get("decoder_sparse_step", 1) == 0)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_id: int, parallel: ParallelState) -> nn.Module:
        hf = config.hf
        if not is_sparse(config, layer_id):
            return LlamaMLP(config, parallel)
        moe_index = sum(is_sparse(config, i) for i in range(layer_id))
        return SparseMoeBlock(config, parallel, moe_index=moe_index, num_experts=num_experts(config),
                              top_k=hf["num_experts_per_tok"],
                              intermediate_size=hf["moe_intermediate_size"],
                              renormalize=hf.get("norm_topk_prob", False),
                              shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0))


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, max_positions: int | None = None):
        super().__init__(config, parallel, max_positions)
        self.stacked_params_mapping = expert_params(config, Qwen2ForCausalLM.stacked_params_mapping)
