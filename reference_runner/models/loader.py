"""Load a model from a local Hugging Face checkpoint directory (config.json + safetensors weights).

The weights are read from the files transformers reads: the shards `model.safetensors.index.json`
maps, else `model.safetensors`. Any other `*.safetensors` file in the directory is refused, never
loaded, so that a stray copy (`zz-old.safetensors`) can neither override nor add a tensor. Every
tensor is validated as it loads, at any TP size: one file per name, a floating-point dtype (cast to
the run dtype), its whole shape against the config (before a rank cuts out its shard), and finite
values in the run dtype. `validate_checkpoint` runs all of it on a meta-device model: the whole
checkpoint checked without the memory of its model, once, before any work starts.

One rank's model (tp 1, dp 1) can serve the next engine of the process: an engine done with it hands it back
(`keep_model`), and the next load of the same checkpoint for the same device, dtype and context takes it as it is,
the files read once (a check's graph modes and re-runs after its eager run). It is taken only if every file kept
its stat and none was written less than `RACY_NS` before its load (a change in the clock tick of the stat would not
show), and only if nothing in it changed since it loaded (`_state`: its modules' types, modes, hooks and fields, its
tensors' memory, dtype, shape, requires_grad and the bits of their values); else it is dropped and the checkpoint
read anew. One model is kept at a time, for one engine at a time.

Each tensor is handed to its parameter's `weight_loader` as a lazy safetensors slice, so under
tensor parallelism a rank reads only its shard. Fused parameters (qkv, gate_up, stacked experts) are
filled part by part through the model's `stacked_params_mapping`, or whole from a checkpoint that
stores them fused (MoE experts as transformers 5 keeps them: `experts.gate_up_proj`).
"""
from __future__ import annotations

import contextlib
import json
import time
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from reference_runner.errors import CheckpointError
from reference_runner.models import get_model_class
from reference_runner.models.config import ModelConfig
from reference_runner.models.layers import default_weight_loader
from reference_runner.parallel.state import ParallelState

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' dtype names; cast to the run dtype
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
RACY_NS = 2_000_000_000  # the coarsest file-time resolution in common use (FAT: 2 s)

_kept: nn.Module | None = None  # the model an engine handed back, for the next engine (see the docstring)
# Each keepable model loaded: what it was loaded from and for, and its state right after.
_as_loaded: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple]] = weakref.WeakKeyDictionary()


def read_config(path: str | Path) -> ModelConfig:
    """Parse `path/config.json`: a malformed file or field raises `CheckpointError` naming it, an unknown
    architecture `UnsupportedModel`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: {file.name} not found ({file})")
    try:
        hf = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got a {type(hf).__name__}")
    architectures = hf.get("architectures")
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)):
        raise CheckpointError(f"{file}: 'architectures' must list the model class, got {architectures!r}")
    get_model_class(architectures[0])  # unknown architectures fail before their fields are read
    try:
        return ModelConfig.from_hf(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None


def weight_files(path: str | Path) -> dict[str, Path]:
    """Each tensor name and the file holding it: the index's shards, else `model.safetensors`. A file the index
    does not list (or, without an index, any file but `model.safetensors`), a name in two files, or a name the
    index maps elsewhere raises `CheckpointError`."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (path / name).is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists {absent[0]}, which is not in {path}")
        unused = f"is not listed in {INDEX_NAME}"
    else:
        weight_map, files = None, [WEIGHTS_NAME]
        if not (path / WEIGHTS_NAME).is_file():
            found = ", ".join(p.name for p in sorted(path.glob("*.safetensors")))
            raise CheckpointError(f"checkpoint {path}: neither {WEIGHTS_NAME} nor {INDEX_NAME}"
                                  + (f" (transformers would not read {found})" if found else ""))
        unused = f"is neither {WEIGHTS_NAME} nor listed in a {INDEX_NAME}"
    strays = [p.name for p in sorted(path.glob("*.safetensors")) if p.name not in files]
    if strays:
        raise CheckpointError(f"checkpoint {path}: {strays[0]} {unused}: refused rather than loaded (remove it, or "
                              f"list its tensors in {INDEX_NAME})")
    where: dict[str, Path] = {}
    for name in files:
        for tensor in _tensor_names(path / name):
            if tensor in where:
                raise CheckpointError(f"checkpoint {path}: tensor {tensor!r} is in both {where[tensor].name} and {name}")
            where[tensor] = path / name
    if weight_map is not None:
        for tensor, file in where.items():
            if weight_map.get(tensor) != file.name:
                listed = f"maps it to {weight_map[tensor]}" if tensor in weight_map else "does not list it"
                raise CheckpointError(f"{file}: holds tensor {tensor!r}, but {INDEX_NAME} {listed}")
        lost = sorted(set(weight_map) - set(where))
        if lost:
            raise CheckpointError(f"{index}: maps tensor {lost[0]!r} to {weight_map[lost[0]]}, which does not hold it")
    return where


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a JSON object with a weight_map ({type(e).__name__}: {e})") from None
    if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names, got {weight_map!r:.80}")
    return weight_map


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def load_model(path: str | Path, *, device: str | torch.device, dtype: torch.dtype,
               parallel: ParallelState | None = None, max_positions: int | None = None) -> nn.Module:
    """Build the checkpoint's model on `device` in `dtype` (this rank's shard under TP) and load its weights; on
    one rank, the model an engine handed back (`keep_model`) where it was loaded alike and nothing in it changed."""
    global _kept
    path = Path(path)
    parallel = parallel or ParallelState()
    kept, _kept = _kept, None  # for one engine at a time
    kept_as = _kept_as(path, device, dtype, max_positions) if parallel.world_size == 1 else None
    if kept is not None and kept_as is not None and _unchanged(kept, kept_as):
        return kept
    kept = None  # its memory freed before this model's is taken
    config = read_config(path)
    tensors = weight_files(path)
    with torch.device(device), _default_dtype(dtype):
        try:
            model = get_model_class(config.architecture)(config, parallel, max_positions)
        except KeyError as e:  # a field only this architecture reads (num_experts, ...)
            raise CheckpointError(f"{path / 'config.json'}: missing field {e} of {config.architecture}") from None
    load_weights(model, tensors)
    model.eval()
    if kept_as is not None:
        _as_loaded[model] = (kept_as, _state(model))
    return model


