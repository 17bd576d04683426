"""Load a model from a local Hugging Face checkpoint directory (config.json + *.safetensors).

Each tensor is handed to its parameter's `weight_loader` as a lazy safetensors slice, so under
tensor parallelism a rank reads only its shard. Fused parameters (qkv, gate_up, stacked experts) are
filled part by part through the model's `stacked_params_mapping`, or whole from a checkpoint that
stores them fused (MoE experts as transformers 5 keeps them: `experts.gate_up_proj`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from reference_runner.errors import CheckpointError
from reference_runner.models import get_model_class
from reference_runner.models.config import ModelConfig
from reference_runner.models.layers import default_weight_loader
from reference_runner.parallel.state import ParallelState

# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(path: str | Path) -> ModelConfig:
    """Parse `path/config.json`; an unknown architecture raises `UnsupportedModel`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: {file.name} not found ({file})")
    try:
        hf = json.loads(file.read_text())
        architecture = hf["architectures"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{file}: not a usable Hugging Face config ({type(e).__name__}: {e})") from None
    get_model_class(architecture)  # unknown architectures fail before their fields are read
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{file}: missing field {e}") from None


def load_model(path: str | Path, *, device: str | torch.device, dtype: torch.dtype,
               parallel: ParallelState | None = None, max_positions: int | None = None) -> nn.Module:
    """Build the checkpoint's model on `device` in `dtype` (this rank's shard under TP) and load its weights."""
    path = Path(path)
    config = read_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path}: no *.safetensors file")
    with torch.device(device), _default_dtype(dtype):
        model = get_model_class(config.architecture)(config, parallel or ParallelState(), max_positions)
    load_weights(model, files)
    return model.eval()


def load_weights(model: nn.Module, files: list[Path]) -> None:
    """Fill every parameter of `model` from `files`; a missing, unexpected or misshapen tensor raises."""
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding and is not listed
    mapping = getattr(model, "stacked_params_mapping", [])
    loaded = set()
    whole = set()  # parameters filled by one tensor (e.g. fused experts): their per-part names are not needed
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and "lm_head.weight" not in params):
                    continue
                target, shard_id = _fused_name(name, mapping)
                if target not in params:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} (no parameter {target!r} in the model)")
                param = params[target]
                loader = getattr(param, "weight_loader", default_weight_loader)
                args = () if shard_id is None else (shard_id,)
                try:
                    loader(param, f.get_slice(name), *args)
                except ValueError as e:
                    raise CheckpointError(f"{file}: tensor {name!r} {e}") from None
                loaded.add(name)
                if shard_id is None:
                    whole.add(target)
    missing = sorted(name for name in _checkpoint_names(params, mapping) - loaded
                     if _fused_name(name, mapping)[0] not in whole)
    if missing:
        raise CheckpointError(f"checkpoint {files[0].parent}: missing tensor(s) {', '.join(missing)}")


def _fused_name(name: str, mapping) -> tuple[str, int | None]:
    for part, fused, shard_id in mapping:
        if part in name:
            return name.replace(part, fused), shard_id
    return name, None


def _checkpoint_names(params: dict, mapping) -> set[str]:
    # The checkpoint tensors that must be present: fused parameters expand back to their parts.
    names = set()
    for name in params:
        parts = [name.replace(fused, part) for part, fused, _ in mapping if fused in name]
        names.update(parts or [name])
    return names


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
