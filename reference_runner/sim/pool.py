"""The memory pool of SimNPUGraph: graphs that share one place their outputs from the same offset."""
from __future__ import annotations

import weakref

import torch

_ALIGN = 64


class SimGraphPool:
    """A memory pool shared by graphs: every graph in it places its outputs from offset 0.

    Only one graph of a pool replays at a time, so engines share one pool across all capture
    sizes; the price, as on the device, is that replaying any graph of the pool may overwrite the
    outputs of the others: callers copy outputs out before the next replay.
    """

    def __init__(self) -> None:
        self.arena = torch.UntypedStorage(0)
        self._placed: list[tuple[weakref.ref, int, tuple, tuple]] = []

    def nbytes(self) -> int:
        return self.arena.nbytes()

    def place(self, outputs: list[torch.Tensor]) -> None:
        """Move `outputs` (grouped by storage) into the arena, laid out from offset 0."""
        regions: dict[int, int] = {}
        end = 0
        for t in outputs:
            key = t.untyped_storage().data_ptr()
            if key not in regions:
                regions[key] = end
                end += -(-t.untyped_storage().nbytes() // _ALIGN) * _ALIGN
        if end > self.arena.nbytes():
            self._grow(end)
        for t in outputs:
            region = regions[t.untyped_storage().data_ptr()]
            offset = region // t.element_size() + t.storage_offset()
            self._placed.append((weakref.ref(t), offset, tuple(t.shape), tuple(t.stride())))
            t.set_(self.arena, offset, t.shape, t.stride())

    def _grow(self, nbytes: int) -> None:
        arena = torch.UntypedStorage(nbytes)
        arena[: self.arena.nbytes()].copy_(self.arena)
        self.arena = arena
        self._placed = [p for p in self._placed if p[0]() is not None]
        for ref, offset, shape, stride in self._placed:
            ref().set_(arena, offset, shape, stride)


def graph_pool_handle() -> SimGraphPool:
    """A pool to share between graphs, like `torch.npu.graph_pool_handle()`."""
    return SimGraphPool()
