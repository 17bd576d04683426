"""Validation records: a checkpoint directory that passed the tensor-by-tensor validation is not read again while
its files keep their stat; any change (an edit, a stray file, another dtype, other validating code) validates it
again, with the same messages; a record never vouches for files written in its own clock tick."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.inputs import validation
from harness.inputs.checkpoints import ensure_checkpoint
from reference_runner.errors import CheckpointError
from reference_runner.models import loader


@pytest.fixture
def checkpoint(tmp_path):
    """A copy of the tiny llama checkpoint, as a user's directory."""
    return shutil.copytree(ensure_checkpoint("llama"), tmp_path / "llama", ignore=shutil.ignore_patterns("manifest.json"))


@pytest.fixture
def validations(monkeypatch):
    """The directories validated tensor by tensor, in order; records vouch for files written right before them
    (a test cannot wait out the clock tick of its writes)."""
    monkeypatch.setattr(loader, "RACY_NS", 0)
    validated = []

    def validate_checkpoint(path, dtype):
        validated.append((path.name, dtype))
        return validate(path, dtype)

    validate = loader.validate_checkpoint
    monkeypatch.setattr(loader, "validate_checkpoint", validate_checkpoint)
    return validated


def test_an_unchanged_checkpoint_is_validated_once(checkpoint, tmp_path, validations):
    configs = [validation.validated_config(checkpoint, torch.float32, tmp_path / "cache") for _ in range(3)]
    assert validations == [("llama", torch.float32)]
    assert all(config == configs[0] for config in configs) and configs[0].vocab_size == 512


def test_each_dtype_is_validated_once(checkpoint, tmp_path, validations):
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        validation.validated_config(checkpoint, dtype, tmp_path / "cache")
    assert validations == [("llama", torch.float32), ("llama", torch.bfloat16)]


def test_a_tensor_edited_after_validation_is_refused_as_before(checkpoint, tmp_path, validations):
    validation.validated_config(checkpoint, torch.float32, tmp_path / "cache")
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.norm.weight"][5] = float("nan")
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        validation.validated_config(checkpoint, torch.float32, tmp_path / "cache")
    assert str(error.value) == (f"{checkpoint / 'model.safetensors'}: tensor 'model.norm.weight' holds nan at flat index 5 "
                                "of the loaded part")


def test_a_stray_weights_file_added_after_validation_is_refused_as_before(checkpoint, tmp_path, validations):
    validation.validated_config(checkpoint, torch.float32, tmp_path / "cache")
    shutil.copy(checkpoint / "model.safetensors", checkpoint / "zz-old.safetensors")
    with pytest.raises(CheckpointError, match=r"zz-old\.safetensors is neither model\.safetensors nor listed in a "):
        validation.validated_config(checkpoint, torch.float32, tmp_path / "cache")


def test_an_edit_to_the_validating_code_validates_again(checkpoint, tmp_path, validations, monkeypatch):
    validation.validated_config(checkpoint, torch.float32, tmp_path / "cache")
    monkeypatch.setattr(validation, "_validator_digest", lambda: "edited")
    validation.validated_config(checkpoint, torch.float32, tmp_path / "cache")
    assert len(validations) == 2


def test_a_record_does_not_vouch_for_files_written_in_its_clock_tick(checkpoint, tmp_path):
    before = validation.signature(checkpoint)
    newest = max(max(mtime, ctime) for _, mtime, ctime, _ in before.values())
    validation.record(checkpoint, "check", before, newest + loader.RACY_NS, tmp_path)
    assert not validation.passed(checkpoint, "check", tmp_path)
    validation.record(checkpoint, "check", before, newest + loader.RACY_NS + 1, tmp_path)
    assert validation.passed(checkpoint, "check", tmp_path)


def test_a_cache_that_cannot_be_written_keeps_no_record(checkpoint, tmp_path, validations):
    (tmp_path / "file").write_text("")
    for _ in range(2):
        validation.validated_config(checkpoint, torch.float32, tmp_path / "file")
    assert len(validations) == 2


def test_the_records_of_removed_directories_are_dropped(checkpoint, tmp_path, validations):
    other = shutil.copytree(checkpoint, tmp_path / "other")
    validation.validated_config(other, torch.float32, tmp_path / "cache")
    shutil.rmtree(other)
    validation.validated_config(checkpoint, torch.float32, tmp_path / "cache")
    records = tmp_path / "cache" / validation.RECORDS
    assert [p.name for p in records.iterdir()] == [validation._path(checkpoint, tmp_path / "cache").name]