def keep_model(model: nn.Module) -> None:
    """Hand back `model`, whose engine is done with it: the next engine of the process that loads it alike takes it
    (`load_model`). A model loaded on several ranks, or on the meta device, is not kept."""
    global _kept
    if model in _as_loaded:
        _kept = model


def drop_kept_model() -> None:
    """Free the model kept for the next engine, if any."""
    global _kept
    _kept = None


def _unchanged(model: nn.Module, kept_as: tuple) -> bool:
    """Whether `model` was loaded as `kept_as` asks and nothing in it changed since."""
    loaded_as, state = _as_loaded[model]
    return loaded_as == kept_as and _state(model) == state


def _state(model: nn.Module) -> tuple:
    """What an engine could have changed in `model`: each module's type and fields (its mode, hooks, a method or
    value set on it), each parameter's and buffer's memory, dtype, shape, requires_grad and `_bits`."""
    modules = tuple((name, type(module), tuple(sorted((field, _field(value)) for field, value in vars(module).items())))
                    for name, module in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.requires_grad, _bits(t))
                    for name, t in [*model.named_parameters(), *model.named_buffers()])
    return modules, tensors


def _field(value):
    """A module field as `_state` compares it: a plain value itself, a dict (hooks, parameters, submodules) by its
    keys, any other object by its identity."""
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return value
    if isinstance(value, dict):
        return tuple(value)
    return id(value)


def _bits(t: torch.Tensor) -> int:
    """A wrapping sum of the bytes of `t` read as integers, one pass over its memory: any change of one value shows."""
    raw = t.detach().reshape(-1).view(torch.uint8)
    if raw.numel() % 4 == 0 and raw.storage_offset() % 4 == 0:
        raw = raw.view(torch.int32)
    return int(raw.sum(dtype=raw.dtype))


def _kept_as(path: Path, device: str | torch.device, dtype: torch.dtype, max_positions: int | None) -> tuple | None:
    """What a model loaded now would be kept as: the checkpoint, the stat of each of its files, device, dtype and
    context; None where it cannot be kept (the meta device, an unreadable directory, a file written too recently)."""
    if torch.device(device).type == "meta":
        return None
    now = time.time_ns()
    try:
        stats = file_stats(path)
    except OSError:  # read_config names what is wrong
        return None
    if not settled(stats, now):
        return None
    return str(path.resolve()), tuple((name, *stat) for name, stat in stats.items()), str(torch.device(device)), dtype, \
        max_positions


def file_stats(path: Path) -> dict[str, list[int]]:
    """Size, mtime, ctime and inode of each file of directory `path`: what any change to its contents changes."""
    return {p.name: [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino] for p in sorted(path.iterdir()) for s in [p.stat()]}


def settled(stats: dict[str, list[int]], since_ns: int) -> bool:
    """Whether every file of `stats` was last written at least `RACY_NS` before `since_ns`: a change in the clock tick
    of a stat taken then would not show in it (git's "racy clean" entries)."""
    return all(max(mtime, ctime) < since_ns - RACY_NS for _, mtime, ctime, _ in stats.values())


def validate_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> ModelConfig:
    """Every check `load_model` makes, on every tensor of the checkpoint, for a run in `dtype`; its config if all pass.
    The model is built on the meta device: the checkpoint is read once, its model never held in memory."""
    return load_model(path, device="meta", dtype=dtype).config


def load_weights(model: nn.Module, tensors: dict[str, Path]) -> None:
    """Fill every parameter of `model` from `tensors` (name -> file); a missing, unexpected, misshapen,
    non-float or non-finite tensor raises `CheckpointError` naming it and its file."""
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding and is not listed
    mapping = getattr(model, "stacked_params_mapping", [])
    loaded = set()
    whole = set()  # parameters filled by one tensor (e.g. fused experts): their per-part names are not needed
    by_file: dict[Path, list[str]] = {}
    for name, file in tensors.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                # A tied checkpoint may still carry lm_head.weight: transformers ignores it too.
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and "lm_head.weight" not in params):
                    continue
                target, shard_id = _fused_name(name, mapping)
                if target not in params:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} (no parameter {target!r} in the model)")
                weight = f.get_slice(name)
                if weight.get_dtype() not in FLOAT_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {weight.get_dtype()}; a float model "
                                          f"takes {', '.join(FLOAT_DTYPES)}")
                param = params[target]
                loader = getattr(param, "weight_loader", default_weight_loader)
                args = () if shard_id is None else (shard_id,)
                try:
                    loader(param, weight, *args)
                except (ValueError, SafetensorError) as e:
                    raise CheckpointError(f"{file}: tensor {name!r} {e}") from None
                loaded.add(name)
                if shard_id is None:
                    whole.add(target)
    missing = sorted(name for name in _checkpoint_names(params, mapping) - loaded
                     if _fused_name(name, mapping)[0] not in whole)
    if missing:
        folder = next(iter(tensors.values())).parent if tensors else "(no tensors)"
        raise CheckpointError(f"checkpoint {folder}: missing tensor(s) {', '.join(missing)}")


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
