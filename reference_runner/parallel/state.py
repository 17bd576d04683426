"""Process groups: where a rank sits in the tensor- and data-parallel layout.

Ranks are laid out TP-major: `rank = dp_rank * tp_size + tp_rank`, so a TP group is consecutive
ranks (one node's fast links) and a DP group takes one rank of each TP group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from reference_runner.device import resolve_device
from reference_runner.errors import LayoutError

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # torch.distributed backend per device
DIST_TIMEOUT_S = 60.0  # every collective of every group: a dead or stuck peer fails the run instead of hanging it


@dataclass
class ParallelState:
    """Where this rank sits: its tensor-parallel group and its data-parallel slot."""

    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None  # the ranks with this tp_rank, one per DP rank
    world_group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size

    def moe_state(self) -> ParallelState:
        """The layout of expert layers: this one, or under DP attention one TP group of every rank
        (SGLang's moe_tp_size = tp_size * dp_size), since each expert layer sees every DP rank's tokens."""
        if self.dp_size == 1:
            return self
        return ParallelState(tp_rank=self.rank, tp_size=self.world_size, tp_group=self.world_group)


def init_parallel(tp_size: int, dp_size: int, device: str, timeout_s: float = DIST_TIMEOUT_S) -> ParallelState:
    """Join the job described by the env:// variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK, as torchrun sets them) and build the TP and DP groups.

    Every collective of every group fails after `timeout_s` instead of waiting forever on a dead or
    stuck rank.
    """
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != tp_size * dp_size:
        raise LayoutError(f"WORLD_SIZE {world_size} is not tp {tp_size} x dp {dp_size}")
    resolve_device(device)  # on npu, imports torch_npu: torch.npu and the hccl backend exist only then
    if device != "cpu":  # one accelerator per local rank
        getattr(torch, device).set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(DIST_BACKENDS[device], init_method="env://", timeout=timeout)
    rank = dist.get_rank()
    # new_group is collective: every rank creates every group, in the same order.
    tp_groups = [dist.new_group(list(range(d * tp_size, (d + 1) * tp_size)), timeout=timeout) for d in range(dp_size)]
    dp_groups = [dist.new_group(list(range(t, world_size, tp_size)), timeout=timeout) for t in range(tp_size)]
    dp_rank, tp_rank = divmod(rank, tp_size)
    return ParallelState(tp_rank=tp_rank, tp_size=tp_size, dp_rank=dp_rank, dp_size=dp_size,
                         tp_group=tp_groups[dp_rank], dp_group=dp_groups[tp_rank], world_group=dist.group.WORLD)


def destroy_parallel() -> None:
    """Leave the job (every group), if one was joined, once every rank is done communicating."""
    if dist.is_initialized():
        # A rank that closes its connections while a peer still finishes a collective fails that peer.
        dist.barrier()
        dist.destroy_process_group()


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
