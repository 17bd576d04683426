"""Qwen3: the Llama decoder with an RMSNorm over each head of the query and key, applied before RoPE.

One norm weight of `head_dim` entries is shared by every query head (`q_norm`) and one by every key
head (`k_norm`), as in transformers; q, k and v have no bias unless `attention_bias` says so.
"""
from __future__ import annotations

import torch

from reference_runner.models.config import ModelConfig
from reference_runner.models.layers import RMSNorm
from reference_runner.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from reference_runner.parallel.state import ParallelState


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_id: int, parallel: ParallelState):
        super().__init__(config, layer_id, parallel)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def rotate_qk(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return super().rotate_qk(torch.cat([self.q_norm(q), self.k_norm(k)], dim=1), cos, sin)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
