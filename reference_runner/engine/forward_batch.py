"""The per-step batch handed to the model, named as in SGLang's ForwardBatch."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from reference_runner.engine.kv_cache import KVCache


@dataclass
class ExpertRouting:
    """MoE routing of a batch's tokens, per MoE layer: the experts to compute with, and the router's own choice.

    `replay_ids` are the top-k expert ids each token must use instead of its router's choice (routing
    replay), -1 where it uses its router's; each MoE layer writes its router's own top-k ids and the gap
    between the router logits of its k-th and (k+1)-th expert into `topk_ids` and `gaps`, replayed or not.
    """

    replay_ids: torch.Tensor  # int64 [num_tokens, moe_layers, top_k]
    topk_ids: torch.Tensor  # int64 [num_tokens, moe_layers, top_k], written by the MoE layers
    gaps: torch.Tensor  # float32 [num_tokens, moe_layers], written by the MoE layers

    @classmethod
    def own(cls, num_tokens: int, moe_layers: int, top_k: int, device: str | torch.device) -> ExpertRouting:
        """Every token routed by its router (nothing replayed)."""
        with torch.device(device):
            return cls(torch.full((num_tokens, moe_layers, top_k), -1, dtype=torch.int64),
                       torch.zeros(num_tokens, moe_layers, top_k, dtype=torch.int64),
                       torch.zeros(num_tokens, moe_layers, dtype=torch.float32))

    def rows(self, n: int) -> ExpertRouting:
        """Views of the first `n` tokens."""
        return ExpertRouting(self.replay_ids[:n], self.topk_ids[:n], self.gaps[:n])


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill: every prompt token of each request
    DECODE = "decode"  # one new token per request


@dataclass
class ForwardBatch:
    """Inputs of one forward. Tensors live on the device; `seq_lens_cpu` is the host copy.

    For DECODE there is one token per request; for EXTEND `extend_seq_lens` gives each request's
    number of new tokens, packed in order in `input_ids`.
    """

    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    out_cache_loc: torch.Tensor  # [num_tokens] KV slot each token writes
    seq_lens: torch.Tensor  # [batch_size] KV length after this step, device side
    seq_lens_cpu: list[int]  # the same lengths on the host (FIA's actual_seq_lengths_kv)
    block_tables: torch.Tensor  # [batch_size, max_blocks_per_seq] int32
    extend_seq_lens: list[int] | None = None
    # DP attention: every DP rank's token count this step (all ranks pad expert layers to the largest).
    global_num_tokens: list[int] | None = None
    routing: ExpertRouting | None = None  # MoE models: routing replay in, the routers' own choices out


def decode_batch(kv_cache: KVCache, rids: list[str], seq_lens: list[int], input_ids: torch.Tensor,
                 global_num_tokens: list[int] | None = None, routing: ExpertRouting | None = None) -> ForwardBatch:
    """One decode step of `rids`, each writing its token `seq_len - 1` (KV reserved up to `seq_len`),
    on the device of `input_ids`."""
    device = input_ids.device
    for rid, n in zip(rids, seq_lens):
        kv_cache.reserve(rid, n)
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=len(rids),
        input_ids=input_ids,
        positions=torch.tensor([n - 1 for n in seq_lens], device=device),
        out_cache_loc=torch.tensor([kv_cache.slots(rid, n - 1, n)[0] for rid, n in zip(rids, seq_lens)],
                                   dtype=kv_cache.slot_dtype, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        seq_lens_cpu=list(seq_lens),
        block_tables=kv_cache.block_table_tensor(rids, device),
        global_num_tokens=global_num_tokens,
        routing=routing,
    )
