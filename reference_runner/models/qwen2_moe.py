"""Qwen2-MoE (Qwen1.5-MoE): the Qwen2 decoder with sparse MoE feed-forward blocks and a shared expert."""
from __future__ import annotations

from torch import nn

from reference_runner.models.config import ModelConfig
from reference_runner.models.llama import LlamaDecoderLayer, LlamaMLP, Qwen2ForCausalLM
from reference_runner.models.moe import SparseMoeBlock, expert_params_mapping
from reference_runner.parallel.state import ParallelState


def is_sparse(hf: dict, layer_id: int) -> bool:
    """As transformers: a dense MLP on `mlp_only_layers` and between every `decoder_sparse_step`-th layer."""
    return (hf["num_experts"] > 0 and layer_id not in hf.get("mlp_only_layers", [])
            and (layer_id + 1) % hf.get("decoder_sparse_step", 1) == 0)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_id: int, parallel: ParallelState) -> nn.Module:
        hf = config.hf
        if not is_sparse(hf, layer_id):
            return LlamaMLP(config, parallel)
        moe_index = sum(is_sparse(hf, i) for i in range(layer_id))
        return SparseMoeBlock(config, parallel, moe_index=moe_index, num_experts=hf["num_experts"],
                              top_k=hf["num_experts_per_tok"],
                              intermediate_size=hf["moe_intermediate_size"],
                              renormalize=hf.get("norm_topk_prob", False),
                              shared_expert_intermediate_size=hf["shared_expert_intermediate_size"])


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, max_positions: int | None = None):
        super().__init__(config, parallel, max_positions)
        # Expert entries first: the dense `.gate_proj.` entry would match expert tensors too.
        self.stacked_params_mapping = [
            *expert_params_mapping(".mlp", config.hf["num_experts"], "gate_proj", "up_proj", "down_proj"),
            *Qwen2ForCausalLM.stacked_params_mapping,
        ]
