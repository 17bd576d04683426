"""Attention ops: paged decode with FIA's host-list contract, and causal prefill.

`npugraph::paged_attention` is a registered custom op so that a graph capture records it as one
opaque node whose host arguments (`actual_seq_lengths_kv`, ...) can be updated before replay, as
`npu_fused_infer_attention_score` is on Ascend (`graphs/updatable.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_runner.graphs.updatable import register_updatable_op


@torch.library.custom_op("npugraph::paged_attention", mutates_args=())
def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, *, actual_seq_lengths_kv: list[int], num_heads: int,
                    num_key_value_heads: int, scale: float, block_size: int) -> torch.Tensor:
    """Decode attention: query [B, num_heads, head_dim] over each row's first `actual_seq_lengths_kv[b]`
    cached tokens (caches [num_blocks, block_size, kv_heads, head_dim], block_table int32 [B, max_blocks]).
    Rows of length 0 (padding) are FIA's unspecified rows: NaN here. Computed in float32.
    """
    batch = query.shape[0]
    if len(actual_seq_lengths_kv) != batch:
        raise ValueError(f"actual_seq_lengths_kv has {len(actual_seq_lengths_kv)} entries for a batch of {batch}")
    max_len = max(actual_seq_lengths_kv, default=0)
    num_blocks = -(-max_len // block_size)
    if num_blocks > block_table.shape[1]:
        raise ValueError(f"sequence length {max_len} exceeds block_table capacity {block_table.shape[1] * block_size}")
    if num_blocks == 0:
        return torch.full_like(query, float("nan"))
    # Gather only the blocks the longest row needs; positions past each row's length are masked.
    lens = torch.tensor(actual_seq_lengths_kv, device=query.device)
    out = paged_decode_attention(query, key_cache, value_cache, block_table[:, :num_blocks], lens, scale=scale)
    return _skipped_rows_unspecified(out, lens)


def _skipped_rows_unspecified(out: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """FIA skips rows of length 0 and specifies nothing for them: captured, its `.out` form writes into a buffer
    made by `torch.empty_like(query)` (torch_npu 7.1 and 7.2, graphs.py), so they hold whatever that memory held.
    NaN stands for that here, so that a caller relying on any value there is caught."""
    return out.masked_fill((lens == 0)[:, None, None], float("nan"))


@paged_attention.register_fake
def _(query, key_cache, value_cache, block_table, *, actual_seq_lengths_kv, num_heads, num_key_value_heads,
      scale, block_size):
    return torch.empty_like(query)


def paged_attention_static(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, actual_seq_lengths_kv: torch.Tensor, *, num_heads: int,
                           num_key_value_heads: int, scale: float, block_size: int) -> torch.Tensor:
    """`paged_attention` with its host lengths as a tensor, over the whole block table: the static
    shapes a compiled graph needs, the lengths still refreshed on every replay."""
    out = paged_decode_attention(query, key_cache, value_cache, block_table, actual_seq_lengths_kv, scale=scale)
    return _skipped_rows_unspecified(out, actual_seq_lengths_kv)


register_updatable_op(torch.ops.npugraph.paged_attention, "actual_seq_lengths_kv", static_form=paged_attention_static)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Decode attention over every block of `block_table`, masked past each row's `seq_lens[b]` (a device
    tensor): static shapes and no host values, so a CUDA graph replays it with new lengths as is.
    Rows of length 0 give zeros; computed in float32.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    span = block_table.shape[1] * key_cache.shape[1]
    # The batch split off the gathered blocks before their tokens are merged: one view merging it with them would make
    # a symbolic compile (`sim/piecewise.py`) assume a batch above 1.
    blocks = block_table.flatten()
    key = key_cache.index_select(0, blocks).unflatten(0, (batch, -1)).flatten(1, 2).float()  # [B, S, kv_heads, head_dim]
    value = value_cache.index_select(0, blocks).unflatten(0, (batch, -1)).flatten(1, 2).float()
    beyond = (torch.arange(span, device=query.device) >= seq_lens[:, None])[:, None, :, None]  # [B, 1, S, 1]
    # Zero the values too: slots past a row's length (block 0, the dummy slot) may hold anything, even NaN.
    value = value.transpose(1, 2).masked_fill(beyond, 0.0)  # [B, kv_heads, S, head_dim]
    beyond = beyond.transpose(-1, -2)  # [B, 1, 1, S]
    # Operands copied contiguous by clone (the copies matmul would make), never by contiguous() or reshape: those ask
    # whether the batch is 1, and a symbolic trace (`sim/piecewise.py`) would then need a compile of its own for 1.
    q = query.float().unflatten(1, (num_kv_heads, -1)).clone(memory_format=torch.contiguous_format)
    key = key.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)  # [B, kv_heads, head_dim, S]
    scores = torch.matmul(q, key).mul_(scale).masked_fill_(beyond, float("-inf"))
    probs = scores.softmax(-1).masked_fill_(beyond, 0.0)  # rows of length 0 are all-masked: NaN -> 0
    return torch.matmul(probs, value).reshape(batch, num_heads, head_dim).to(query.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extend_seq_lens: list[int],
                      scale: float) -> torch.Tensor:
    """Causal attention of each request over its own new tokens; q [T, heads, d], k/v [T, kv_heads, d], packed."""
    outs = []
    for qi, ki, vi in zip(q.split(extend_seq_lens), k.split(extend_seq_lens), v.split(extend_seq_lens)):
        o = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                           is_causal=True, scale=scale, enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)
