"""Updatable ops: kernels whose host arguments a captured graph keeps in a task group, so that
`graph.update(cpu_update_input=...)` can replace them before a replay.

On an NPU, torch_npu's auto-dispatch capture recognises FIA by its op name and records it so, or not,
depending on the release (`graphs/releases.py`). The CPU ops of this project declare here which torch_npu
op they stand for: the CPU emulation records a call as a task group when the emulated release recognises
that op under the overload the call dispatches to. Compiled mode may run one in its static form (its host
list fed as a tensor, at the shapes fixed at capture) inside a compiled piece.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reference_runner.graphs.releases import FIA


@dataclass(frozen=True)
class UpdatableOp:
    """`static_form(*tensor_args, host_list=tensor, **other_host_args)` computes the op at fixed shapes;
    the host list keeps its capture-time length (one entry per batch row)."""

    host_list: str  # the argument `update()` refreshes every step; the op's other host arguments stay frozen
    static_form: Callable[..., torch.Tensor] | None = None
    torch_npu_op: str = FIA  # the op torch_npu's auto dispatch would see instead: `<torch_npu_op>.<overload>`

    def dispatched_name(self, func: Any, kwargs: dict[str, Any]) -> str:
        """The name `__torch_dispatch__` would see for this call of `func` (an overload, or the packet, which
        dispatches to `.out` when given `out=` and to `.default` otherwise)."""
        overload = getattr(func, "_overloadname", None) or ("out" if "out" in kwargs else "default")
        return f"{self.torch_npu_op}.{overload}"


_UPDATABLE: dict[Any, UpdatableOp] = {}


def register_updatable_op(op: Any, host_list: str, static_form: Callable[..., torch.Tensor] | None = None,
                          torch_npu_op: str = FIA) -> None:
    """Declare `op` (an OpOverloadPacket, with all its overloads) updatable through `host_list`, standing for
    `torch_npu_op` on an NPU."""
    spec = UpdatableOp(host_list, static_form, torch_npu_op)
    _UPDATABLE[op] = spec
    _UPDATABLE.update((getattr(op, overload), spec) for overload in op.overloads())


def updatable_op(func: Any) -> UpdatableOp | None:
    """How `func` is updated, or None when it is a plain kernel."""
    return _UPDATABLE.get(func)
