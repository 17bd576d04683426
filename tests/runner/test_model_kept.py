"""One rank's model is loaded once per process for the engines that use it alike: the next engine of the same unchanged
checkpoint, device, dtype and context takes it as it is (a check's graph modes after its eager run read the weights
no more); anything else loads anew, as does a checkpoint whose files were written in the clock tick of the load."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.engine.args import EngineArgs
from reference_runner.engine.engine import Engine
from reference_runner.models import loader
from reference_runner.parallel.state import ParallelState


@pytest.fixture
def loads(monkeypatch):
    """The checkpoints whose weights were loaded, in order; nothing kept from earlier tests."""
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


def test_the_next_engine_takes_the_model_the_last_one_loaded(checkpoint, loads):
    eager = Engine(checkpoint, EngineArgs(mode="eager"))
    graph = Engine(checkpoint, EngineArgs(mode="graph", max_bs=2))
    assert graph.model_runner.model is eager.model_runner.model and len(loads) == 1
    assert graph.model_runner.kv_cache is not eager.model_runner.kv_cache


@pytest.mark.parametrize("other", [dict(dtype=torch.bfloat16), dict(max_positions=128), dict(device="meta")])
def test_another_dtype_context_or_device_loads_anew(checkpoint, loads, other):
    first = loader.load_model(checkpoint, **{"device": "cpu", "dtype": torch.float32, "max_positions": 256, **other})
    second = loader.load_model(checkpoint, device="cpu", dtype=torch.float32, max_positions=256)
    assert second is not first and len(loads) == 2


def test_a_checkpoint_changed_since_loads_anew(checkpoint, loads):
    first = loader.load_model(checkpoint, device="cpu", dtype=torch.float32)
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.norm.weight"] += 1
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    second = loader.load_model(checkpoint, device="cpu", dtype=torch.float32)
    assert second is not first and len(loads) == 2
    torch.testing.assert_close(second.model.norm.weight, first.model.norm.weight + 1)


def test_files_written_in_the_clock_tick_of_the_load_are_not_trusted(tmp_path, loads):
    fresh = shutil.copytree(ensure_checkpoint("llama"), tmp_path / "llama")  # written just now
    models = [loader.load_model(fresh, device="cpu", dtype=torch.float32) for _ in range(2)]
    assert models[0] is not models[1] and len(loads) == 2


def test_the_ranks_of_a_layout_load_their_own_shards(checkpoint, loads):
    for _ in range(2):
        loader.load_model(checkpoint, device="cpu", dtype=torch.float32, parallel=ParallelState(tp_size=2))
    assert len(loads) == 2
