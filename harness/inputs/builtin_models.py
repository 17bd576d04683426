"""The builtin models: small configs by name, which `checkpoints.py` builds with seeded weights. Read without torch, so
that a check refuses a name that is neither one of them, nor a real model's, nor a directory before importing it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.inputs.real_models import REAL_MODELS

# Every size divides by tp=2 and tp=4: attention heads, KV heads (except llama_kv1, whose single KV
# head is replicated across TP ranks), vocab and all intermediates.
_DENSE: dict[str, Any] = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

# Each model's transformers config class, by name (imported only to build it), and its fields.
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**_DENSE, "tie_word_embeddings": False}),
    "llama_kv1": ("LlamaConfig", {**_DENSE, "num_key_value_heads": 1, "tie_word_embeddings": False}),
    # head_dim 32, the smallest that vLLM's CPU attention takes (the target vllm on CPU hosts). Measured as in
    # build_model: median top-2 margin 1.28, 3.3% of steps below 0.05, 53+ distinct tokens out of 64.
    "llama_hd32": ("LlamaConfig", {**_DENSE, "hidden_size": 128, "head_dim": 32, "intermediate_size": 256,
                                 "tie_word_embeddings": False}),
    # Qwen2 always has q/k/v biases; tied embeddings as in the small Qwen2 checkpoints.
    "qwen2": ("Qwen2Config", {**_DENSE, "tie_word_embeddings": True}),
    # Shaped like Qwen1.5-MoE: shared expert behind a sigmoid gate, top-k weights not renormalised.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_DENSE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 128,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "tie_word_embeddings": False,
        },
    ),
    # Qwen3 and Qwen3-MoE: head_dim 32 (wider than hidden_size / heads, as in the real ones), so that
    # engines whose CPU attention needs head_dim >= 32 run them too. Tied embeddings as the small Qwen3.
    "qwen3": ("Qwen3Config", {**_DENSE, "head_dim": 32, "tie_word_embeddings": True}),
    # Shaped like Qwen3-30B-A3B: no shared expert, top-k weights renormalised.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            **_DENSE,
            "head_dim": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "tie_word_embeddings": False,
        },
    ),
    # Mixtral's experts are sized by `intermediate_size`.
    "mixtral": (
        "MixtralConfig",
        {
            **_DENSE,
            "intermediate_size": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": False,
        },
    ),
}


def names_a_checkpoint(name: str) -> bool:
    """Whether `name` is a builtin or real model's name, or a directory (whose contents `ensure_checkpoint` checks)."""
    return name in BUILTIN_MODELS or name in REAL_MODELS or Path(name).is_dir()


def not_a_model(name: str) -> str:
    """The error for a `name` that names no checkpoint."""
    return f"{name!r} is neither a checkpoint directory nor a builtin model ({', '.join([*BUILTIN_MODELS, *REAL_MODELS])})"
