"""Device detection: `npu` (Ascend, torch_npu + CANN), `cuda`, or `cpu`.

torch_npu is imported only when `npu` is asked for or detected: installed without CANN it breaks
`import torch` itself, so CPU environments never install it. Why, and what to set: torch_npu
registers a torch device-backend entry point, so `import torch` imports it, which needs CANN's
libraries (`libhccl.so: cannot open shared object file` otherwise). On an Ascend host, source
CANN first (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`); where torch_npu is installed but
CANN is not, set `TORCH_DEVICE_BACKEND_AUTOLOAD=0` and torch imports without it (npu then reads as
unavailable).

torch itself is imported only by the functions that need it, so that a device name can be checked
(`DEVICES`) before the seconds that importing torch takes.
"""
from __future__ import annotations

import importlib.util
import os

DEVICES = ("cpu", "cuda", "npu")


class DeviceUnavailable(RuntimeError):
    """The requested device is not present on this machine."""


def npu_available() -> bool:
    """True when torch_npu imports and sees at least one NPU."""
    import torch

    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:  # missing CANN libraries (libhccl.so, ...)
        return False
    return torch.npu.is_available()


def detect_device() -> str:
    """The best device here: `npu`, then `cuda`, then `cpu` (`NPUGRAPH_DEVICE` overrides; empty means unset)."""
    import torch

    forced = os.environ.get("NPUGRAPH_DEVICE")
    if forced:
        try:
            return resolve_device(forced)
        except DeviceUnavailable as e:
            raise DeviceUnavailable(f"NPUGRAPH_DEVICE={forced}: {e}") from None
    if npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_device(name: str) -> str:
    """Check that `name` is a known device that is present, or raise `DeviceUnavailable`."""
    import torch

    if name not in DEVICES:
        raise DeviceUnavailable(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "npu" and not npu_available():
        raise DeviceUnavailable(
            "device 'npu' is not available: torch_npu with CANN and an Ascend NPU are required "
            "(install with `pip install .[ascend]` on an Ascend host)"
        )
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device 'cuda' is not available: no CUDA GPU visible to torch")
    return name


def synchronize(device: str) -> None:
    """Wait for queued work on `device` (a no-op on the CPU)."""
    if device != "cpu":
        import torch

        getattr(torch, device).synchronize()


def device_name(device: str) -> str:
    """The accelerator's name (`NVIDIA H200`, ...), or the processor's on the CPU."""
    if device != "cpu":
        import torch

        return getattr(torch, device).get_device_name()
    import platform

    return platform.processor() or platform.machine()
