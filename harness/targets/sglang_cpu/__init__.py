"""What SGLang's own CPU engine (`SGLANG_USE_CPU_ENGINE=1`) needs on a host where two of its parts are not to be had
from PyPI, supplied in its worker processes only:

- `sgl_kernel`'s CPU build: `sgl_kernel.py`, a pure-torch implementation of the one op a dense model needs;
- a CPU torchvision: `torchvision.py`, a stand-in that lets SGLang import its image-model modules.

The SGLang target starts its CPU worker with `startup/` first on PYTHONPATH, so that `startup/sitecustomize.py` calls
`prepare_process` at the start of the worker and of every process SGLang spawns (its scheduler and detokenizer), before
any of them imports SGLang. Nothing of this is installed, nor does any installed package's file change; where a real
`sgl_kernel` or torchvision is importable, it is used instead.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from harness.targets.sglang_cpu import torchvision

STARTUP_DIR = Path(__file__).parent / "startup"


def prepare_process() -> None:
    """Make `sgl_kernel` and `torchvision` importable in this process, as the stand-ins where none is installed."""
    if importlib.util.find_spec("sgl_kernel") is None:
        sys.modules["sgl_kernel"] = importlib.import_module(f"{__name__}.sgl_kernel")
    # transformers looks for torchvision once and remembers: it must find none, or it would import torchvision's
    # image models through the stand-in.
    from transformers.utils.import_utils import is_torchvision_available

    is_torchvision_available()
    torchvision.install()
