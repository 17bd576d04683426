"""Llama-family dense decoder (Llama, Qwen2) over the paged KV cache.

Fused qkv and gate_up projections: the decode step is captured op by op and replayed, so fewer,
larger ops make a faster graph. The DECODE forward is capture-safe: it reads only the ForwardBatch's
tensors and hands `seq_lens_cpu` straight to the attention op; no host syncs, no data-dependent
shapes or branches, no tensor creation.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from reference_runner.engine.forward_batch import ForwardBatch, ForwardMode
from reference_runner.graphs.markers import layer_boundary
from reference_runner.models.config import ModelConfig
from reference_runner.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_rotary,
)
from reference_runner.parallel.state import ParallelState, divide, kv_heads_per_rank


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, parallel: ParallelState):
        super().__init__()
        tp = parallel.tp_size
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_kv_heads = kv_heads_per_rank(config.num_key_value_heads, tp)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, config.qkv_bias, parallel)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        config.o_proj_bias, parallel)

    def rotate_qk(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE over the query and key heads side by side, [T, heads + kv_heads, head_dim]."""
        return apply_rotary(qk, cos, sin, self.head_dim)

    def forward(self, x, cos, sin, forward_batch, attn_backend):
        qkv = self.qkv_proj(x).unflatten(-1, (-1, self.head_dim))
        # q and k sit side by side in qkv: rotate them in one go.
        qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = self.rotate_qk(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        out = attn_backend.forward(q, k, v, self.layer_id, forward_batch)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], config.mlp_bias, parallel)
        self.down_proj = RowParallelLinear(size, config.hidden_size, config.mlp_bias, parallel)

    def forward(self, x: torch.Tensor, forward_batch: ForwardBatch | None = None) -> torch.Tensor:
        """`forward_batch` is unused: a decoder layer hands it to its feed-forward, which MoE blocks route with."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention

    def __init__(self, config: ModelConfig, layer_id: int, parallel: ParallelState):
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, parallel)
        self.mlp = self.make_mlp(config, layer_id, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config: ModelConfig, layer_id: int, parallel: ParallelState) -> nn.Module:
        """The feed-forward block of layer `layer_id`; MoE decoders override it."""
        return LlamaMLP(config, parallel)

    def forward(self, x, residual, cos, sin, forward_batch, attn_backend):
        # Residual adds are fused into the norms (SGLang style): each layer returns (x, residual).
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, forward_batch, attn_backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, forward_batch), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, max_positions: int,
                 layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        self.rotary_emb = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(
            layer_cls(config, i, parallel) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama decoder + LM head; `forward` returns float32 logits of each request's last token."""

    # checkpoint name part -> (fused parameter name part, shard id)
    stacked_params_mapping: ClassVar[list[tuple[str, str, int]]] = [
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    ]
    layer_cls: ClassVar[type[LlamaDecoderLayer]] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, max_positions: int | None = None):
        super().__init__()
        parallel = parallel or ParallelState()
        self.config = config
        self.model = LlamaModel(config, parallel, max_positions or config.max_position_embeddings, self.layer_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, forward_batch: ForwardBatch, attn_backend) -> torch.Tensor:
        """DECODE: logits [bs, vocab]; EXTEND: logits of each request's last prompt token [bs, vocab]."""
        model = self.model
        x = model.embed_tokens(forward_batch.input_ids)
        cos, sin = model.rotary_emb(forward_batch.positions)
        residual = None
        for layer in model.layers:
            x, residual = layer(layer_boundary(x), residual, cos, sin, forward_batch, attn_backend)
        x = layer_boundary(x)
        if forward_batch.forward_mode is ForwardMode.EXTEND:
            # Extend is eager only, so building the index from the host lengths here is fine.
            last = torch.tensor(forward_batch.extend_seq_lens, device=x.device).cumsum(0) - 1
            x, residual = x.index_select(0, last), residual.index_select(0, last)
        x, _ = model.norm(x, residual)
        return self.lm_head(x)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on q, k and v (never on o_proj)."""

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, max_positions: int | None = None):
        super().__init__(dataclasses.replace(config, qkv_bias=True, o_proj_bias=False), parallel, max_positions)
