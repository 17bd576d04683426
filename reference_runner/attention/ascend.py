"""Attention on Ascend: decode through `torch_npu.npu_fused_infer_attention_score` (FIA) on the paged cache.

FIA takes the per-request KV lengths as the host list `actual_seq_lengths_kv`, the contract that
`npugraph::paged_attention` reproduces on the CPU. Captured with `auto_dispatch_capture=True`, each
FIA call becomes a task group (its `.out` form with the max workspace) whose lengths
`graph.update(cpu_update_input=...)` replaces before a replay: `NPUGraphRunner` does that, with the
`graph_update_input` of this backend.

KV writes stay `KVCache.write` (`index_copy_`, aclnnInplaceIndexCopy on A2/A3): one code path on
every device. Imported only on npu: torch_npu without CANN breaks `import torch`.
"""
from __future__ import annotations

import torch
import torch_npu

from reference_runner.attention.base import AttentionBackend
from reference_runner.engine.forward_batch import ForwardBatch
from reference_runner.engine.kv_cache import KVCache

FIA_DTYPES = (torch.float16, torch.bfloat16)


class AscendAttnBackend(AttentionBackend):
    """Prefill as on the CPU (torch SDPA, eager only); decode with FIA, layout BSND, S = 1 token per row."""

    seq_len_fill_value = 0  # as SGLang on Ascend: FIA skips rows of length 0
    host_list = "actual_seq_lengths_kv"
    default_dtype = "bfloat16"  # FIA has no float32

    def __init__(self, kv_cache: KVCache, num_heads: int):
        dtype = kv_cache.key_caches[0].dtype
        if dtype not in FIA_DTYPES:
            raise ValueError(f"npu attention (npu_fused_infer_attention_score) supports float16 and bfloat16, "
                             f"not {dtype}: run with --dtype bfloat16")
        super().__init__(kv_cache, num_heads)

    def forward_decode(self, q, k, v, layer_id: int, forward_batch: ForwardBatch) -> torch.Tensor:
        cache = self.kv_cache
        cache.write(layer_id, forward_batch.out_cache_loc, k, v)
        batch, head_dim = q.shape[0], cache.head_dim
        kv_hidden = cache.num_kv_heads * head_dim
        out, _ = torch_npu.npu_fused_infer_attention_score(
            q.reshape(batch, 1, self.num_heads, head_dim).contiguous(),  # FIA refuses non-contiguous input
            # Paged KV is passed as [num_blocks, block_size, kv_heads * head_dim] with the block table.
            cache.key_caches[layer_id].view(-1, cache.block_size, kv_hidden),
            cache.value_caches[layer_id].view(-1, cache.block_size, kv_hidden),
            block_table=forward_batch.block_tables,  # int32 [B, max_blocks_per_seq]
            actual_seq_lengths_kv=forward_batch.seq_lens_cpu,  # host list: frozen at capture, refreshed by update
            num_heads=self.num_heads,
            num_key_value_heads=cache.num_kv_heads,
            input_layout="BSND",
            scale=self.scale,
            block_size=cache.block_size,
        )
        return out.view(batch, self.num_heads, head_dim)
