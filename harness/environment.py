"""The Ascend software stack a check ran on, recorded in its JSON report: torch_npu (and its release line),
CANN, torchair, and `HCCL_OP_EXPANSION_MODE`, whose AIV mode breaks graph task groups. Off npu, nothing but
the reason why."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any

EXPANSION_MODE = "HCCL_OP_EXPANSION_MODE"
AIV_WARNING = (f"{EXPANSION_MODE}=AIV: graph task groups with AIV-expanded collectives fail capture or deadlock "
               "replay (vllm-ascend #13688); unset it for graph mode")


def ascend_environment(device: str) -> dict[str, Any]:
    """What torch_npu, CANN and torchair this npu run used, with `warnings`; off npu, `{"skipped": reason}`."""
    if device != "npu":
        return {"skipped": f"device {device}: torch_npu, CANN and torchair are not used"}
    import torch_npu

    from reference_runner.graphs.releases import release_of

    release = release_of(torch_npu.__version__)
    mode = os.environ.get(EXPANSION_MODE)
    return {
        "torch_npu": torch_npu.__version__,
        "torch_npu_release": release.name if release else None,  # None: a release docs/npu.md has not read
        "cann": cann_version(torch_npu),
        "torchair": torchair_version(torch_npu.__version__),
        EXPANSION_MODE: mode,  # None: unset, HCCL's default
        "warnings": [AIV_WARNING] if mode is not None and mode.upper() == "AIV" else [],
    }


def cann_version(torch_npu: Any) -> str | None:
    """CANN's version as torch_npu reads it (`torch_npu.utils.get_cann_version`, empty below CANN 8.1.RC1)."""
    get_cann_version = getattr(torch_npu.utils, "get_cann_version", None)
    return (get_cann_version(module="CANN") or None) if get_cann_version else None


def torchair_version(torch_npu_version: str) -> str | None:
    """torchair's package version, or torch_npu's where torchair comes inside it; None where it is absent."""
    try:
        return importlib.metadata.version("torchair")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        bundled = importlib.util.find_spec("torchair") is not None
    except ValueError:  # in sys.modules without a spec: an alias torch_npu made
        bundled = True
    return f"bundled with torch_npu {torch_npu_version}" if bundled else None
