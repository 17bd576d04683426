"""The collectives the model needs, over the groups of a `ParallelState`.

At group size 1 each is the identity, so a single-device run issues none. They are the functional
c10d ops followed by an explicit `wait_tensor`: both are plain op calls on plain tensors, so a device
graph (SimNPUGraph included) records them and replays the communication.
`torch.distributed._functional_collectives.all_reduce` would instead return an `AsyncCollectiveTensor`
whose wait runs below the torch-function level, so a recording would replay the collective without
waiting for it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from reference_runner.parallel.state import ParallelState

_c10d = torch.ops._c10d_functional
# `all_gather_into_tensor` is deprecated for `all_gather_single` (torch 2.13); the Ascend torch pins are older.
_host_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group."""
    if state.tp_size == 1:
        return x
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", state.tp_group.group_name))


def all_gather_last_dim(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Concatenate every TP rank's `x` along the last dimension, in rank order."""
    if state.tp_size == 1:
        return x
    gathered = _all_gather(x, state.tp_size, state.tp_group)  # [tp * rows, ...]
    return torch.cat(gathered.chunk(state.tp_size), dim=-1)


def dp_all_gather(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Stack every DP rank's `x` (same shape on all ranks) along dim 0, in DP rank order."""
    if state.dp_size == 1:
        return x
    return _all_gather(x, state.dp_size, state.dp_group)


def _all_gather(x: torch.Tensor, group_size: int, group: dist.ProcessGroup) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), group_size, group.group_name))


def dp_gather_host(values: list[int], state: ParallelState, device: str) -> list[list[int]]:
    """For each of `values`, its value on every DP rank in DP rank order; without DP, `[[v] for v in values]`."""
    if state.dp_size == 1:
        return [[int(v)] for v in values]
    local = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = torch.empty(state.dp_size * len(values), dtype=torch.int64, device=device)
    _host_all_gather(gathered, local, group=state.dp_group)
    return gathered.view(state.dp_size, len(values)).t().tolist()
