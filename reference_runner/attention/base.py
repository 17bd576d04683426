"""The attention backend contract: write the step's K/V into the paged cache, attend, and say how a
captured decode of this backend is kept correct across replays.

A backend is bound to one KVCache and called by every attention layer as
`forward(q, k, v, layer_id, forward_batch)` with q [T, heads, d] and k, v [T, kv_heads, d].
Prefill (EXTEND) runs eager on every device, with torch SDPA; decode is each device's own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from reference_runner.attention.ops import prefill_attention
from reference_runner.engine.forward_batch import ForwardBatch, ForwardMode
from reference_runner.engine.kv_cache import KVCache


class AttentionBackend(ABC):
    """Paged attention for one KV cache, and its graph policy (SGLang's `get_cuda_graph_seq_len_fill_value`
    and per-replay metadata)."""

    # Graph policy, read by the graph runner:
    seq_len_fill_value: ClassVar[int]  # the KV length of a padded row of a replayed batch
    # The host argument of the decode kernel that a capture freezes and `graph.update()` must refresh
    # before every replay (FIA's `actual_seq_lengths_kv`); None where the kernel reads device lengths.
    host_list: ClassVar[str | None]
    default_dtype: ClassVar[str] = "float32"

    def __init__(self, kv_cache: KVCache, num_heads: int):
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.scale = kv_cache.head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch) -> torch.Tensor:
        if forward_batch.forward_mode is not ForwardMode.DECODE:
            return self.forward_extend(q, k, v, layer_id, forward_batch)
        out = self.forward_decode(q, k, v, layer_id, forward_batch)
        # Where padded rows attend to the dummy slot instead (length 1, cuda), there is nothing to mask.
        return self.mask_padded_rows(out, forward_batch) if self.seq_len_fill_value == 0 else out

    def mask_padded_rows(self, out: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """Zero the rows of length 0 (a replayed batch's padding), read from the device `seq_lens`.

        What FIA writes for a row it skips is not specified (the captured `.out` form writes into an empty
        buffer), and a row of NaN or garbage would spread to every row at the first op that mixes rows
        (a matmul over the batch in a MoE dispatch, vLLM #38436): zeroed, it cannot.
        """
        return out.masked_fill((forward_batch.seq_lens == 0)[:, None, None], 0.0)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch) -> torch.Tensor:
        """Prefill from position 0: causal attention over each request's new tokens."""
        self.kv_cache.write(layer_id, forward_batch.out_cache_loc, k, v)
        return prefill_attention(q, k, v, forward_batch.extend_seq_lens, self.scale)

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch) -> torch.Tensor:
        """One token per request, attending over its whole cached sequence."""

    def graph_task_groups(self) -> int:
        """Updatable task groups a captured decode step must hold: one per attention layer where the kernel
        takes the host list, none where it reads device lengths."""
        return 0 if self.host_list is None else len(self.kv_cache.key_caches)

    def graph_update_input(self, seq_lens_cpu: list[int]) -> list[dict] | None:
        """The `cpu_update_input` that refreshes a captured decode's host list before a replay (one dict,
        broadcast to every task group), or None where nothing on the host needs refreshing."""
        return None if self.host_list is None else [{self.host_list: seq_lens_cpu}]
