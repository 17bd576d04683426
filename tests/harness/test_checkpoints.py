"""Tiny checkpoints: deterministic, cached, never downloaded; cache entries checked against their manifest and
rebuilt when wrong, published atomically, no staging left behind; local directories validated."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

import harness.inputs.checkpoints as checkpoints
from harness.inputs import validation
from harness.inputs.checkpoints import (
    BUILTIN_MODELS,
    MANIFEST,
    CheckpointError,
    default_cache_dir,
    ensure_checkpoint,
    entry_problem,
    manifest,
    tiny_config,
)
from reference_runner.models import loader


def entries(cache) -> list[str]:
    """What a cache folder holds besides its validation records."""
    return sorted(p.name for p in cache.iterdir() if p.name != validation.RECORDS)


def tensor_names(path) -> set[str]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_a_builtin_is_built_into_a_directory_named_after_its_config_hash(tmp_path):
    path = ensure_checkpoint("llama", tmp_path)
    assert re.fullmatch(r"llama-[0-9a-f]{12}", path.name) and path.parent == tmp_path
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", MANIFEST, "model.safetensors"]
    assert json.loads((path / MANIFEST).read_text()) == manifest(path)


def test_builds_are_byte_identical(tmp_path):
    first = ensure_checkpoint("qwen2_moe", tmp_path / "a")
    second = ensure_checkpoint("qwen2_moe", tmp_path / "b")
    assert first.name == second.name
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_a_cached_checkpoint_is_reused_without_building(tmp_path, monkeypatch):
    path = ensure_checkpoint("llama", tmp_path)
    monkeypatch.setattr(checkpoints, "build_model", lambda config: pytest.fail("rebuilt a cached checkpoint"))
    assert ensure_checkpoint("llama", tmp_path) == path


def test_the_default_cache_is_npugraph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPUGRAPH_CACHE", str(tmp_path))
    assert ensure_checkpoint("llama").parent == tmp_path


def test_an_empty_npugraph_cache_means_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("NPUGRAPH_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "npugraph-harness"


def test_an_unusable_npugraph_cache_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NPUGRAPH_CACHE", str(tmp_path / "file"))
    with pytest.raises(CheckpointError, match=rf"^NPUGRAPH_CACHE={re.escape(str(tmp_path / 'file'))}: cannot build 'llama' "
                                              r"there \(FileExistsError: "):
        ensure_checkpoint("llama")


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def append_to_config(path):
    with open(path / "config.json", "a") as config:
        config.write(" ")


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda path: truncate(path / "model.safetensors"), "is unreadable (Error while deserializing header: "),
    (lambda path: (path / MANIFEST).unlink(), f"has no readable {MANIFEST}"),
    (append_to_config, f"does not match its {MANIFEST}"),
    (lambda path: shutil.rmtree(path) or path.mkdir(), f"has no readable {MANIFEST}"),  # a bare directory
], ids=["truncated-weights", "no-manifest", "edited-config", "empty-directory"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, capsys, damage, problem):
    path = ensure_checkpoint("llama", tmp_path / "cache")
    good = (path / "model.safetensors").read_bytes()
    damage(path)
    assert entry_problem(path).startswith(problem)
    capsys.readouterr()
    assert ensure_checkpoint("llama", tmp_path / "cache") == path
    assert entry_problem(path) is None and (path / "model.safetensors").read_bytes() == good
    assert f"npugraph-harness: cached checkpoint {path} {problem}" in capsys.readouterr().err
    assert entries(tmp_path / "cache") == [path.name]  # nothing set aside is left


@pytest.fixture
def settled(monkeypatch):
    """Records vouch for files written right before them (a test cannot wait out the clock tick of a write)."""
    monkeypatch.setattr(loader, "RACY_NS", 0)


def test_an_unchanged_entry_is_hashed_once_and_a_changed_one_again(tmp_path, monkeypatch, settled):
    path = ensure_checkpoint("llama", tmp_path / "cache")
    hashed = []
    monkeypatch.setattr(checkpoints, "manifest", lambda entry: hashed.append(entry) or manifest(entry))
    assert [ensure_checkpoint("llama", tmp_path / "cache") for _ in range(3)] == [path] * 3
    assert hashed == [path]  # once, when first reused: its record then vouches for it
    append_to_config(path)
    assert entry_problem(path) == f"does not match its {MANIFEST}"
    assert hashed == [path, path]


def test_a_later_process_does_not_hash_an_entry_that_matched(tmp_path, settled):
    path = ensure_checkpoint("llama", tmp_path / "cache")
    assert entry_problem(path) is None  # hashed, and recorded
    code = ("import sys; from harness.inputs import checkpoints; from reference_runner.models import loader; "
            "loader.RACY_NS = 0; checkpoints.manifest = lambda entry: sys.exit('hashed again'); "
            f"sys.exit(checkpoints.entry_problem(checkpoints.Path({str(path)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")


def test_staging_directories_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = f"llama-{checkpoints._fingerprint('llama', {})}"
    stale = tmp_path / f".{name}.{dead.stdout.strip()}-abc123"
    live = tmp_path / f".{name}.{os.getpid()}-def456"  # another build of this very process, under way
    stale.mkdir(parents=True)
    live.mkdir()
    ensure_checkpoint("llama", tmp_path)
    assert entries(tmp_path) == sorted([live.name, name])


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_build_stopped_midway_leaves_no_staging_directory(tmp_path, monkeypatch, stop):
    def build_then_stop(config):
        raise stop

    monkeypatch.setattr(checkpoints, "build_model", build_then_stop)
    with pytest.raises(stop):
        ensure_checkpoint("llama", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_overrides_change_the_config_and_the_directory(tmp_path):
    path = ensure_checkpoint("llama", tmp_path, num_hidden_layers=3)
    assert path != ensure_checkpoint("llama", tmp_path)
    assert '"num_hidden_layers": 3' in (path / "config.json").read_text()


def test_a_process_that_loses_the_publishing_race_uses_the_winners_checkpoint(tmp_path, monkeypatch):
    built = ensure_checkpoint("llama", tmp_path / "elsewhere")
    winner = tmp_path / built.name
    build_model = checkpoints.build_model

    def build_while_another_process_publishes(config):
        shutil.copytree(built, winner)
        return build_model(config)

    monkeypatch.setattr(checkpoints, "build_model", build_while_another_process_publishes)
    assert ensure_checkpoint("llama", tmp_path) == winner
    assert [p for p in entries(tmp_path) if p != "elsewhere"] == [winner.name]  # no staging left


def test_a_checkpoint_directory_is_returned_as_is(tmp_path):
    path = ensure_checkpoint("llama", tmp_path)
    assert ensure_checkpoint(path) == path
    assert ensure_checkpoint(str(path)) == path


def test_a_directory_without_config_is_refused_naming_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"lacks config.json$"):
        ensure_checkpoint(tmp_path)


def test_a_directory_without_weights_is_refused_naming_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json$"):
        ensure_checkpoint(tmp_path)


def test_an_unknown_name_is_refused_listing_the_builtins(tmp_path):
    with pytest.raises(CheckpointError, match="'gpt2' is neither a checkpoint directory nor a builtin model "
                                              r"\(llama, llama_kv1, llama_hd32, qwen2, qwen2_moe, qwen3, qwen3_moe, mixtral, "
                                              r"smollm2\)"):
        ensure_checkpoint("gpt2", tmp_path)


def test_overrides_are_refused_for_a_directory(tmp_path):
    path = ensure_checkpoint("llama", tmp_path)
    with pytest.raises(CheckpointError, match="overrides apply to builtin models only"):
        ensure_checkpoint(path, num_hidden_layers=3)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_sizes_split_evenly_over_two_and_four_ranks(name):
    config = tiny_config(name)
    sizes = [config.num_attention_heads, config.vocab_size, config.intermediate_size]
    sizes += [getattr(config, field) for field in ("moe_intermediate_size", "shared_expert_intermediate_size")
              if hasattr(config, field)]
    assert all(size % 4 == 0 for size in sizes)
    assert config.num_key_value_heads in ((1,) if name == "llama_kv1" else (2,))


def test_qwen2_moe_stores_one_tensor_per_expert_and_a_gated_shared_expert(tmp_path):
    names = tensor_names(ensure_checkpoint("qwen2_moe", tmp_path))
    mlp = {n.removeprefix("model.layers.0.mlp.") for n in names if n.startswith("model.layers.0.mlp.")}
    experts = {f"experts.{e}.{proj}.weight" for e in range(4) for proj in ("gate_proj", "up_proj", "down_proj")}
    shared = {f"shared_expert.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}
    assert mlp == experts | shared | {"gate.weight", "shared_expert_gate.weight"}


def test_mixtral_stores_one_tensor_per_expert(tmp_path):
    names = tensor_names(ensure_checkpoint("mixtral", tmp_path))
    moe = {n.removeprefix("model.layers.0.block_sparse_moe.") for n in names if ".layers.0.block_sparse_moe." in n}
    assert moe == {f"experts.{e}.w{i}.weight" for e in range(4) for i in (1, 2, 3)} | {"gate.weight"}


def test_qwen2_ties_its_lm_head_and_has_qkv_biases(tmp_path):
    names = tensor_names(ensure_checkpoint("qwen2", tmp_path))
    assert "lm_head.weight" not in names
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= names


def test_qwen3_normalises_each_head_of_q_and_k_and_has_no_biases(tmp_path):
    names = tensor_names(ensure_checkpoint("qwen3", tmp_path))
    attention = {n.removeprefix("model.layers.0.self_attn.") for n in names if ".layers.0.self_attn." in n}
    assert attention == {f"{p}_proj.weight" for p in "qkvo"} | {"q_norm.weight", "k_norm.weight"}


def test_qwen3_moe_stores_one_tensor_per_expert_and_no_shared_expert(tmp_path):
    names = tensor_names(ensure_checkpoint("qwen3_moe", tmp_path))
    mlp = {n.removeprefix("model.layers.0.mlp.") for n in names if n.startswith("model.layers.0.mlp.")}
    assert mlp == {f"experts.{e}.{proj}.weight" for e in range(4) for proj in ("gate_proj", "up_proj", "down_proj")} | {
        "gate.weight"}
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= names
