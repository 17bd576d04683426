"""Mixtral: the Llama decoder with a sparse MoE block (softmax top-k, renormalised) in every layer."""
from __future__ import annotations

from torch import nn

from reference_runner.errors import UnsupportedModel
from reference_runner.models.config import ModelConfig
from reference_runner.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from reference_runner.models.moe import SparseMoeBlock, expert_params_mapping
from reference_runner.parallel.state import ParallelState


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_id: int, parallel: ParallelState) -> nn.Module:
        hf = config.hf
        return SparseMoeBlock(config, parallel, moe_index=layer_id, num_experts=hf["num_local_experts"],
                              top_k=hf["num_experts_per_tok"],
                              intermediate_size=config.intermediate_size, renormalize=True)


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, max_positions: int | None = None):
        window = config.hf.get("sliding_window")
        positions = max_positions or config.max_position_embeddings
        if window is not None and window < positions:
            raise UnsupportedModel(f"sliding_window {window} is shorter than the context ({positions} positions): "
                                   "sliding-window attention is not supported")
        super().__init__(config, parallel, max_positions)
        # Checkpoints written by transformers name the block `block_sparse_moe` and the experts'
        # projections w1 (gate), w3 (up), w2 (down); the model (like transformers 5 in memory) says `mlp`.
        self.stacked_params_mapping = [
            (".block_sparse_moe.gate.", ".mlp.gate.", None),
            *expert_params_mapping(".block_sparse_moe", config.hf["num_local_experts"], "w1", "w3", "w2"),
            *LlamaForCausalLM.stacked_params_mapping,
        ]
