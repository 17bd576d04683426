"""DP attention (as SGLang's `dp_attention.py`): attention runs per DP rank on its own requests, and
each expert layer runs once over the tokens of every DP rank.

Before an expert layer each rank pads its tokens to the DP buffer length (the largest rank's token
count, agreed by the engine every step) and all-gathers them; after it, each rank keeps its own
rows. Padding keeps the gather a static shape: in a graph the buffer length is the captured batch
size, the same bucket on every rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_runner.engine.forward_batch import ForwardBatch
from reference_runner.parallel.collectives import dp_all_gather
from reference_runner.parallel.state import ParallelState

# Set by the model runner before each forward, read by the expert layers (a host int: frozen at capture).
_dp_buffer_len = 0


def dp_buffer_len(forward_batch: ForwardBatch) -> int:
    """Rows every DP rank pads to: the largest of `global_num_tokens`, else this batch's own tokens."""
    if forward_batch.global_num_tokens is not None:
        return max(forward_batch.global_num_tokens)
    return forward_batch.input_ids.shape[0]


def set_dp_buffer_len(num_tokens: int) -> None:
    global _dp_buffer_len
    _dp_buffer_len = num_tokens


def dp_gather(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Every DP rank's tokens [dp_size * buffer_len, hidden], each rank's padded with zero rows."""
    if state.dp_size == 1:
        return x
    return dp_all_gather(F.pad(x, (0, 0, 0, _dp_buffer_len - x.shape[0])), state)


def dp_scatter(x: torch.Tensor, state: ParallelState, num_tokens: int) -> torch.Tensor:
    """This rank's `num_tokens` rows of a `dp_gather`ed tensor."""
    if state.dp_size == 1:
        return x
    start = state.dp_rank * _dp_buffer_len
    return x[start:start + num_tokens]
