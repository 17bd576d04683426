"""Errors raised at the runner's API boundary; each message names the file, tensor or request at fault."""
from __future__ import annotations


class UnsupportedModel(ValueError):
    """The checkpoint's architecture (or one of its features) is not implemented."""


class CheckpointError(RuntimeError):
    """The checkpoint directory is unusable: a missing file or tensor, or a tensor of the wrong shape."""


class LayoutError(ValueError):
    """A parallel layout that cannot run: tp/dp not fitting the model's shapes or the ranks available."""


class InvalidRequest(ValueError):
    """A request that cannot be served (empty prompt, too long, token outside the vocabulary, ...)."""


class TaskGroupMismatch(RuntimeError):
    """A captured graph whose updatable task groups are not the step's updatable attention calls: `update()` would
    leave some of them frozen at capture (docs/npu.md: FIA is recorded by op name, per torch_npu release)."""


class ReplayHang(RuntimeError):
    """A graph replay that waits forever on the device: a task group waits for an ExternalEvent that only
    `update()` records, and each replay consumes one (docs/npu.md)."""


class ModeUnsupported(RuntimeError):
    """A decode mode the device cannot run (mode `compile_nograph` on npu, mode `tree` without graph trees)."""


class GraphTreesUnsupported(ModeUnsupported):
    """Mode `tree` where torch's graph trees cannot run the step: no trees on the device (the CPU), or trees that
    refuse the updatable attention ops (torch_npu without ACLGraph update plans)."""
