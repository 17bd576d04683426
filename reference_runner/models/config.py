"""Model hyper-parameters read from a Hugging Face config.json, whatever transformers version wrote it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reference_runner.errors import CheckpointError, UnsupportedModel


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
        """Parse a config.json dict: a missing or malformed field raises `CheckpointError` naming it, a
        feature this runner does not implement `UnsupportedModel`."""
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise UnsupportedModel("sliding-window attention (use_sliding_window=true) is not supported")
        hidden, heads = _count(hf, "hidden_size"), _count(hf, "num_attention_heads")
        kv_heads = _count(hf, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise CheckpointError(f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
        if hf.get("head_dim") is None and hidden % heads:
            raise CheckpointError(f"num_attention_heads {heads} does not divide hidden_size {hidden} (and no head_dim given)")
        head_dim = _count(hf, "head_dim", hidden // heads)
        if head_dim % 2:
            raise CheckpointError(f"head_dim {head_dim} is odd: rotary embeddings need an even head_dim")
        theta, scaling = _rope(hf)
        attention_bias = _flag(hf, "attention_bias")
        return cls(
            architecture=hf["architectures"][0],
            vocab_size=_count(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_count(hf, "intermediate_size"),
            num_hidden_layers=_count(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive("rms_norm_eps", _get(hf, "rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_count(hf, "max_position_embeddings", 2048),
            tie_word_embeddings=_flag(hf, "tie_word_embeddings"),
            qkv_bias=attention_bias,
            o_proj_bias=attention_bias,
            mlp_bias=_flag(hf, "mlp_bias"),
            hf=hf,
        )


_REQUIRED = object()


def _get(hf: dict, name: str, default: Any) -> Any:
    value = hf.get(name)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointError(f"missing field {name!r}")
        return default
    return value


def _count(hf: dict, name: str, default: Any = _REQUIRED) -> int:
    """A positive integer field (a JSON string or float such as "512" or 512.0 is refused, not coerced)."""
    value = _get(hf, name, default)
    if type(value) is not int or value < 1:
        raise CheckpointError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    if type(value) not in (int, float) or not 0 < value < math.inf:
        raise CheckpointError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _flag(hf: dict, name: str) -> bool:
    value = _get(hf, name, False)
    if type(value) is not bool:
        raise CheckpointError(f"{name} must be true or false, got {value!r}")
    return value


def _rope(hf: dict) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters` (theta included); 4.x wrote `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = _positive("rope_theta", params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, params
    raise UnsupportedModel(f"rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
