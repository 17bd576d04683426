"""Checkpoints built locally and never downloaded: deterministic tiny ones, and real trained ones.

A builtin name (`llama`, `qwen2`, `qwen2_moe`, `mixtral`, `llama_kv1`, `qwen3`, `qwen3_moe`) is built
from its small config (`builtin_models.py`) with seeded weights and saved with `save_pretrained`. A real model's name
(`smollm2`) is converted from the GGUF file an installed package ships (`real_models.py`). Any local
checkpoint directory works the same way. Builds are cached under `<cache_dir>/<name>-<recipe hash>`:
built in a staging directory (removed on any exit; a dead process's by the next build), given a manifest
(hashes of config.json and of each weights file, every tensor's name, dtype and shape), then published
with an atomic rename, so ranks and processes that race on the same checkpoint all end up reading one
complete directory. Every reuse checks the entry against its manifest, and an entry that does not match
(a truncated file, an edit) is replaced by a fresh build; an entry that matched is not hashed again while its
files keep their stat (`validation.py`). Transformers is imported only to build a model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from harness.inputs import real_models, validation
from harness.inputs.builtin_models import BUILTIN_MODELS, not_a_model
from harness.scratch import make_scratch, scratch
from reference_runner.errors import CheckpointError
from reference_runner.models.loader import weight_files

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CACHE_ENV = "NPUGRAPH_CACHE"
MANIFEST = "manifest.json"
CACHE_FORMAT = 3  # part of the recipe hash: entries of older recipes (before manifests; hashing transformers' whole
# config) live under other names
SEED = 0
INIT_STD = 0.25  # every linear layer, bias and router
VOCAB_INIT_STD = 0.5  # embedding and LM head
NORM_WEIGHT_STD = 0.1  # norm weights are 1 + N(0, this)


def tiny_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The small config of builtin model `name`, with `overrides` applied to its fields."""
    import transformers

    if name not in BUILTIN_MODELS:
        raise CheckpointError(f"unknown model {name!r}; builtin models: {', '.join(BUILTIN_MODELS)}")
    config_class, fields = BUILTIN_MODELS[name]
    return getattr(transformers, config_class)(**{**fields, **overrides})


def default_cache_dir() -> Path:
    """`$NPUGRAPH_CACHE` (empty means unset), else `~/.cache/npugraph-harness`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "npugraph-harness")


def ensure_checkpoint(name_or_path: str | Path, cache_dir: Path | None = None, **overrides: Any) -> Path:
    """The directory of a usable checkpoint: a builtin or real model's name is built (or reused once its manifest
    matches), a directory is checked for config.json and the weights files transformers reads (`loader.weight_files`).

    A `str` equal to a model's name means that model; a `Path`, or any other string, means a directory.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return _build_cached(name_or_path, cache_dir or default_cache_dir(), overrides)
    if overrides:
        raise CheckpointError(f"config overrides apply to builtin models only, not to {name_or_path!r}")
    if isinstance(name_or_path, str) and name_or_path in real_models.REAL_MODELS:
        return _convert_cached(name_or_path, cache_dir or default_cache_dir())
    path = Path(name_or_path)
    if not path.is_dir():
        raise CheckpointError(not_a_model(str(name_or_path)))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint directory {path} lacks config.json")
    weight_files(path)
    return path


def manifest(path: Path) -> dict[str, Any]:
    """What a cache entry holds: the hash of its config.json and, per weights file, its size, hash and tensors
    (name: dtype and shape)."""
    files = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors = {name: [f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()] for name in f.keys()}  # noqa: SIM118
        files[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file), "tensors": tensors}
    return {"config_sha256": _sha256(path / "config.json"), "files": files}


