"""Model hyper-parameters read from a Hugging Face config.json, whatever transformers version wrote it."""
from __future__ import annotations

from dataclasses import dataclass, field

from reference_runner.errors import UnsupportedModel


@dataclass
class ModelConfig:
    """The fields a Llama-family decoder needs; `hf` keeps the whole config.json for the others (MoE, ...)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE, else the llama3 parameters
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    hf: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Parse a config.json dict; features this runner does not implement raise `UnsupportedModel`."""
        heads = hf["num_attention_heads"]
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise UnsupportedModel("sliding-window attention (use_sliding_window=true) is not supported")
        theta, scaling = _rope(hf)
        attention_bias = hf.get("attention_bias", False)
        return cls(
            architecture=hf["architectures"][0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=attention_bias,
            o_proj_bias=attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            hf=hf,
        )


def _rope(hf: dict) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters` (theta included); 4.x wrote `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, params
    raise UnsupportedModel(f"rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
