"""One rank's model serves the next engine of the process that loads it alike, once its engine hands it back: the
weights read once for a check's modes and re-runs. It never carries anything from one engine into the next: a model
changed in any way since it loaded (a weight written by a faulty replay, a hook, a method patched onto a module, its
mode, dtype or requires_grad), a model another engine still holds, a checkpoint changed since, or another dtype,
device, context or layout all load anew."""
import copy
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import npugraph_harness
from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.graphs.runner import GraphRunner
from reference_runner.models import loader
from reference_runner.parallel.state import ParallelState
from reference_runner.records import Request

REQUESTS = [Request("r0", [5, 9, 2, 7], 6), Request("r1", [3, 1], 6)]
replay = GraphRunner.replay


@pytest.fixture
def loads(monkeypatch):
    """The models whose weights were read, in order; nothing kept from earlier tests."""
    monkeypatch.setattr(loader, "_kept", None)
    loaded = []
    load_weights = loader.load_weights
    monkeypatch.setattr(loader, "load_weights", lambda model, tensors: loaded.append(model) or load_weights(model, tensors))
    return loaded


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A copy of the tiny llama checkpoint whose files count as settled (a test cannot wait out a clock tick)."""
    monkeypatch.setattr(loader, "RACY_NS", 0)
    return shutil.copytree(ensure_checkpoint("llama"), tmp_path / "llama")


def load(checkpoint, **options) -> nn.Module:
    return loader.load_model(checkpoint, **{"device": "cpu", "dtype": torch.float32, **options})


def loaded_and_handed_back(checkpoint) -> nn.Module:
    model = load(checkpoint)
    loader.keep_model(model)
    return model


def test_an_engine_done_hands_its_model_to_the_next(checkpoint, loads):
    eager = Engine(checkpoint, EngineArgs(mode="eager"))
    eager.release()
    graph = Engine(checkpoint, EngineArgs(mode="graph", max_bs=2))
    assert graph.model_runner.model is eager.model_runner.model and len(loads) == 1
    assert graph.kv_cache is not eager.kv_cache


def test_a_model_its_engine_still_holds_serves_no_other(checkpoint, loads):
    first = Engine(checkpoint, EngineArgs(mode="eager"))
    second = Engine(checkpoint, EngineArgs(mode="eager"))
    assert second.model_runner.model is not first.model_runner.model and len(loads) == 2


def test_a_model_handed_back_serves_one_engine(checkpoint, loads):
    loaded_and_handed_back(checkpoint)
    taken = load(checkpoint)
    assert load(checkpoint) is not taken and len(loads) == 2


def test_a_dropped_model_serves_no_engine(checkpoint, loads):
    first = loaded_and_handed_back(checkpoint)
    loader.drop_kept_model()
    assert load(checkpoint) is not first and len(loads) == 2


@pytest.mark.parametrize("other", [dict(dtype=torch.bfloat16), dict(max_positions=128), dict(device="meta")])
def test_another_dtype_context_or_device_loads_anew(checkpoint, loads, other):
    first = load(checkpoint, **{"max_positions": 256, **other})
    loader.keep_model(first)
    assert load(checkpoint, max_positions=256) is not first and len(loads) == 2


def test_the_ranks_of_a_layout_load_their_own_shards(checkpoint, loads):
    for _ in range(2):
        loader.keep_model(load(checkpoint, parallel=ParallelState(tp_size=2)))
    assert len(loads) == 2


def rewrite_with_norm_plus_one(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.norm.weight"] += 1
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})


def rewrite_in_place_keeping_size_and_mtime(checkpoint):
    file = checkpoint / "model.safetensors"
    stat = file.stat()
    with open(file, "r+b") as f:  # the same inode, size and mtime: only its ctime tells
        f.seek(-4, os.SEEK_END)  # the last float32 of the last tensor, moved by one ulp
        low = f.read(1)[0]
        f.seek(-4, os.SEEK_END)
        f.write(bytes([low ^ 1]))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("change", [rewrite_with_norm_plus_one, rewrite_in_place_keeping_size_and_mtime])
def test_a_checkpoint_changed_since_is_read_anew(checkpoint, loads, change):
    first = loaded_and_handed_back(checkpoint)
    change(checkpoint)
    second = load(checkpoint)
    assert second is not first and len(loads) == 2
    assert [torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values())].count(False) == 1


def test_files_written_in_the_clock_tick_of_the_load_are_not_trusted(tmp_path, loads):
    fresh = shutil.copytree(ensure_checkpoint("llama"), tmp_path / "llama")  # written just now
    first = loaded_and_handed_back(fresh)
    assert load(fresh) is not first and len(loads) == 2


# What an engine (or a fault injected into it) could leave changed in its model.
def weight_edited_in_place(model, monkeypatch):
    with torch.no_grad():
        model.model.norm.weight.add_(1)


def weight_edited_through_data(model, monkeypatch):
    model.model.norm.weight.data[0] += 1  # behind autograd's version counter


def one_value_moved_by_one_ulp(model, monkeypatch):
    weight = model.model.layers[1].mlp.down_proj.weight.data
    weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))


def buffer_edited(model, monkeypatch):
    model.model.rotary_emb.cos_sin_cache.mul_(2)


def parameter_replaced_by_an_equal_copy(model, monkeypatch):
    proj = model.model.layers[0].self_attn.o_proj
    proj.weight = nn.Parameter(proj.weight.detach().clone(), requires_grad=False)


def submodule_replaced(model, monkeypatch):
    model.model.layers[0].mlp = copy.deepcopy(model.model.layers[0].mlp)


def method_patched_onto_a_module(model, monkeypatch):
    mlp = model.model.layers[0].mlp
    monkeypatch.setattr(mlp, "forward", lambda x: torch.zeros_like(x))  # a fault injector on one instance


def field_set(model, monkeypatch):
    model.model.layers[0].self_attn.num_heads = 2


def forward_hook(model, monkeypatch):
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: None)  # a routing recorder


def forward_pre_hook(model, monkeypatch):
    model.model.layers[0].register_forward_pre_hook(lambda module, args: None)


def requires_grad(model, monkeypatch):
    model.requires_grad_(True)


def training_mode(model, monkeypatch):
    model.train()


def dtype_changed(model, monkeypatch):
    model.to(torch.float64)


CHANGES = [weight_edited_in_place, weight_edited_through_data, one_value_moved_by_one_ulp, buffer_edited,
           parameter_replaced_by_an_equal_copy, submodule_replaced, method_patched_onto_a_module, field_set,
           forward_hook, forward_pre_hook, requires_grad, training_mode, dtype_changed]


@pytest.mark.parametrize("change", CHANGES)
def test_a_model_changed_since_it_loaded_is_loaded_anew(checkpoint, loads, monkeypatch, change):
    first = loaded_and_handed_back(checkpoint)
    change(first, monkeypatch)
    assert load(checkpoint) is not first and len(loads) == 2


def hook_added_and_removed(model, monkeypatch):
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: None).remove()


def requires_grad_set_and_cleared(model, monkeypatch):
    model.requires_grad_(True).requires_grad_(False)


def trained_and_back_to_eval(model, monkeypatch):
    model.train().eval()


def weight_edited_and_restored(model, monkeypatch):
    weight = model.model.norm.weight.data
    saved = weight.clone()
    weight.add_(1).copy_(saved)


@pytest.mark.parametrize("undone", [hook_added_and_removed, requires_grad_set_and_cleared, trained_and_back_to_eval,
                                    weight_edited_and_restored])
def test_a_change_undone_before_the_next_load_keeps_the_model(checkpoint, loads, monkeypatch, undone):
    first = loaded_and_handed_back(checkpoint)
    undone(first, monkeypatch)
    assert load(checkpoint) is first and len(loads) == 1


def replay_writing_into_the_final_norm(self, forward_batch):
    """A replay that writes into the model's memory, as a graph pool placed over a weight would."""
    self.model_runner.model.model.norm.weight.data.mul_(0.5)
    return replay(self, forward_batch)


