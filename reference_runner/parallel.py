"""Tensor/data-parallel state and the two collectives the model needs.

At tp_size 1 the collectives are the identity, so a single-device run issues none. Functional
collectives are used because they are traceable: they can be recorded inside a device graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# `all_gather_tensor` was renamed `all_gather_single` (torch 2.13); the Ascend torch pins are older.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


@dataclass
class ParallelState:
    """Where this rank sits: its tensor-parallel group and its data-parallel slot."""

    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: dist.ProcessGroup | None = None


def divide(numerator: int, denominator: int) -> int:
    """Exact division, or a ValueError naming both numbers."""
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each TP rank holds: an equal share, or one replicated head when ranks outnumber heads."""
    if tp_size > num_kv_heads:
        divide(tp_size, num_kv_heads)  # each head must be replicated on the same number of ranks
        return 1
    return divide(num_kv_heads, tp_size)


def all_reduce(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group."""
    if state.tp_size == 1:
        return x
    return funcol.all_reduce(x, "sum", state.tp_group)


def all_gather_last_dim(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dimension, in rank order."""
    if state.tp_size == 1:
        return x
    return _all_gather(x, x.dim() - 1, state.tp_group)
