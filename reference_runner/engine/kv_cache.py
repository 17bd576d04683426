"""Paged KV cache: per-layer key/value pools of fixed-size blocks, and per-request block tables.

Block 0 is never handed out: its slot 0 is the dummy slot that padded batch rows write to, so a
padded graph replay cannot clobber a live request's KV. The slot of token position p of a request is
`block_table[p // block_size] * block_size + p % block_size`.
"""
from __future__ import annotations

import math

import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockAllocator:
    """Free list of blocks 1..num_blocks-1 (block 0 is reserved)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks, or raise `OutOfBlocks` and take none."""
        if n > len(self.free_blocks):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self.free_blocks)} free of {self.num_blocks - 1}")
        return [self.free_blocks.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(reversed(blocks))


class KVCache:
    """Key/value pools `[num_blocks, block_size, num_kv_heads, head_dim]` per layer, plus block tables."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 max_context: int, dtype: torch.dtype, device: str | torch.device):
        self.num_layers = num_layers
        self.shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.allocate()
        self.slot_dtype = torch.int64  # dtype of `out_cache_loc`: index_copy_ takes int64 indices
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.max_context = max_context
        self.max_blocks_per_seq = math.ceil(max_context / block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    def allocate(self) -> None:
        """(Re)allocate every layer's key and value pool, zeroed, at new addresses. Engines do this when they give
        the KV memory back and take it again (weight updates, sleep modes): a graph captured on the old pools must
        be captured again, or its replays read and write freed memory."""
        self.key_caches = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.value_caches = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def data_ptrs(self) -> tuple[int, ...]:
        """The pools' addresses: what a captured graph reads and writes."""
        return tuple(c.data_ptr() for c in (*self.key_caches, *self.value_caches))

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def reserve(self, rid: str, num_tokens: int) -> None:
        """Grow `rid`'s block table so that it holds `num_tokens` tokens."""
        if num_tokens > self.max_context:
            raise ValueError(f"request {rid!r}: {num_tokens} tokens exceed max_context {self.max_context}")
        table = self.block_tables.setdefault(rid, [])
        table += self.allocator.allocate(self.blocks_needed(num_tokens) - len(table))

    def slots(self, rid: str, start: int, end: int) -> list[int]:
        """KV slots of positions [start, end) of `rid` (reserved beforehand)."""
        table, bs = self.block_tables[rid], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def free(self, rid: str) -> None:
        """Give `rid`'s blocks back to the pool."""
        self.allocator.free(self.block_tables.pop(rid))

    def block_table_tensor(self, rids: list[str], device: str | torch.device) -> torch.Tensor:
        """int32 [len(rids), max_blocks_per_seq], unused entries 0 (the reserved block)."""
        rows = [table + [0] * (self.max_blocks_per_seq - len(table)) for table in map(self.block_tables.get, rids)]
        return torch.tensor(rows, dtype=torch.int32, device=device).view(len(rids), self.max_blocks_per_seq)

    def write(self, layer_id: int, out_cache_loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [num_tokens, num_kv_heads, head_dim] at slots `out_cache_loc` (`slot_dtype`)."""
        # The slot view is made here, not kept: a compiled step must take each pool as its only input on that memory.
        # Given a pool and a view of it, AOT autograd merges the two into a synthetic base that graph trees do not
        # count as static, and skip every step for "mutated inputs" (seen on CUDA).
        self.key_caches[layer_id].view(-1, *self.shape[2:]).index_copy_(0, out_cache_loc, k)
        self.value_caches[layer_id].view(-1, *self.shape[2:]).index_copy_(0, out_cache_loc, v)
