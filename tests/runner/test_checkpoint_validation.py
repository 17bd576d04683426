"""Checkpoints are validated strictly before use, at any TP size: config fields, the files transformers reads
(index respected, strays refused), one file per tensor name, float dtypes, whole shapes (never cut to size),
finite values. Each failure names the field, file or tensor; a well-formed twin of each probe loads."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.engine.engine import Engine
from reference_runner.errors import CheckpointError, UnsupportedModel
from reference_runner.models.loader import INDEX_NAME, WEIGHTS_NAME, load_model, validate_checkpoint
from reference_runner.parallel.state import ParallelState

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # [64, 64]
NORM = "model.layers.0.input_layernorm.weight"  # [64]


def copy_of(model: str, tmp_path):
    """A writable copy of builtin `model`'s checkpoint."""
    return shutil.copytree(ensure_checkpoint(model), tmp_path / model, ignore=shutil.ignore_patterns("manifest.json"))


@pytest.fixture
def checkpoint(tmp_path):
    return copy_of("llama", tmp_path)


def edit_tensors(path, edit):
    tensors = load_file(path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})


def edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))


DROP = object()  # edit_config: remove the field


def shard(path, files: dict[str, list[str]], weight_map: dict[str, str] | None = None):
    """Split model.safetensors into `files` (file name: tensor names, `*` for the rest) with an index that maps
    every tensor to its file (or `weight_map`)."""
    tensors = load_file(path / WEIGHTS_NAME)
    (path / WEIGHTS_NAME).unlink()
    rest = sorted(set(tensors) - {n for names in files.values() for n in names if n != "*"})
    where = {}
    for file, names in files.items():
        names = rest if names == ["*"] else names
        save_file({n: tensors[n] for n in names}, path / file, metadata={"format": "pt"})
        where.update(dict.fromkeys(names, file))
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map or where}))


# --- config.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "message"), [
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"vocab_size": "512"}, "vocab_size must be a positive integer, got '512'"),
    ({"vocab_size": 512.0}, "vocab_size must be a positive integer, got 512.0"),
    ({"vocab_size": DROP}, "missing field 'vocab_size'"),
    ({"hidden_size": DROP}, "missing field 'hidden_size'"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": DROP},
     "num_attention_heads 3 does not divide hidden_size 64 (and no head_dim given)"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"head_dim": 15}, "head_dim 15 is odd: rotary embeddings need an even head_dim"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number, got -1"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
    ({"architectures": DROP}, "'architectures' must list the model class, got None"),
    ({"architectures": []}, "'architectures' must list the model class, got []"),
], ids=["vocab-0", "vocab-string", "vocab-float", "vocab-missing", "hidden-missing", "heads-not-dividing-hidden",
        "kv-heads-not-dividing-heads", "odd-head-dim", "negative-eps", "tie-not-bool", "no-architectures",
        "empty-architectures"])
def test_a_bad_config_field_is_named(checkpoint, fields, message):
    edit_config(checkpoint, **fields)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(checkpoint / 'config.json'))}: {re.escape(message)}$"):
        validate_checkpoint(checkpoint)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", r"not valid JSON \(Expecting property name enclosed in double quotes: line 1 column 2 \(char 1\)\)"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ('"llama"', "expected a JSON object, got a str"),
], ids=["not-json", "json-list", "json-string"])
def test_a_config_that_is_not_a_json_object_is_refused(checkpoint, text, message):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(checkpoint / 'config.json'))}: {message}$"):
        validate_checkpoint(checkpoint)


def test_unknown_architecture_names_it_and_the_supported_ones(checkpoint):
    edit_config(checkpoint, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnsupportedModel, match="'GPTNeoXForCausalLM' is not supported; supported: LlamaForCausalLM, "
                                               "MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM"):
        validate_checkpoint(checkpoint)


