"""Attention backends: write the step's K/V into the paged cache, then attend.

A backend is bound to one KVCache and called by every attention layer as
`forward(q, k, v, layer_id, forward_batch)` with q [T, heads, d] and k, v [T, kv_heads, d].
"""
from __future__ import annotations

import torch

from reference_runner.forward_batch import ForwardBatch, ForwardMode
from reference_runner.kv_cache import KVCache
from reference_runner.ops.attention import prefill_attention


class TorchNativeAttnBackend:
    """Torch ops; decode goes through `npugraph::paged_attention` with the host list `seq_lens_cpu`,
    the same contract as FIA on Ascend, so a captured graph must update it before each replay."""

    def __init__(self, kv_cache: KVCache, num_heads: int):
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.scale = kv_cache.head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch) -> torch.Tensor:
        if forward_batch.forward_mode is ForwardMode.DECODE:
            return self.forward_decode(q, k, v, layer_id, forward_batch)
        return self.forward_extend(q, k, v, layer_id, forward_batch)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch) -> torch.Tensor:
        """Prefill from position 0: causal attention over each request's new tokens."""
        self.kv_cache.write(layer_id, forward_batch.out_cache_loc, k, v)
        return prefill_attention(q, k, v, forward_batch.extend_seq_lens, self.scale)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch) -> torch.Tensor:
        """One token per request, attending over its whole cached sequence."""
        cache = self.kv_cache
        cache.write(layer_id, forward_batch.out_cache_loc, k, v)
        return torch.ops.npugraph.paged_attention(
            q, cache.key_caches[layer_id], cache.value_caches[layer_id], forward_batch.block_tables,
            actual_seq_lengths_kv=forward_batch.seq_lens_cpu, num_heads=self.num_heads,
            num_key_value_heads=cache.num_kv_heads, scale=self.scale, block_size=cache.block_size,
        )


def get_attn_backend(device: str, kv_cache: KVCache, num_heads: int) -> TorchNativeAttnBackend:
    """The attention backend for `device` (`num_heads` per TP rank); the same one in eager and graph mode."""
    if device == "npu":
        from reference_runner.ascend_attn_backend import AscendAttnBackend  # imports torch_npu

        return AscendAttnBackend(kv_cache, num_heads)
    if device == "cuda":
        from reference_runner.cuda_attn_backend import CudaAttnBackend

        return CudaAttnBackend(kv_cache, num_heads)
    return TorchNativeAttnBackend(kv_cache, num_heads)
