"""The memory pool of SimNPUGraph: graphs that share one place their outputs from the same offset.

One pool serves every family of graphs (decode per batch size, prefill per token bucket), as on the
device, where `graph_pool_handle()` is passed to every capture: all of them place their outputs from
offset 0, so a replay of any graph writes over the outputs of the others. The device says nothing when
that happens, and neither does the pool: a stale read shows as wrong tokens. What the pool does keep is
which graph last wrote each output's bytes (`last_writer`), so that a test can name the overwrite.
"""
from __future__ import annotations

import itertools
import weakref

import torch

_ALIGN = 64


class SimGraphPool:
    """A memory pool shared by graphs: every graph in it places its outputs from offset 0.

    Only one graph of a pool replays at a time, so engines share one pool across all capture
    sizes and families; the price, as on the device, is that replaying any graph of the pool may overwrite
    the outputs of the others: callers copy outputs out before the next replay.
    """

    def __init__(self) -> None:
        self.arena = torch.UntypedStorage(0)
        self._placed: list[tuple[weakref.ref, int, tuple, tuple]] = []
        self._ranges: dict[str, list[tuple[int, int]]] = {}  # graph name -> byte ranges of its outputs
        self._writes: dict[str, int] = {}  # graph name -> when it last wrote them (capture or replay)
        self._clock = itertools.count()

    def nbytes(self) -> int:
        return self.arena.nbytes()

    def place(self, outputs: list[torch.Tensor], graph: str) -> None:
        """Move `outputs` of `graph` (grouped by storage) into the arena, laid out from offset 0."""
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
        self._ranges[graph] = [_byte_range(t) for t in outputs]
        self.written(graph)

    def written(self, graph: str) -> None:
        """`graph` has just written its outputs (its capture, or a replay)."""
        self._writes[graph] = next(self._clock)

    def last_writer(self, t: torch.Tensor) -> str | None:
        """The graph that last wrote any byte of `t` (an output of a graph of this pool, or a view of one)."""
        if t.untyped_storage().data_ptr() != self.arena.data_ptr():
            return None
        start, end = _byte_range(t)
        writers = [g for g, ranges in self._ranges.items() if any(s < end and start < e for s, e in ranges)]
        return max(writers, key=self._writes.__getitem__, default=None)

    def _grow(self, nbytes: int) -> None:
        arena = torch.UntypedStorage(nbytes)
        arena[: self.arena.nbytes()].copy_(self.arena)
        self.arena = arena
        self._placed = [p for p in self._placed if p[0]() is not None]
        for ref, offset, shape, stride in self._placed:
            ref().set_(arena, offset, shape, stride)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.storage_offset() * t.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return start, start + extent * t.element_size()