def test_weights_a_faulty_run_wrote_into_reach_no_later_run(checkpoint, loads, monkeypatch):
    clean = Engine(checkpoint, EngineArgs(mode="eager")).generate(REQUESTS)  # held, never handed back
    with monkeypatch.context() as patch:
        patch.setattr(GraphRunner, "replay", replay_writing_into_the_final_norm)
        faulty = Engine(checkpoint, EngineArgs(mode="graph", max_bs=2))
        assert [g.top_logprobs for g in faulty.generate(REQUESTS)] != [g.top_logprobs for g in clean]
        faulty.release()
    later = Engine(checkpoint, EngineArgs(mode="eager"))
    assert later.model_runner.model is not faulty.model_runner.model and len(loads) == 3
    assert later.generate(REQUESTS) == clean


def test_a_model_a_graph_engine_captured_on_serves_an_eager_engine_unchanged(checkpoint, loads):
    clean = Engine(checkpoint, EngineArgs(mode="eager")).generate(REQUESTS)
    graph = Engine(checkpoint, EngineArgs(mode="graph", max_bs=2))
    graph.generate(REQUESTS)
    graph.release()
    later = Engine(checkpoint, EngineArgs(mode="eager"))
    assert later.model_runner.model is graph.model_runner.model and len(loads) == 2
    assert later.generate(REQUESTS) == clean


def test_a_check_reads_the_weights_once_for_its_modes_and_frees_them_at_its_end(loads, monkeypatch):
    monkeypatch.setattr(loader, "RACY_NS", 0)  # the cache entry may have been built just now
    result = npugraph_harness.check(model="llama", workload="batch3", max_new_tokens=6, modes=["eager", "graph"])
    assert result.passed
    assert [model.lm_head.weight.device.type for model in loads].count("cpu") == 1  # validation's loads are on meta
    assert loader._kept is None