def test_unsupported_rope_scaling_is_refused(checkpoint):
    edit_config(checkpoint, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(UnsupportedModel, match="rope_type 'yarn'"):
        validate_checkpoint(checkpoint)


def test_a_missing_field_of_one_architecture_is_named(tmp_path):
    path = copy_of("qwen2_moe", tmp_path)
    edit_config(path, num_experts=DROP)
    with pytest.raises(CheckpointError, match=r"config\.json: missing field 'num_experts' of Qwen2MoeForCausalLM$"):
        validate_checkpoint(path)


def test_missing_config_names_the_file(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        validate_checkpoint(checkpoint)


# --- which files hold the weights ----------------------------------------------------------------

def test_a_checkpoint_without_weights_is_refused(checkpoint):
    (checkpoint / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json$"):
        validate_checkpoint(checkpoint)


def test_a_weights_file_transformers_would_not_read_is_named(checkpoint):
    (checkpoint / WEIGHTS_NAME).rename(checkpoint / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json "
                                              r"\(transformers would not read weights\.safetensors\)$"):
        validate_checkpoint(checkpoint)


@pytest.mark.parametrize("stray", ["copy", "other-names"])
def test_a_stray_weights_file_is_refused_not_loaded(checkpoint, stray):
    if stray == "copy":  # an old copy whose tensors would override the real ones
        shutil.copy(checkpoint / WEIGHTS_NAME, checkpoint / "zz-old.safetensors")
    else:  # tensors of its own, which would be added
        save_file({"extra.weight": torch.zeros(2)}, checkpoint / "zz-old.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("zz-old.safetensors is neither model.safetensors nor listed in a "
                                                        "model.safetensors.index.json: refused rather than loaded")):
        validate_checkpoint(checkpoint)


def test_a_sharded_checkpoint_loads_the_same_weights_through_its_index(checkpoint, tmp_path):
    whole = load_model(ensure_checkpoint("llama"), device="cpu", dtype=torch.float32).state_dict()
    shard(checkpoint, {"model-00001-of-00002.safetensors": [Q_PROJ, NORM], "model-00002-of-00002.safetensors": ["*"]})
    sharded = load_model(checkpoint, device="cpu", dtype=torch.float32).state_dict()
    assert all(torch.equal(sharded[name], whole[name]) for name in whole)


@pytest.mark.parametrize(("layout", "message"), [
    ("stray-beside-index", "zz-old.safetensors is not listed in model.safetensors.index.json: refused rather than loaded"),
    ("duplicate-across-shards", f"tensor '{Q_PROJ}' is in both a.safetensors and b.safetensors"),
    ("index-maps-elsewhere", f"a.safetensors: holds tensor '{NORM}', but model.safetensors.index.json maps it to "
                             "b.safetensors"),
    ("index-lacks-a-tensor", f"a.safetensors: holds tensor '{NORM}', but model.safetensors.index.json does not list it"),
    ("index-lists-absent-file", "model.safetensors.index.json: lists c.safetensors, which is not in"),
    ("index-not-json", "model.safetensors.index.json: not a JSON object with a weight_map"),
])
def test_an_index_that_does_not_match_the_files_is_refused(checkpoint, layout, message):
    shard(checkpoint, {"a.safetensors": [Q_PROJ, NORM], "b.safetensors": ["*"]})
    index = json.loads((checkpoint / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    if layout == "stray-beside-index":
        save_file({"extra.weight": torch.zeros(2)}, checkpoint / "zz-old.safetensors")
    elif layout == "duplicate-across-shards":
        tensors = load_file(checkpoint / "b.safetensors")
        save_file({**tensors, Q_PROJ: torch.zeros(64, 64)}, checkpoint / "b.safetensors")
    elif layout == "index-maps-elsewhere":
        weight_map[NORM] = "b.safetensors"
    elif layout == "index-lacks-a-tensor":
        del weight_map[NORM]
    elif layout == "index-lists-absent-file":
        weight_map[NORM] = "c.safetensors"
    (checkpoint / INDEX_NAME).write_text("{oops" if layout == "index-not-json" else json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        validate_checkpoint(checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_weights_file_is_named(checkpoint, damage):
    weights = checkpoint / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not safetensors")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(weights))}: unreadable safetensors file \(Error while "
                                              "deserializing header: "):
        validate_checkpoint(checkpoint)


# --- every tensor ----------------------------------------------------------------------------------

def drop(name):
    return lambda tensors: tensors.pop(name)


def put(name, value):
    return lambda tensors: tensors.__setitem__(name, value)


def poke(name, value):
    return lambda tensors: tensors[name].view(-1).__setitem__(3, value)


TENSOR_PROBES = {
    "missing": (drop("model.layers.1.mlp.up_proj.weight"), r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight$"),
    "misshapen": (put("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)),
                  r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)$"),
    "larger-than-config": (put(Q_PROJ, torch.zeros(128, 64)), rf"'{Q_PROJ}' has shape \(128, 64\), expected \(64, 64\)$"),
    "wider-row-parallel": (put("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 80)),
                           r"'model.layers.0.self_attn.o_proj.weight' has shape \(64, 80\), expected \(64, 64\)$"),
    "embedding-rows-above-vocab": (put("model.embed_tokens.weight", torch.zeros(520, 64)),
                                   r"'model.embed_tokens.weight' has shape \(520, 64\), expected \(512, 64\)$"),
    "lm-head-rows-above-vocab": (put("lm_head.weight", torch.zeros(520, 64)),
                                 r"'lm_head.weight' has shape \(520, 64\), expected \(512, 64\)$"),
    "int-in-float-model": (put(NORM, torch.ones(64, dtype=torch.int32)),
                           rf"'{NORM}' has dtype I32; a float model takes F16, BF16, F32, F64$"),
    "nan": (poke(Q_PROJ, float("nan")), rf"'{Q_PROJ}' holds nan at flat index 3 of the loaded part$"),
    "inf": (poke(NORM, float("-inf")), rf"'{NORM}' holds -inf at flat index 3 of the loaded part$"),
    "unexpected": (put("model.layers.0.mlp.experts.0.w1.weight", torch.zeros(4, 4)),
                   "unexpected tensor 'model.layers.0.mlp.experts.0.w1.weight'"),
}


@pytest.mark.parametrize(("edit", "message"), TENSOR_PROBES.values(), ids=TENSOR_PROBES)
def test_a_bad_tensor_is_named(checkpoint, edit, message):
    edit_tensors(checkpoint, edit)
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(checkpoint)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tp_rank_checks_the_whole_tensor_before_cutting_its_shard(checkpoint, rank):
    edit_tensors(checkpoint, put(Q_PROJ, torch.zeros(128, 64)))  # rank 0's half alone would have the right shape
    with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}' has shape \(128, 64\), expected \(64, 64\)$"):
        load_model(checkpoint, device="meta", dtype=torch.float32, parallel=ParallelState(tp_rank=rank, tp_size=2))


def test_the_engine_refuses_what_validation_refuses(checkpoint):
    edit_tensors(checkpoint, put("model.embed_tokens.weight", torch.zeros(520, 64)))
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \(520, 64\), expected \(512, 64\)$"):
        Engine(checkpoint)


def test_a_value_beyond_the_run_dtype_is_named(checkpoint):
    edit_tensors(checkpoint, poke(Q_PROJ, 1e6))
    validate_checkpoint(checkpoint, torch.float32)  # finite in the checkpoint's own dtype
    with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}' holds 1e\+06 at flat index 3 of the loaded part, beyond the "
                                              r"range of torch.float16$"):
        validate_checkpoint(checkpoint, torch.float16)


def test_float_tensors_of_another_dtype_are_cast(checkpoint):
    edit_tensors(checkpoint, lambda tensors: tensors.update({n: t.bfloat16() for n, t in tensors.items()}))
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    reference = load_file(ensure_checkpoint("llama") / WEIGHTS_NAME)[Q_PROJ]
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight[:64], reference.bfloat16().float())


def test_a_tied_checkpoint_that_also_stores_its_lm_head_loads_as_transformers_does(tmp_path):
    path = copy_of("qwen2", tmp_path)
    edit_tensors(path, lambda tensors: tensors.__setitem__("lm_head.weight", torch.zeros(512, 64)))
    model = load_model(path, device="cpu", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the stored copy ignored, as by transformers
    assert model.lm_head.weight.abs().sum() > 0
