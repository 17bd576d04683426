"""Attention on CUDA: decode reads the KV lengths from the device tensor `seq_lens`.

`torch.cuda.CUDAGraph` has no `update` for host arguments, so a decode that took the host list
`seq_lens_cpu` (FIA's contract) would replay the lengths frozen at capture. Reading `seq_lens`,
which the graph runner refreshes in place before each replay, makes the captured graph correct as
is, with no `update()`. Eager and graph mode run the same kernels.
"""
from __future__ import annotations

import torch

from reference_runner.attention.base import AttentionBackend
from reference_runner.attention.ops import paged_decode_attention
from reference_runner.engine.forward_batch import ForwardBatch


class CudaAttnBackend(AttentionBackend):
    """Torch paged attention over every block of the block table, masked by device-side `seq_lens`."""

    seq_len_fill_value = 1  # as SGLang on CUDA: a padded row attends to the dummy slot only
    host_list = None

    def forward_decode(self, q, k, v, layer_id: int, forward_batch: ForwardBatch) -> torch.Tensor:
        cache = self.kv_cache
        cache.write(layer_id, forward_batch.out_cache_loc, k, v)
        return paged_decode_attention(q, cache.key_caches[layer_id], cache.value_caches[layer_id],
                                      forward_batch.block_tables, forward_batch.seq_lens, scale=self.scale)
