"""Qwen3-MoE: Qwen3's attention (q/k norm per head) with Qwen2-MoE's sparse blocks, minus the shared expert.

Routing as transformers' `Qwen3MoeTopKRouter`: softmax in float32, top-k, renormalised when
`norm_topk_prob`, and the weights cast to the model dtype before they scale the experts' outputs
(`models/moe.py`). `mlp_only_layers` and `decoder_sparse_step` place dense MLPs as in Qwen2-MoE.
"""
from __future__ import annotations

from reference_runner.models.config import ModelConfig
from reference_runner.models.qwen2_moe import Qwen2MoeDecoderLayer, expert_params
from reference_runner.models.qwen3 import Qwen3Attention, Qwen3ForCausalLM
from reference_runner.parallel.state import ParallelState


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, max_positions: int | None = None):
        super().__init__(config, parallel, max_positions)
        self.stacked_params_mapping = expert_params(config, Qwen3ForCausalLM.stacked_params_mapping)
