"""Architecture registry: config.json's `architectures[0]` -> model class.

A model class takes `(config: ModelConfig, parallel: ParallelState, max_positions: int | None)`, has
`forward(forward_batch, attn_backend) -> logits` and a `stacked_params_mapping` (checkpoint name part,
fused parameter name part, shard id: a part index, `(expert, part)` for MoE experts, None for a plain
rename) for the loader. Add an architecture with `register_model` below, so that importing this
package registers it.
"""
from __future__ import annotations

from torch import nn

from reference_runner.errors import UnsupportedModel
from reference_runner.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from reference_runner.models.mixtral import MixtralForCausalLM
from reference_runner.models.qwen2_moe import Qwen2MoeForCausalLM
from reference_runner.models.qwen3 import Qwen3ForCausalLM
from reference_runner.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(architecture: str, cls: type[nn.Module]) -> None:
    """Serve checkpoints whose config.json names `architecture` with `cls`."""
    MODEL_REGISTRY[architecture] = cls


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class for `architecture`, or `UnsupportedModel` listing the supported ones."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise UnsupportedModel(f"architecture {architecture!r} is not supported; supported: {supported}") from None


register_model("LlamaForCausalLM", LlamaForCausalLM)
register_model("Qwen2ForCausalLM", Qwen2ForCausalLM)
register_model("Qwen2MoeForCausalLM", Qwen2MoeForCausalLM)
register_model("MixtralForCausalLM", MixtralForCausalLM)
register_model("Qwen3ForCausalLM", Qwen3ForCausalLM)
register_model("Qwen3MoeForCausalLM", Qwen3MoeForCausalLM)
