"""Validation records: a checkpoint directory unchanged since it passed a check is not checked again.

Two checks read every byte of a checkpoint: a cache entry's hashes against its manifest
(`checkpoints.entry_problem`), and the values of every tensor, finite in the run dtype
(`loader.validate_checkpoint`). A directory that passes one gets a record in the checkpoint cache
(`<cache>/validated/`, one JSON file per directory): the checks it passed and the stat of each of its
files (size, mtime, ctime, inode), taken before the check read them. While every file keeps that stat,
the check is passed without reading anything. A file written in the clock tick of the stat cannot be told
apart by its stat (git's "racy clean" entries): a record vouches only for files older than its stat by
`loader.RACY_NS`. The tensor check is recorded per dtype and per source of the code that runs it, so an edit to
the loader or a model class validates again. A cache that cannot be written keeps no record: every run
checks again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from reference_runner.models.config import ModelConfig

RECORDS = "validated"  # the folder of records in the checkpoint cache
MANIFEST_MATCHED = "manifest"  # the check of a cache entry against its manifest

Signature = dict[str, list[int]]  # file name -> [size, mtime_ns, ctime_ns, inode]


def signature(directory: Path) -> Signature:
    """The stat of every file of `directory` that a change to its contents would change (`loader.file_stats`)."""
    from reference_runner.models.loader import file_stats

    return file_stats(directory)


def passed(directory: Path, check: str, cache_dir: Path) -> bool:
    """Whether `directory` passed `check` and none of its files changed since (nor was written too close to it)."""
    record = _read(directory, cache_dir)
    if record is None or check not in record["passed"]:
        return False
    try:
        return _vouches(record, signature(directory))
    except OSError:
        return False


def record(directory: Path, check: str, before: Signature, stat_ns: int, cache_dir: Path) -> None:
    """Record that `directory`, whose files had signature `before` at time `stat_ns`, passed `check`."""
    old = _read(directory, cache_dir)
    kept = old["passed"] if old is not None and _vouches(old, before) else []  # checks of these very contents
    entry = {"directory": str(directory.resolve()), "stat_ns": stat_ns, "files": before,
             "passed": sorted({*kept, check})}
    folder = cache_dir / RECORDS
    with contextlib.suppress(OSError):  # no record: the next run checks again
        folder.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=folder, prefix=".record.")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(entry, file)
            os.replace(staged, _path(directory, cache_dir))  # atomic: a reader sees the old record or this one
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        _prune(folder)


def _prune(folder: Path) -> None:
    """Remove the records of directories that are gone (a test's temporary checkpoints, a replaced cache entry)."""
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if not Path(json.loads(path.read_text())["directory"]).is_dir():
                path.unlink()


def validated_config(directory: Path, dtype: torch.dtype, cache_dir: Path) -> ModelConfig:
    """`loader.validate_checkpoint(directory, dtype)`, skipped where `directory` passed it unchanged since."""
    from reference_runner.models.loader import read_config, validate_checkpoint

    check = f"tensors {str(dtype).removeprefix('torch.')} {_validator_digest()}"
    if passed(directory, check, cache_dir):
        return read_config(directory)
    stat_ns, before = time.time_ns(), signature(directory)
    config = validate_checkpoint(directory, dtype)
    record(directory, check, before, stat_ns, cache_dir)
    return config


def _vouches(record: dict, files: Signature) -> bool:
    """Whether `record` holds for files of signature `files`: the same stat, each settled before the record's."""
    from reference_runner.models.loader import settled

    return files == record["files"] and settled(files, record["stat_ns"])


def _path(directory: Path, cache_dir: Path) -> Path:
    return cache_dir / RECORDS / f"{hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]}.json"


def _read(directory: Path, cache_dir: Path) -> dict | None:
    try:
        record = json.loads(_path(directory, cache_dir).read_text())
        if record["directory"] == str(directory.resolve()) and isinstance(record["passed"], list):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


@functools.cache
def _validator_digest() -> str:
    """A hash of the code that validates tensors: the loader and the model classes."""
    import reference_runner.models

    digest = hashlib.sha256()
    for source in sorted(Path(reference_runner.models.__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]
