"""Attention on the CPU: decode through `npugraph::paged_attention`, which takes the KV lengths as the
host list `actual_seq_lengths_kv`, the contract of FIA on Ascend: a captured graph must have it
refreshed by `graph.update()` before each replay, exactly as on an NPU."""
from __future__ import annotations

import torch

from reference_runner.attention.base import AttentionBackend
from reference_runner.engine.forward_batch import ForwardBatch


class TorchNativeAttnBackend(AttentionBackend):
    seq_len_fill_value = 0  # as FIA: a row of length 0 reads nothing
    host_list = "actual_seq_lengths_kv"

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch) -> torch.Tensor:
        cache = self.kv_cache
        cache.write(layer_id, forward_batch.out_cache_loc, k, v)
        return torch.ops.npugraph.paged_attention(
            q, cache.key_caches[layer_id], cache.value_caches[layer_id], forward_batch.block_tables,
            actual_seq_lengths_kv=forward_batch.seq_lens_cpu, num_heads=self.num_heads,
            num_key_value_heads=cache.num_kv_heads, scale=self.scale, block_size=cache.block_size,
        )
