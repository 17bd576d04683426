"""Updatable ops: kernels whose host arguments a captured graph keeps in a task group, so that
`graph.update(cpu_update_input=...)` can replace them before a replay.

On an NPU, torch_npu's auto-dispatch capture recognises FIA by its op name and records it so. The ops
of this project declare themselves here instead: the CPU emulation records them as task groups, and
compiled mode may run one in its static form (its host list fed as a tensor, at the shapes fixed at
capture) inside a compiled piece.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class UpdatableOp:
    """`static_form(*tensor_args, host_list=tensor, **other_host_args)` computes the op at fixed shapes;
    the host list keeps its capture-time length (one entry per batch row)."""

    host_list: str  # the argument `update()` refreshes every step; the op's other host arguments stay frozen
    static_form: Callable[..., torch.Tensor] | None = None


_UPDATABLE: dict[Any, UpdatableOp] = {}


def register_updatable_op(op: Any, host_list: str, static_form: Callable[..., torch.Tensor] | None = None) -> None:
    """Declare `op` (an OpOverloadPacket, with all its overloads) updatable through `host_list`."""
    spec = UpdatableOp(host_list, static_form)
    _UPDATABLE[op] = spec
    _UPDATABLE.update((getattr(op, overload), spec) for overload in op.overloads())


def updatable_op(func: Any) -> UpdatableOp | None:
    """How `func` is updated, or None when it is a plain kernel."""
    return _UPDATABLE.get(func)