def fingerprint(path: Path) -> str:
    """A short hash that changes when the checkpoint at `path` does: its manifest where it has one (a cache entry,
    checked against its files whenever it is used), else its config.json and each weights file's name, size and
    modification time (the weights are not read: a real checkpoint may hold hundreds of GB)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        identity = (path / MANIFEST).read_bytes()
    else:
        files = sorted({*weight_files(path).values()})
        identity = (path / "config.json").read_bytes() + json.dumps(
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()
    return hashlib.sha256(identity).hexdigest()[:16]


def entry_problem(entry: Path) -> str | None:
    """Why cache entry `entry` cannot be used (missing, no manifest, not matching it), or None if it can. An entry
    that matched its manifest is not hashed again while its files keep their stat (`validation`)."""
    if not entry.is_dir():
        return "is missing"
    if validation.passed(entry, validation.MANIFEST_MATCHED, entry.parent):
        return None
    try:
        stored = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"has no readable {MANIFEST}"
    try:
        stat_ns, files = time.time_ns(), validation.signature(entry)
        current = manifest(entry)
    except (OSError, SafetensorError) as e:
        return f"is unreadable ({e})"
    if current != stored:
        return f"does not match its {MANIFEST}"
    validation.record(entry, validation.MANIFEST_MATCHED, files, stat_ns, entry.parent)
    return None


def _build_cached(name: str, cache_dir: Path, overrides: dict[str, Any]) -> Path:
    return _publish(name, cache_dir / f"{name}-{_fingerprint(name, overrides)}",
                    lambda staging: build_model(tiny_config(name, **overrides)).save_pretrained(staging,
                                                                                                safe_serialization=True))


def _convert_cached(name: str, cache_dir: Path) -> Path:
    gguf, sha256 = real_models.gguf_file(name)
    recipe = {"gguf": real_models.REAL_MODELS[name].file, "sha256": sha256, "converter": real_models.CONVERTER_VERSION}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return _publish(name, cache_dir / f"{name}-{digest}", lambda staging: real_models.convert_gguf(gguf, staging))


def _publish(name: str, target: Path, write: Callable[[Path], None]) -> Path:
    """`target`, reused if it matches its manifest, else written by `write(staging directory)` and published."""
    problem = entry_problem(target)
    if problem is None:
        return target
    cache_dir = target.parent
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():
            print(f"npugraph-harness: cached checkpoint {target} {problem}: rebuilding it", file=sys.stderr)
            _discard(target, cache_dir)
        with scratch(cache_dir, f".{target.name}.") as staging:
            write(staging)
            (staging / MANIFEST).write_text(json.dumps(manifest(staging), indent=1))
            try:
                os.rename(staging, target)  # atomic; fails if another process published first
            except OSError:
                if entry_problem(target) is not None:
                    raise
    except OSError as e:
        raise CheckpointError(f"{_describe(cache_dir)}: cannot build {name!r} there ({type(e).__name__}: {e})") from None
    return target


def _discard(entry: Path, cache_dir: Path) -> None:
    # Moved aside first (atomic), so that no reader ever sees a half-deleted entry under its name.
    trash = make_scratch(cache_dir, f".{entry.name}.")
    with contextlib.suppress(FileNotFoundError):  # another process discarded it first
        os.rename(entry, trash)  # onto the empty scratch directory
    shutil.rmtree(trash, ignore_errors=True)


def _describe(cache_dir: Path) -> str:
    """The cache as the user set it: naming NPUGRAPH_CACHE when it comes from there."""
    from_env = os.environ.get(CACHE_ENV)
    return f"{CACHE_ENV}={from_env}" if from_env and Path(from_env) == cache_dir else f"checkpoint cache {cache_dir}"


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _fingerprint(name: str, overrides: dict[str, Any]) -> str:
    """Short hash of everything that decides builtin model `name`'s weights: its config and the initialisation."""
    config_class, fields = BUILTIN_MODELS[name]
    recipe = {
        "format": CACHE_FORMAT,
        "config_class": config_class,
        "config": {**fields, **overrides},
        "seed": SEED,
        "init_std": INIT_STD,
        "vocab_init_std": VOCAB_INIT_STD,
        "norm_weight_std": NORM_WEIGHT_STD,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def build_model(config: PretrainedConfig) -> torch.nn.Module:
    """A float32 CPU model for `config` with seeded weights that make greedy decoding decisive.

    HF's init (std 0.02) leaves a tiny model with near-uniform logits: at two thirds of greedy steps
    the top-2 margin is below 0.05, so a correct engine would part from the oracle by float noise
    alone and every comparison would end in a tie; generations also collapse into repeated tokens.
    Linear weights at std 0.25 and embedding/LM head at std 0.5 give logits with std of a few units:
    measured over 8 prompts x 64 greedy steps per builtin model, the median margin is about 0.9,
    3-4% of steps are below 0.05 (at most 1% below 0.01), generations keep 49+ distinct tokens
    out of 64, and editing the first of 40 prompt tokens changes the output within a few steps
    (distant context matters, so KV-cache bugs show). A smaller linear std lets tied embeddings
    (qwen2) echo the input token forever. Biases and norm weights are random rather than 0 and 1,
    so a loader that drops them is caught.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + NORM_WEIGHT_STD * torch.randn_like(param))
        elif "embed_tokens" in name or "lm_head" in name:
            param.normal_(0.0, VOCAB_INIT_STD)
        else:
            param.normal_(0.0, INIT_STD)
    return model.eval()
